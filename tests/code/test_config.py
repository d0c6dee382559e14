"""The config package's helpers: the one Airflow environment and the one writer of private files."""

import stat

import pytest
from pydantic import ValidationError

from config import REPO_ROOT, ServeConfig, Settings
from config.airflow import airflow_environment
from config.private import write_private


def test_private_files_are_owner_only_and_replace_the_old_one_whole(tmp_path):
    path = tmp_path / "new" / "secrets.json"
    write_private(path, "first")
    assert path.read_text() == "first" and stat.S_IMODE(path.stat().st_mode) == 0o600

    path.write_text("readable by all")
    path.chmod(0o644)
    write_private(path, "second")
    assert path.read_text() == "second" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secrets.json"]  # no partial file left behind


def test_airflow_environment_points_at_the_project_and_the_settings(tmp_path):
    settings = Settings(data_dir=tmp_path, mlflow_tracking_uri=None, airflow_home=None)
    env = airflow_environment(settings)
    assert env == {
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
    }
    assert airflow_environment(settings, airflow_home=tmp_path / "elsewhere")["AIRFLOW_HOME"] == str(tmp_path / "elsewhere")


def test_a_misspelt_section_variable_is_an_error_not_silence(monkeypatch):
    monkeypatch.setenv("INSECT_TRAIN__FINETUNE_EPOCHS", "3")
    assert Settings().train.finetune_epochs == 3
    monkeypatch.setenv("INSECT_TRAIN__EPOCHS", "3")  # no such field
    with pytest.raises(ValidationError, match=r"train\.epochs"):
        Settings()


@pytest.mark.parametrize(
    ("cores", "workers", "configured", "threads"),
    [(2, 1, None, 1), (16, 1, None, 15), (16, 2, None, 7), (2, 2, None, 1), (1, 1, None, 1), (16, 1, 4, 4)],
)
def test_the_model_leaves_a_core_to_the_request_path_unless_told_otherwise(cores, workers, configured, threads):
    serve = ServeConfig(workers=workers, model_threads=configured, rate_limit_store="redis://127.0.0.1:6380/1")
    assert serve.threads_per_model(cores) == threads
