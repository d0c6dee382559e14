"""`make up`'s S3 API: rclone's S3 server over a directory, each bucket a directory and each
object a file, so every object survives a restart whatever its size (moto kept objects in memory,
and replaying its recording lost the multipart uploads). Only the stack's key pair gets in.

`python -m stack.s3 PORT DIRECTORY SECRETS_FILE` reads the key pair from the secrets file and
becomes rclone with the pair in its environment: an argument would show it to anyone running `ps`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stack import secrets


def serve(port: int, root: Path, secrets_file: Path) -> None:
    keys = secrets.load_or_create(secrets_file)
    rclone = str(Path(sys.executable).parent / "rclone")
    environment = {
        **os.environ,
        # one access-key pair, quoted: rclone reads a list-valued variable as CSV
        "RCLONE_AUTH_KEY": f'"{keys["s3_access_key"]},{keys["s3_secret_key"]}"',
        "RCLONE_CONFIG": "/dev/null",  # no remotes needed: it serves a local directory
    }
    os.execve(rclone, [rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", str(root)], environment)


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
