"""The MLflow model registry, as the rest of the platform uses it.

A model version bundles the exported eager model (`model.pt2`, torch.export: loadable without
any training code) and the TVM libraries, each with its sha256 as a version tag. Aliases carry
the lifecycle: every new version is `challenger`; `champion` is what production serves, moved
by the gate (registry/gate.py) or by a person in the MLflow UI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from config import GateConfig, Settings
from ml.results import WARM_START_ARTIFACT, CompileResult, Evaluation, ValidationSummary
from ml.runtime import PredictFn
from ml.tracking import RunLog, configure
from registry.gate import GateDecision, decide
from registry.pyfunc import SpeciesClassifierModel

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTED_AT = "promoted_at"
GATE_TAG = "gate"  # the gate's decision, with its statistics, as JSON on each version
FILES_TAG = "sha256.files"  # {path: sha256} of every file of a version's logged model, as JSON


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """Every file under `root` (a logged model: MLmodel, the pickled model, the artifacts) by
    its path there, with its sha256."""
    return {path.relative_to(root).as_posix(): sha256(path) for path in sorted(root.rglob("*")) if path.is_file()}


def register_model(name: str, artifacts: dict[str, Path], model_config: dict, tags: dict[str, str], run: RunLog) -> ModelVersion:
    """Log the artifacts as one pyfunc model in `run` and register it as a new version of
    `name`, tagged with `tags` and the sha256 of every file of the logged model (`FILES_TAG`),
    and aliased `challenger`.

    `model_config` holds `classes`, `image_size` and `tvm_llvm_target` (the CPU the library was
    built for)."""
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=SpeciesClassifierModel(),
            artifacts={key: str(path) for key, path in artifacts.items()},
            model_config={"backend": "auto", **model_config},  # MLflow only overrides logged keys at load time
            pip_requirements=[f"{p}=={package_version(p)}" for p in ("mlflow", "torch", "apache-tvm", "numpy")],
            registered_model_name=name,
        )
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:  # the files as stored, read back
        logged = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=tmp))
        files = json.dumps(file_hashes(logged), sort_keys=True)
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in {**tags, FILES_TAG: files}.items():
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


class ChecksumError(RuntimeError):
    """A downloaded artifact is not the file that was registered."""


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    model: SpeciesClassifierModel

    @property
    def backend(self) -> str:
        return self.model.backend

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.model.predict(None, batch)


def load_verified(name: str, alias: str = CHAMPION, backend: str = "auto") -> ServedModel | None:
    """Download the version `alias` points at, check that its files are exactly the ones
    registered (MLmodel and the pickle the loader runs included: none changed, added or
    missing), and load it; None when the alias is not set."""
    version = version_by_alias(name, alias)
    if version is None:
        return None
    if FILES_TAG not in version.tags:
        raise ChecksumError(f"{name} v{version.version} has no registered file hashes: register it again to serve it")
    registered = json.loads(version.tags[FILES_TAG])
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        # the logged model itself (models:/NAME/N would add a metadata file of MLflow's own)
        local = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=tmp))
        actual = file_hashes(local)
        if changed := sorted(path for path in registered.keys() | actual.keys() if registered.get(path) != actual.get(path)):
            raise ChecksumError(f"{name} v{version.version}: {', '.join(changed)} differ from what was registered")
        pyfunc = mlflow.pyfunc.load_model(str(local), model_config={"backend": backend})
        return ServedModel(name, str(version.version), pyfunc.unwrap_python_model())


def all_versions(name: str) -> list[ModelVersion]:
    """Every version, oldest first; fetched one by one because search results leave `aliases` empty."""
    client = MlflowClient()
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return [client.get_model_version(name, str(n)) for n in numbers]


def gate_summary(version: ModelVersion) -> str:
    """The gate's decision on a version, in a line ("" when no gate ran)."""
    if GATE_TAG not in version.tags:
        return ""
    decision = GateDecision.model_validate_json(version.tags[GATE_TAG])
    gain = decision.checks.get("improvement")
    if gain is None:
        return "gate: first model"
    verdict = "promoted" if decision.promoted else "kept the champion"
    return f"gate: {verdict} ({decision.improvement_slice} {gain['wins']} won/{gain['losses']} lost, p={gain['p_value']:.3g})"


def promote(name: str, version: str) -> None:
    """Make `version` the champion: the same action as setting the alias in the MLflow UI. The
    time is tagged on the version, so `rollback` can find the champion before it."""
    client = MlflowClient()
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), PROMOTED_AT, datetime.now(UTC).isoformat())


