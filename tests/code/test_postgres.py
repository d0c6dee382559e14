"""The embedded PostgreSQL: found where Debian installs it, and no TCP login without its password."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa

from feedback import postgres
from tests.support import free_port


def test_server_programs_off_path_are_found_where_debian_installs_them(tmp_path, monkeypatch):
    for version in ("9", "15", "main"):  # newest by number, not by name
        program = tmp_path / version / "bin" / "pg_ctl"
        program.parent.mkdir(parents=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(postgres, "DEBIAN_SERVERS", str(tmp_path))
    assert postgres.server_program("pg_ctl") == str(tmp_path / "15" / "bin" / "pg_ctl")
    assert postgres.server_program("initdb") is None


def test_tcp_logins_need_the_password_also_on_a_cluster_made_before_passwords():
    """A cluster initialised the old way (every local login trusted) is hardened when started."""
    directory = Path(tempfile.mkdtemp(prefix="insect-pg-"))
    os.chmod(directory, 0o755)  # as root the server runs as `postgres`, which must reach its cluster
    cluster, port = directory / "cluster", free_port()
    try:
        postgres.init_cluster(cluster, postgres.USER, "--auth=trust")
        url = sa.make_url(postgres.ensure_running(cluster, port))
        login = {"host": "127.0.0.1", "port": port, "user": postgres.USER, "dbname": postgres.DATABASE}
        with pytest.raises(psycopg2.OperationalError, match="password"):
            psycopg2.connect(**login).close()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(**login, password="a-guess").close()
        psycopg2.connect(**login, password=url.password).close()
        assert (directory / "cluster.password").stat().st_mode & 0o077 == 0
    finally:
        postgres.stop(cluster)
        shutil.rmtree(directory, ignore_errors=True)
