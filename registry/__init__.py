"""The MLflow model registry, as the rest of the platform uses it.

A model version bundles the exported eager model (`model.pt2`, torch.export: loadable without
any training code) and the TVM libraries, each with its sha256 as a version tag. Aliases carry
the lifecycle: every new version is `challenger`; `champion` is what production serves, moved
by the gate here or by a person in the MLflow UI.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from registry.pyfunc import SpeciesClassifierModel

CHAMPION, CHALLENGER = "champion", "challenger"
GATE_METRIC = "top1"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def register_model(name: str, artifacts: dict[str, Path], classes: list[str], image_size: int,
                   tags: dict[str, str]) -> ModelVersion:
    """Log the artifacts as one pyfunc model in the active run and register it as a new version
    of `name`, tagged with each artifact's sha256 and `tags`, and aliased `challenger`."""
    info = mlflow.pyfunc.log_model(
        name="classifier",
        python_model=SpeciesClassifierModel(),
        artifacts={key: str(path) for key, path in artifacts.items()},
        model_config={"classes": classes, "image_size": image_size},
        pip_requirements=[f"{p}=={package_version(p)}" for p in ("mlflow", "torch", "apache-tvm", "numpy")],
        registered_model_name=name,
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in {**tags, **{f"sha256.{k}": sha256(p) for k, p in artifacts.items()}}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return client.get_model_version(name, version)


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def load_model(name: str, alias: str = CHAMPION) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(f"models:/{name}@{alias}")


def promote(name: str, version: str) -> None:
    """Make `version` the champion: the same action as setting the alias in the MLflow UI."""
    MlflowClient().set_registered_model_alias(name, CHAMPION, str(version))


def gate(name: str, version: str, candidate: dict[str, float], champion: dict[str, float] | None) -> bool:
    """Promote `version` if it beats the champion's metrics on the same test split (or if there
    is no champion yet). Both sets of metrics and the decision are recorded on the version."""
    promoted = champion is None or candidate[GATE_METRIC] > champion[GATE_METRIC]
    client = MlflowClient()
    client.set_model_version_tag(name, version, "gate", json.dumps(
        {"metric": GATE_METRIC, "candidate": candidate, "champion": champion, "promoted": promoted}))
    if promoted:
        promote(name, version)
    return promoted
