"""`make up`'s S3 API: rclone's S3 servers over a directory, each bucket a directory and each
object a file (`<directory>/<bucket>/<key>`), so every object survives a restart whatever its size
(moto kept objects in memory, and replaying its recording lost the multipart uploads).

rclone gives every key pair it accepts the same rights, so each set of rights is a server of its
own that lets in one S3 user (`stack.layout.Layout.s3_servers`). Each serves only its bucket, or
a prefix of it, through rclone's `combine` remote, which shows a folder under a name: a key
outside it can be neither read nor written, and no other bucket can be made. `--read-only`
refuses every write.

`python -m stack.s3 PORT DIRECTORY BUCKET USER SECRETS_FILE [--prefix P] [--read-only]` reads
USER's key pair from the secrets file and becomes rclone with the pair in its environment: an
argument would show it to anyone running `ps`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stack import secrets
from stack.layout import S3Server


def remotes(server: S3Server, root: Path) -> tuple[str, dict[str, str]]:
    """rclone remotes, defined by environment variables, that show only the server's folder under
    its bucket and prefix: one `combine` remote per path segment, each holding only the next one.
    The remote to serve, and the variables."""
    segments = server.segments
    target, variables = str(server.folder(root)), {}
    for level in reversed(range(len(segments))):
        variables[f"RCLONE_CONFIG_LEVEL{level}_TYPE"] = "combine"
        variables[f"RCLONE_CONFIG_LEVEL{level}_UPSTREAMS"] = f'"{segments[level]}={target}"'  # quoted: a path may hold spaces
        target = f"level{level}:"
    return target, variables


def serve(server: S3Server, root: Path, secrets_file: Path) -> None:
    access_key, secret = secrets.S3_USERS[server.user]
    keys = secrets.load_or_create(secrets_file)
    remote, variables = remotes(server, root)
    rclone = str(Path(sys.executable).parent / "rclone")
    environment = {
        **os.environ,
        **variables,
        # one access-key pair, quoted: rclone reads a list-valued variable as CSV
        "RCLONE_AUTH_KEY": f'"{access_key},{keys[secret]}"',
        "RCLONE_CONFIG": "/dev/null",  # no config file: the remotes are in the environment
    }
    options = ["--addr", f"127.0.0.1:{server.port}"]
    if server.read_only:
        # another server writes what this one reads: look at the disk on every request, not at
        # a listing cached for 5 minutes (a photo stored since would be missing)
        options += ["--read-only", "--dir-cache-time", "0s"]
    os.execve(rclone, [rclone, "serve", "s3", *options, remote], environment)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stack.s3", description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("root", type=Path, help="the directory holding a folder per bucket")
    parser.add_argument("bucket")
    parser.add_argument("user", choices=secrets.S3_USERS, help="the S3 user whose key pair alone gets in")
    parser.add_argument("secrets_file", type=Path)
    parser.add_argument("--prefix", default="", help="serve only this folder of the bucket")
    parser.add_argument("--read-only", action="store_true")
    args = parser.parse_args(argv)
    serve(S3Server(args.port, args.bucket, args.user, args.prefix, args.read_only), args.root, args.secrets_file)


if __name__ == "__main__":
    main()
