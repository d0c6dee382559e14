"""API keys on a real PostgreSQL: created once and shown once, stored hashed, revoked, kept in files."""

import os
import stat
import subprocess
import sys

import pytest
import sqlalchemy as sa

from config import REPO_ROOT
from feedback import db, keys
from tests.support import photo_bytes, post_feedback


def _name(label: str) -> str:
    return f"{label}-{os.urandom(3).hex()}"


def test_a_key_names_its_holder_and_role_and_only_its_hash_is_stored(live_settings):
    engine = db.engine(live_settings)
    name = _name("ann")
    key = keys.create_key(engine, name=name, role="labeler")
    assert keys.caller_for(engine, key) == keys.Caller(name, "labeler")
    assert keys.caller_for(engine, key + "x") is None
    with engine.connect() as conn:
        stored = " ".join(str(value) for row in conn.execute(sa.select(db.api_keys)) for value in row)
    assert key not in stored
    with pytest.raises(ValueError, match="exists already"):
        keys.create_key(engine, name=name, role="client")
    with pytest.raises(ValueError, match="unknown role"):
        keys.create_key(engine, name=_name("bob"), role="root")


def test_a_revoked_key_is_refused_and_its_name_can_be_given_again(live_settings):
    engine = db.engine(live_settings)
    name = _name("temp")
    key = keys.create_key(engine, name=name, role="client")
    assert keys.revoke_key(engine, name) and not keys.revoke_key(engine, name)
    assert keys.caller_for(engine, key) is None
    assert keys.caller_for(engine, keys.create_key(engine, name=name, role="client")) == keys.Caller(name, "client")


def test_roles_are_ordered():
    labeler = keys.Caller("l", "labeler")
    assert labeler.may_act_as("client") and labeler.may_act_as("labeler") and not labeler.may_act_as("admin")


def test_a_key_file_is_private_and_kept_while_its_key_is_valid(live_settings, tmp_path):
    engine = db.engine(live_settings)
    path, name = tmp_path / "keys" / "demo.key", _name("demo")
    keys.key_in_file(engine, path, name=name, role="labeler")
    first = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.key_in_file(engine, path, name=name, role="labeler").read_text() == first
    keys.revoke_key(engine, name)
    keys.key_in_file(engine, path, name=name, role="labeler")
    assert path.read_text() != first and keys.caller_for(engine, path.read_text().strip()).name == name


def test_the_cli_shows_a_new_key_once_alone_on_its_last_line_and_lists_none(live_settings):
    env = {**os.environ, "INSECT_FEEDBACK__DATABASE_URL": live_settings.feedback.database_url}
    name = _name("cli")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "feedback", "keys", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True
        )

    created = cli("create", "--name", name, "--role", "client")
    key = created.stdout.splitlines()[-1]
    assert created.returncode == 0 and key.startswith(keys.KEY_PREFIX)
    assert keys.caller_for(db.engine(live_settings), key) == keys.Caller(name, "client")
    listed = cli("list").stdout
    assert name in listed and key not in listed
    assert cli("revoke", name).returncode == 0 and "revoked" in cli("list").stdout
    assert cli("revoke", name).returncode == 1


def test_suggestions_wait_and_only_labels_count_towards_a_new_version(live_settings):
    engine = db.engine(live_settings)
    label = post_feedback(live_settings, photo_bytes(1), "rice leaf roller", kind=db.LABEL)
    post_feedback(live_settings, photo_bytes(2), "rice leaf roller", kind=db.SUGGESTION)
    assert db.pending_count(engine) == 1
    assert [row.id for row in db.pending_feedback(engine)] == [label]


def test_suggestions_train_once_enough_distinct_clients_agree_when_so_configured(live_settings):
    engine = db.engine(live_settings)
    species, photo = "rice leaf roller", photo_bytes(3)
    post_feedback(live_settings, photo, species, kind=db.SUGGESTION, submitted_by="client-a")
    post_feedback(live_settings, photo, "paddy stem maggot", kind=db.SUGGESTION, submitted_by="client-b")  # disagrees
    post_feedback(live_settings, photo, species, kind=db.SUGGESTION, submitted_by="client-a")  # the same client again
    assert db.pending_count(engine, agreement=2) == 0 and db.pending_count(engine) == 0
    post_feedback(live_settings, photo, species, kind=db.SUGGESTION, submitted_by="client-c")
    agreed = db.pending_feedback(engine, agreement=2)
    assert {(row.corrected_label, row.submitted_by) for row in agreed} == {(species, "client-a"), (species, "client-c")}
    assert db.pending_count(engine) == 0  # off unless configured
