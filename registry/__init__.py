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
from registry import signing
from registry.gate import GateDecision, decide
from registry.pyfunc import SpeciesClassifierModel
from registry.signing import UntrustedModelError

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTED_AT = "promoted_at"
GATE_TAG = "gate"  # the gate's decision, with its statistics, as JSON on each version
MANIFEST_TAG = "manifest"  # what was registered: name, version, run and every file's sha256, as JSON
SIGNATURE_TAG = "manifest.signature"  # the training tasks' signature of the manifest (registry/signing.py)


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


def register_model(
    settings: Settings, artifacts: dict[str, Path], model_config: dict, tags: dict[str, str], run: RunLog
) -> ModelVersion:
    """Log the artifacts as one pyfunc model in `run`, register it as a new version of the
    configured model, tagged with `tags` and its signed manifest, and alias it `challenger`.

    `model_config` holds `classes`, `image_size` and `tvm_llvm_target` (the CPU the library was
    built for)."""
    name = settings.registered_model_name
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=SpeciesClassifierModel(),
            artifacts={key: str(path) for key, path in artifacts.items()},
            model_config={"backend": "auto", **model_config},  # MLflow only overrides logged keys at load time
            pip_requirements=[f"{p}=={package_version(p)}" for p in ("mlflow", "torch", "apache-tvm", "numpy")],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    with tempfile.TemporaryDirectory(prefix="model-") as model, tempfile.TemporaryDirectory(prefix="warm-") as warm:
        # the files as stored, read back, each into a directory of its own (the model's may be it)
        files = file_hashes(Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=model)))
        weights = _run_artifact(info.run_id, WARM_START_ARTIFACT, Path(warm))
        manifest = {"name": name, "version": version, "run_id": info.run_id, "files": files}
        manifest["warm_start"] = sha256(weights) if weights else None
    client = MlflowClient()
    for key, value in {**tags, **_signed(settings, manifest)}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return client.get_model_version(name, version)


def _run_artifact(run_id: str, artifact_path: str, dst_dir: Path) -> Path | None:
    """A run's artifact, downloaded as stored; None when the run has none."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst_dir)))
    except (MlflowException, OSError):
        return None


def _signed(settings: Settings, manifest: dict) -> dict[str, str]:
    """The manifest and its signature, as the version's tags. A data directory with neither key
    file (the demo's first registration) gets a key made here; any other lack is an error."""
    key_file, trusted_file = settings.signing_key_file, settings.trusted_keys_file
    if not key_file.exists() and not trusted_file.exists():
        logger.info("created model-signing key %s at %s", signing.create_key(key_file, trusted_file), key_file)
    payload = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return {MANIFEST_TAG: payload, SIGNATURE_TAG: signing.sign(settings.signing_key_file, payload.encode())}


def verified_manifest(settings: Settings, version: ModelVersion) -> dict:
    """The version's manifest, once its signature is found to be a trusted key's and it names
    this very version; UntrustedModelError otherwise."""
    where = f"{version.name} v{version.version}"
    if MANIFEST_TAG not in version.tags or SIGNATURE_TAG not in version.tags:
        raise UntrustedModelError(f"{where} is not signed: only the training pipeline's register stage can serve a version")
    try:
        signing.verify(settings.trusted_keys_file, version.tags[MANIFEST_TAG].encode(), version.tags[SIGNATURE_TAG])
    except UntrustedModelError as error:
        raise UntrustedModelError(f"{where}: {error}") from None
    manifest = json.loads(version.tags[MANIFEST_TAG])
    if (manifest.get("name"), manifest.get("version")) != (version.name, str(version.version)):
        # a genuine manifest copied from another version onto this one
        raise UntrustedModelError(f"{where} carries the signed manifest of {manifest.get('name')} v{manifest.get('version')}")
    return manifest


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


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


def load_verified(settings: Settings, alias: str = CHAMPION, backend: str = "auto") -> ServedModel | None:
    """Download the version `alias` points at, check its signature, then that its files are
    exactly the signed ones (MLmodel and the pickle the loader runs included: none changed,
    added or missing), and only then load it; None when the alias is not set."""
    name = settings.registered_model_name
    version = version_by_alias(name, alias)
    if version is None:
        return None
    signed = verified_manifest(settings, version)["files"]
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        # the logged model itself (models:/NAME/N would add a metadata file of MLflow's own)
        local = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=tmp))
        actual = file_hashes(local)
        if changed := sorted(path for path in signed.keys() | actual.keys() if signed.get(path) != actual.get(path)):
            raise UntrustedModelError(f"{name} v{version.version}: {', '.join(changed)} differ from what was signed")
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
        served = load_verified(settings, CHAMPION)
    except UntrustedModelError as error:
        logger.warning("%s; candidates are judged as if there were no champion until one is promoted", error)
        return None
    return None if served is None else served.predict


def champion_weights(settings: Settings, dst_dir: Path) -> Path | None:
    """The trained (unpruned) weights behind the champion, from the run that made it, for a
    retrain to warm-start from, once they are found to be the ones its signed manifest names;
    None before the first champion, when its run kept none, and when they fail that check."""
    configure(settings)
    champion = version_by_alias(settings.registered_model_name, CHAMPION)
    if champion is None or not champion.run_id:
        return None
    try:
        signed = verified_manifest(settings, champion).get("warm_start")
        path = _run_artifact(champion.run_id, WARM_START_ARTIFACT, dst_dir) if signed else None
        if path is None:  # its run kept no weights
            return None
        if sha256(path) != signed:
            raise UntrustedModelError(f"{champion.name} v{champion.version}: {WARM_START_ARTIFACT} differs from what was signed")
    except UntrustedModelError as error:
        logger.warning("%s; the retrain starts from scratch", error)
        return None
    return path


def resign_versions(settings: Settings) -> list[str]:
    """Sign again, with the current key, every version whose signature a trusted key verifies
    (a key rotation's middle step); returns them. Versions that fail verification stay as they are."""
    client = MlflowClient()
    resigned = []
    for version in all_versions(settings.registered_model_name):
        try:
            manifest = verified_manifest(settings, version)
        except UntrustedModelError as error:
            logger.warning("%s; not signed again", error)
            continue
        for key, value in _signed(settings, manifest).items():
            client.set_model_version_tag(version.name, str(version.version), key, value)
        resigned.append(str(version.version))
    return resigned


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
    version = register_model(settings, compiled.artifacts, model_config, tags, run)
    decision = gate(settings.gate, name, version.version, evaluation)
    improvement = decision.checks.get("improvement", {})
    run.metrics({"gate_promoted": float(decision.promoted), **({"gate_p_value": improvement["p_value"]} if improvement else {})})
    return Registration(
        name=name, version=str(version.version), champion=decision.promoted, metrics=evaluation.metrics(), gate=decision
    )