def rollback(name: str) -> str:
    """Give `champion` back to the version promoted before the current champion; returns it."""
    current = version_by_alias(name, CHAMPION)
    if current is None:
        raise LookupError(f"{name} has no champion to roll back from")
    client = MlflowClient()
    since = current.tags.get(PROMOTED_AT, "~")  # unset (promoted in the UI): any earlier promotion
    earlier = [
        v
        for v in client.search_model_versions(f"name='{name}'")
        if str(v.version) != str(current.version) and v.tags.get(PROMOTED_AT, "") and v.tags[PROMOTED_AT] < since
    ]
    if not earlier:
        raise LookupError(
            f"no version of {name} was promoted before v{current.version} (promotions in the MLflow UI leave no "
            "record): promote one by number"
        )
    previous = max(earlier, key=lambda v: v.tags[PROMOTED_AT])
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    return str(previous.version)


def gate(cfg: GateConfig, name: str, version: str, evaluation: Evaluation) -> GateDecision:
    """Promote `version` if the gate (registry/gate.py) finds it better than the champion beyond
    noise; the decision and its statistics are recorded on the version either way."""
    decision = decide(evaluation.candidate, evaluation.baseline, cfg)
    MlflowClient().set_model_version_tag(name, version, GATE_TAG, decision.model_dump_json())
    if decision.promoted:
        promote(name, version)
    return decision


class Registration(BaseModel):
    name: str
    version: str
    champion: bool  # whether the gate promoted it
    metrics: dict[str, float]  # its `<slice>_<metric>` scores
    gate: GateDecision


def champion_predict_fn(settings: Settings) -> PredictFn | None:
    """The served champion as a batch -> logits function (checked like the service checks it),
    for scoring candidates against it; None before the first champion and for one that fails
    its check."""
    configure(settings)
    try:
        served = load_verified(settings.registered_model_name, CHAMPION)
    except ChecksumError as error:
        logger.warning("%s; candidates are judged as if there were no champion until one is promoted", error)
        return None
    return None if served is None else served.predict


def champion_weights(settings: Settings, dst_dir: Path) -> Path | None:
    """The trained (unpruned) weights behind the champion, from the run that made it, for a
    retrain to warm-start from; None before the first champion or when its run kept none."""
    configure(settings)
    champion = version_by_alias(settings.registered_model_name, CHAMPION)
    if champion is None or not champion.run_id:
        return None
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=champion.run_id, artifact_path=WARM_START_ARTIFACT, dst_path=str(dst_dir)
        )
    except (MlflowException, OSError):  # a version registered before runs kept their weights
        return None
    return Path(path)


def _with_champion_scores(settings: Settings, evaluation: Evaluation, dataset_dir: Path) -> Evaluation:
    """The gate compares with the champion: an evaluation made without it (the evaluate stage
    run from the shell) gets the champion's scores on the same slices here."""
    champion = champion_predict_fn(settings) if evaluation.baseline is None else None
    if champion is None:
        return evaluation
    from ml.evaluate import score

    baseline = score(champion, dataset_dir, evaluation.classes, evaluation.image_size)
    return evaluation.model_copy(update={"baseline": baseline})


def register(
    settings: Settings, *, compiled: CompileResult, evaluation: Evaluation, dataset: ValidationSummary, run: RunLog
) -> Registration:
    """The register stage: a new version of the configured model from the compile stage's
    artifacts, tagged with the dataset and the run it came from and the settings that made it;
    `challenger`, and `champion` when the gate promotes it."""
    name = settings.registered_model_name
    evaluation = _with_champion_scores(settings, evaluation, dataset.dataset_dir)
    model_config = {"classes": evaluation.classes, "image_size": evaluation.image_size, "tvm_llvm_target": compiled.llvm_target}
    trained_with = settings.model_dump(include={"model", "train", "prune", "compile"})
    tags = {
        "dataset_digest": dataset.digest,
        "dataset_dir": str(dataset.dataset_dir),
        "run_id": run.run_id,
        "config": json.dumps(trained_with, default=str),
    }
    version = register_model(name, compiled.artifacts, model_config, tags, run)
    decision = gate(settings.gate, name, version.version, evaluation)
    improvement = decision.checks.get("improvement", {})
    run.metrics({"gate_promoted": float(decision.promoted), **({"gate_p_value": improvement["p_value"]} if improvement else {})})
    return Registration(
        name=name, version=str(version.version), champion=decision.promoted, metrics=evaluation.metrics(), gate=decision
    )
