"""Shared fixtures: a tiny synthetic dataset and settings that point everything at a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import Settings, SyntheticDataConfig, get_settings
from ml.data.synthetic import generate_synthetic

# Small enough for seconds-long steps on 2 cores, big enough for every split to hold every class.
TINY_ENV = {
    "INSECT_SYNTHETIC__NUM_CLASSES": "4",
    "INSECT_SYNTHETIC__IMAGES_PER_CLASS": "10",
    "INSECT_TRAIN__PRETRAIN_EPOCHS": "1",
    "INSECT_TRAIN__FINETUNE_EPOCHS": "1",
    "INSECT_TRAIN__BATCH_SIZE": "8",
    "INSECT_PRUNE__FINETUNE_EPOCHS": "1",
    "INSECT_PRUNE__MAX_TOP1_DROP": "1.0",  # an untrained tiny model has no accuracy to protect
    "INSECT_COMPILE__CUDA_ARCHS": '["sm_80"]',
}


def pytest_configure(config):
    """Keep Airflow's files out of ~/airflow; no example DAGs."""
    import os
    import tempfile

    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("dataset"), SyntheticDataConfig(num_classes=4, images_per_class=10))


@pytest.fixture
def settings(tmp_path, monkeypatch, tiny_dataset) -> Settings:
    """Settings as the pipeline reads them, from the environment, isolated under tmp_path."""
    for key, value in TINY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("INSECT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("INSECT_DATASET_DIR", str(tiny_dataset))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()
