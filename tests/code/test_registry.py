import json
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from ml.compile import build_static, export
from ml.data import read_classes, read_split
from ml.model import SpeciesClassifier, build_coca
from ml.results import Evaluation
from ml.runtime import host_target
from ml.tracking import RunLog
from registry import (
    CHALLENGER,
    CHAMPION,
    FILES_TAG,
    ChecksumError,
    champion_predict_fn,
    champion_weights,
    gate,
    load_verified,
    promote,
    register_model,
    rollback,
    sha256,
    version_by_alias,
)
from registry.__main__ import app
from tests.support import answers, register_tiny_model

CLASSES = ["a", "b", "c"]


@pytest.fixture
def artifacts(tmp_path):
    torch.manual_seed(0)
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), CLASSES).eval()
    path = tmp_path / "model.pt2"
    torch.export.save(export(model), path)
    return model, {"exported": path}


LABELS = [i % len(CLASSES) for i in range(60)]


def _lab(right: int) -> dict:
    """Lab-slice answers of a model that gets the first `right` of 60 images right."""
    return {"lab": answers(LABELS, [i < right for i in range(len(LABELS))], len(CLASSES))}


def _register(settings, artifacts, right: int, champion_right: int | None = None):
    model_config, run = {"classes": CLASSES, "image_size": 64}, RunLog.start(settings, run_name="test")
    version = register_model(settings.registered_model_name, artifacts, model_config, {"dataset_digest": "d1"}, run)
    champion = None if champion_right is None else _lab(champion_right)
    evaluation = Evaluation(candidate=_lab(right), baseline=champion, classes=CLASSES, image_size=64)
    return version, gate(settings.gate, settings.registered_model_name, version.version, evaluation).promoted


def test_first_version_becomes_champion_and_carries_hashes(settings, artifacts):
    model, files = artifacts
    version, promoted = _register(settings, files, 30)
    assert promoted
    name = settings.registered_model_name
    assert version_by_alias(name, CHAMPION).version == version.version
    assert version_by_alias(name, CHALLENGER).version == version.version
    tags = MlflowClient().get_model_version(name, version.version).tags
    registered = json.loads(tags[FILES_TAG])  # every file of the logged model, the pickle and MLmodel included
    assert {"MLmodel", "python_model.pkl"} <= registered.keys() and tags["dataset_digest"] == "d1"
    assert sha256(files["exported"]) in registered.values()
    batch = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").predict(batch)  # MLflow's own loader
    with torch.inference_mode():
        assert np.allclose(served, model(torch.from_numpy(batch)).numpy(), atol=1e-5)


def test_champion_kept_when_challenger_is_worse(settings, artifacts):
    _, files = artifacts
    first, _ = _register(settings, files, 48)
    second, promoted = _register(settings, files, 36, champion_right=48)
    name = settings.registered_model_name
    assert not promoted
    assert version_by_alias(name, CHAMPION).version == first.version
    assert version_by_alias(name, CHALLENGER).version == second.version
    decision = json.loads(MlflowClient().get_model_version(name, second.version).tags["gate"])
    assert decision["promoted"] is False and decision["checks"]["improvement"]["losses"] == 12
    third, promoted = _register(settings, files, 58, champion_right=48)  # 10 won, 0 lost
    assert promoted and version_by_alias(name, CHAMPION).version == third.version


def test_no_champion_is_none(settings):
    mlflow.set_tracking_uri(settings.tracking_uri)
    assert version_by_alias("nothing-here", CHAMPION) is None


def test_a_retrain_warm_starts_from_the_weights_of_the_run_that_made_the_champion(settings, tmp_path):
    assert champion_weights(settings, tmp_path / "none") is None  # no champion yet
    version = register_tiny_model(read_classes(settings.base_dataset_dir), seed=0)
    assert champion_weights(settings, tmp_path / "kept-none") is None  # its run kept no weights
    run_id = MlflowClient().get_model_version(settings.registered_model_name, version).run_id
    saved = tmp_path / "weights.pt"
    torch.save({"classes": ["a"], "state_dict": {}}, saved)
    RunLog.of(settings, run_id).artifact(saved, "train")
    downloaded = champion_weights(settings, tmp_path / "warm")
    assert downloaded.is_relative_to(tmp_path / "warm")
    assert torch.load(downloaded, weights_only=True)["classes"] == ["a"]


def test_list_shows_aliases_and_promote_moves_champion(settings, artifacts):
    _, files = artifacts
    _register(settings, files, 48)
    _register(settings, files, 30, champion_right=48)
    runner = CliRunner()
    listing = runner.invoke(app, ["list"]).stdout
    assert "v1" in listing and "champion" in listing.splitlines()[0] and "challenger" in listing.splitlines()[1]
    assert runner.invoke(app, ["promote", "2"]).exit_code == 0
    assert "champion" in runner.invoke(app, ["list"]).stdout.splitlines()[1]


