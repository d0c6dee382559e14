"""The feedback database's logins on a real PostgreSQL: the Bento's role writes rows but no key
and no schema; the key administrator's writes keys and nothing else."""

from __future__ import annotations

import psycopg2
import pytest
import sqlalchemy as sa

from feedback import db, keys, postgres


def _as(url: str, role: str) -> sa.Engine:
    return sa.create_engine(sa.make_url(url).set(username=role, password=f"{role}-password"), poolclass=sa.pool.NullPool)


@pytest.fixture(scope="module")
def roles(postgres_url) -> dict[str, sa.Engine]:
    owner = sa.make_url(postgres_url)
    conn = psycopg2.connect(host=owner.host, port=owner.port, user=owner.username, password=owner.password, dbname=owner.database)
    conn.autocommit = True
    with conn.cursor() as cur:
        for role in db.ROLE_GRANTS:
            postgres.create_role(cur, role, f"{role}-password")
    conn.close()
    db.migrate(postgres_url)  # as a deploy does after creating the roles: the grants follow
    return {role: _as(postgres_url, role) for role in db.ROLE_GRANTS}


def _refused(engine: sa.Engine, statement: str) -> bool:
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
    except sa.exc.ProgrammingError as error:
        return error.orig.pgcode == "42501"  # insufficient_privilege
    return False


def test_the_services_role_records_predictions_but_cannot_mint_a_key_or_change_the_schema(roles):
    service = roles[db.SERVICE_ROLE]
    prediction_id = db.record_prediction(
        service, model_name="m", model_version="1", backend="torch-eager", label="a", probability=0.9,
        image_sha256="0" * 64, image_key="k", image_width=1, image_height=1,
    )  # fmt: skip
    assert db.get_prediction(service, prediction_id).label == "a"
    assert keys.caller_for(service, "not a key") is None  # it reads the keys
    assert _refused(service, "INSERT INTO api_keys (name, role, key_sha256) VALUES ('x', 'admin', repeat('0', 64))")
    assert _refused(service, "UPDATE api_keys SET role = 'admin'")
    assert _refused(service, "CREATE TABLE planted (id int)")
    assert _refused(service, "DROP TABLE feedback")


def test_the_key_administrators_role_manages_keys_and_nothing_else(roles):
    admin = roles[db.KEYS_ROLE]
    key = keys.create_key(admin, name="made-by-the-key-role", role="client")
    assert keys.caller_for(admin, key).role == "client"
    assert keys.revoke_key(admin, "made-by-the-key-role")
    assert _refused(admin, "DELETE FROM predictions")
    assert _refused(admin, "INSERT INTO review_claims (item, claimed_by, claimed_until) VALUES ('x', 'y', now())")


def test_make_ups_bento_logs_into_the_feedback_database_as_the_services_role(tmp_path):
    from config import Settings
    from stack.layout import Layout
    from stack.services import services

    [bento] = [s for s in services(Layout(Settings(data_dir=tmp_path))) if s.name == "bento"]
    assert bento.environment["INSECT_FEEDBACK__DATABASE_URL"].startswith(f"postgresql+psycopg2://{db.SERVICE_ROLE}:")
