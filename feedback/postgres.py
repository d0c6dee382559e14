"""The embedded PostgreSQL cluster: initialised under the data directory and started on first use,
so the demo needs no database server set up by hand. A configured database URL bypasses it."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2

USER = DATABASE = "insect"
# PostgreSQL refuses to run as root; as root, the server runs as this system account instead.
SERVER_ACCOUNT = "postgres"


def _run(cluster: Path, *command: str) -> subprocess.CompletedProcess:
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
    if shutil.which("pg_ctl") is None:
        raise RuntimeError(
            "PostgreSQL server binaries (initdb, pg_ctl) are not on PATH; install them or set INSECT_FEEDBACK__DATABASE_URL"
        )
    with _locked(cluster):
        init_cluster(cluster, USER, "--auth=trust")
        if not is_running(cluster):
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
        _create_database(port)
    return url(port)


def url(port: int) -> str:
    """The embedded cluster's database, as SQLAlchemy names it."""
    return f"postgresql+psycopg2://{USER}@127.0.0.1:{port}/{DATABASE}"


def _create_database(port: int) -> None:
    for _ in range(50):  # the socket can lag `pg_ctl -w` by a moment
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres")
            break
        except psycopg2.OperationalError:
            time.sleep(0.1)
    else:
        raise RuntimeError(f"PostgreSQL on port {port} accepts no connections")
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            create_database(cur, DATABASE)
    finally:
        conn.close()


def create_database(cur, name: str, owner: str | None = None) -> None:
    """CREATE DATABASE `name` unless it exists (the cursor's connection in autocommit)."""
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    if cur.fetchone() is None:
        cur.execute(f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))


def stop(cluster: Path) -> None:
    if is_running(cluster):
        _pg_ctl(cluster, "stop", "-m", "fast", "-w")