def test_load_verified_serves_eager_and_refuses_any_file_changed_or_added_after_registration(settings, artifacts, caplog):
    _, files = artifacts
    version, _ = _register(settings, files, 48)
    served = load_verified(settings.registered_model_name)
    assert (served.version, served.backend, served.model.classes) == (str(version.version), "torch-eager", CLASSES)
    assert served.predict(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, len(CLASSES))
    logged_model = mlflow.get_logged_model(version.source.removeprefix("models:/"))
    stored = Path(urlparse(logged_model.artifact_location).path)
    for path in ("MLmodel", "python_model.pkl"):  # what the loader reads and unpickles, altered after registration
        original = (stored / path).read_bytes()
        (stored / path).write_bytes(original + b"\n")
        with pytest.raises(ChecksumError, match=path):
            load_verified(settings.registered_model_name)
        # evaluate's way to the champion: judged as if there were none, which the log says, so
        # that a champion nobody can trust does not stop every retrain that would replace it
        assert champion_predict_fn(settings) is None and path in caplog.text
        (stored / path).write_bytes(original)
    (stored / "artifacts" / "extra.py").write_text("print('not registered')")
    with pytest.raises(ChecksumError, match=r"extra\.py"):
        load_verified(settings.registered_model_name)


def test_rollback_returns_champion_to_the_previous_one(settings, artifacts):
    _, files = artifacts
    name = settings.registered_model_name
    _register(settings, files, 48)
    with pytest.raises(LookupError, match="promoted before v1"):
        rollback(name)
    _register(settings, files, 58, champion_right=48)
    assert str(version_by_alias(name, CHAMPION).version) == "2"
    assert CliRunner().invoke(app, ["rollback"]).exit_code == 0
    assert str(version_by_alias(name, CHAMPION).version) == "1"


def test_a_version_with_a_tvm_library_for_this_cpu_is_served_by_tvm(settings, artifacts, tmp_path):
    model, files = artifacts
    untuned = settings.compile.model_copy(update={"tuning_trials": 0})
    files = {**files, "tvm_llvm_b1": build_static(model, 1, untuned, tmp_path / "tuning", tmp_path / "b1.so")}
    model_config = {"classes": CLASSES, "image_size": 64, "tvm_llvm_target": host_target()}
    register_model(settings.registered_model_name, files, model_config, {}, RunLog.start(settings, run_name="test"))
    promote(settings.registered_model_name, "1")
    served = load_verified(settings.registered_model_name)
    assert served.backend == "tvm-llvm"
    batch = np.random.default_rng(2).random((3, 3, 64, 64), dtype=np.float32)  # 3 images through the batch-1 library
    with torch.inference_mode():
        assert np.abs(served.predict(batch) - model(torch.from_numpy(batch)).numpy()).max() < 1e-4
    assert load_verified(settings.registered_model_name, backend="eager").backend == "torch-eager"


def test_a_version_with_a_cuda_library_for_the_gpu_present_is_served_by_tvm_cuda(settings, artifacts, monkeypatch):
    """The library itself needs a GPU to load: here a stand-in takes its place, and the real
    fallback (no GPU on this machine) is checked first."""
    import registry.pyfunc

    _, files = artifacts
    library = files["exported"].with_name("model_cuda_sm_80.so")
    library.write_bytes(b"a CUDA library")
    model_config = {"classes": CLASSES, "image_size": 64}
    register_model(
        settings.registered_model_name, {**files, "tvm_cuda_sm_80": library}, model_config, {}, RunLog.start(settings, "cuda")
    )
    promote(settings.registered_model_name, "1")
    assert load_verified(settings.registered_model_name).backend == "torch-eager"  # no GPU here

    class StandIn:
        def __init__(self, path):
            self.library = Path(path).read_bytes()

        def __call__(self, batch):
            return np.zeros((len(batch), len(CLASSES)), np.float32)

    monkeypatch.setattr(registry.pyfunc, "gpu_arch", lambda: "sm_80")
    monkeypatch.setattr(registry.pyfunc, "CudaClassifier", StandIn)
    served = load_verified(settings.registered_model_name)
    assert (served.backend, served.model._run.library) == ("tvm-cuda", b"a CUDA library")
    assert load_verified(settings.registered_model_name, backend="eager").backend == "torch-eager"
    monkeypatch.setattr(registry.pyfunc, "gpu_arch", lambda: "sm_90")  # a GPU the version was not built for
    assert load_verified(settings.registered_model_name).backend == "torch-eager"


def test_register_scores_the_champion_when_the_evaluation_did_not(settings, tmp_path):
    """`python -m ml.evaluate` knows no champion; the gate must still compare with it."""
    from ml.results import CompileResult, ValidationSummary
    from registry import register

    classes, labels = (
        read_classes(settings.base_dataset_dir),
        [label for _, label in read_split(settings.base_dataset_dir, "test")],
    )
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), classes).eval()
    torch.export.save(export(model), tmp_path / "model.pt2")
    files = {"exported": tmp_path / "model.pt2"}
    _register(settings, files, 48)
    dataset = ValidationSummary(
        dataset_dir=settings.base_dataset_dir, digest="d", num_images=40, num_classes=4, report_path=tmp_path
    )
    registration = register(
        settings,
        compiled=CompileResult(artifacts=files, llvm_target=host_target(), max_abs_diff=0.0, top1_agreement=1.0),
        evaluation=Evaluation(
            candidate={"lab": answers(labels, [False] * len(labels), len(classes))}, baseline=None, classes=classes, image_size=64
        ),
        dataset=dataset,
        run=RunLog.start(settings, run_name="test"),
    )
    decision = json.loads(MlflowClient().get_model_version(settings.registered_model_name, registration.version).tags["gate"])
    assert not registration.champion and decision["improvement_slice"] == "lab"
    assert decision["checks"]["improvement"]["wins"] == 0  # scored against the champion's answers
    assert str(version_by_alias(settings.registered_model_name, CHAMPION).version) == "1"
