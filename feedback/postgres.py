"""The embedded PostgreSQL cluster: initialised under the data directory and started on first use,
so the demo needs no database server set up by hand. A configured database URL bypasses it.

Logins over TCP need the password (scram-sha-256) kept in a file beside the cluster that only its
owner reads; over the cluster's own socket, in a directory only the server's account enters, the
bootstrap role needs none. The server programs are found on PATH or where Debian's `postgresql`
package installs them (/usr/lib/postgresql/<version>/bin)."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2

from config.private import write_private

USER = DATABASE = "insect"
# The feedback database's logins besides its owner (feedback.db.ROLE_GRANTS says what each may)
SERVICE_ROLE, KEYS_ROLE = "insect_service", "insect_keys"
# PostgreSQL refuses to run as root; as root, the server runs as this system account instead.
SERVER_ACCOUNT = "postgres"
DEBIAN_SERVERS = "/usr/lib/postgresql"
# TCP logins by password; the cluster's socket (in its own 0700 directory) trusts its account
AUTH = ("--auth-local=trust", "--auth-host=scram-sha-256")


def server_program(name: str) -> str | None:
    """`initdb`, `pg_ctl` or `postgres`: on PATH, else the newest Debian-packaged version's."""
    if found := shutil.which(name):
        return found
    packaged = [p for p in Path(DEBIAN_SERVERS).glob(f"*/bin/{name}") if p.parts[-3].isdigit()]
    return str(max(packaged, key=lambda p: int(p.parts[-3]))) if packaged else None


def _run(cluster: Path, program: str, *args: str) -> subprocess.CompletedProcess:
    command = (server_program(program) or program, *args)
    if os.geteuid() == 0:
        command = ("runuser", "-u", SERVER_ACCOUNT, "--", *command)
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=cluster)


def _pg_ctl(cluster: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(cluster, "pg_ctl", "-D", str(cluster), *args)


@contextmanager
def _locked(cluster: Path) -> Iterator[None]:
    """One initdb/start at a time: the service and a DAG task may both ask for the cluster."""
    cluster.parent.mkdir(parents=True, exist_ok=True)
    with open(cluster.parent / f".{cluster.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def is_running(cluster: Path) -> bool:
    return (cluster / "PG_VERSION").exists() and _pg_ctl(cluster, "status").returncode == 0


def init_cluster(cluster: Path, superuser: str, *auth: str) -> None:
    """initdb (once), owned by the account the server runs as; `auth`: initdb's --auth* options."""
    if (cluster / "PG_VERSION").exists():
        return
    cluster.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(cluster, SERVER_ACCOUNT, SERVER_ACCOUNT)
    created = _run(cluster, "initdb", "-D", str(cluster), "-U", superuser, *auth, "-E", "UTF8")
    if created.returncode != 0:
        raise RuntimeError(f"initdb failed: {created.stderr.strip()}")


def ensure_running(cluster: Path, port: int) -> str:
    """Initialise (once) and start the cluster on 127.0.0.1:`port`; return its SQLAlchemy URL."""
    if server_program("pg_ctl") is None:
        raise RuntimeError(
            f"PostgreSQL server binaries (initdb, pg_ctl) are neither on PATH nor in {DEBIAN_SERVERS}/*/bin; "
            "install them (`make system-packages`) or set INSECT_FEEDBACK__DATABASE_URL"
        )
    with _locked(cluster):
        init_cluster(cluster, USER, *AUTH)
        if not is_running(cluster):
            _require_passwords_over_tcp(cluster)
            started = _pg_ctl(
                cluster,
                "start",
                "-w",
                "-t",
                "60",
                "-l",
                str(cluster / "server.log"),
                "-o",
                f"-p {port} -k {cluster} -c listen_addresses=127.0.0.1 -c max_connections=200",
            )
            if started.returncode != 0:
                raise RuntimeError(f"PostgreSQL did not start: {started.stderr.strip()} (see {cluster / 'server.log'})")
        _create_database(cluster, port)
    return url(cluster, port)


def url(cluster: Path, port: int) -> str:
    """The embedded cluster's database, as SQLAlchemy names it, with its login's password."""
    return f"postgresql+psycopg2://{USER}:{_password(cluster)}@127.0.0.1:{port}/{DATABASE}"


def _password(cluster: Path) -> str:
    """The login's password, generated once into a file only its owner reads."""
    path = cluster.with_name(f"{cluster.name}.password")
    if not path.exists():
        write_private(path, secrets.token_urlsafe(24))
    return path.read_text().strip()


def _require_passwords_over_tcp(cluster: Path) -> None:
    """A cluster initialised before logins needed a password trusted every TCP login: no more."""
    hba = cluster / "pg_hba.conf"
    lines = hba.read_text().splitlines()
    hardened = [re.sub(r"\btrust$", "scram-sha-256", line.rstrip()) if line.startswith("host") else line for line in lines]
    if hardened != lines:
        hba.write_text("\n".join(hardened) + "\n")


def _create_database(cluster: Path, port: int) -> None:
    """The login's password (again: how a new one takes effect) and its database, over the socket."""
    for _ in range(50):  # the socket can lag `pg_ctl -w` by a moment
        try:
            conn = psycopg2.connect(host=str(cluster), port=port, user=USER, dbname="postgres")
            break
        except psycopg2.OperationalError:
            time.sleep(0.1)
    else:
        raise RuntimeError(f"PostgreSQL on port {port} accepts no connections")
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(f"ALTER ROLE {USER} PASSWORD %s", (_password(cluster),))
            create_database(cur, DATABASE)
    finally:
        conn.close()


def create_role(cur, name: str, password: str) -> None:
    """A login role with `password`; one that exists gets the password again (how a new one takes effect)."""
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
    verb = "ALTER" if cur.fetchone() else "CREATE"
    cur.execute(f"{verb} ROLE {name} LOGIN PASSWORD %s", (password,))


def create_database(cur, name: str, owner: str | None = None) -> None:
    """CREATE DATABASE `name` unless it exists (the cursor's connection in autocommit)."""
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    if cur.fetchone() is None:
        cur.execute(f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))


def stop(cluster: Path) -> None:
    if is_running(cluster):
        _pg_ctl(cluster, "stop", "-m", "fast", "-w")
