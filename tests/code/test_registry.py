import json
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from benchmarks.fixtures import register_tiny_model
from ml.compile import build_static, export
from ml.data import read_classes, read_split
from ml.model import SpeciesClassifier, build_coca
from ml.results import Evaluation
from ml.runtime import host_target
from ml.tracking import RunLog
from registry import (
    CHALLENGER,
    CHAMPION,
    MANIFEST_TAG,
    SIGNATURE_TAG,
    champion_predict_fn,
    champion_weights,
    gate,
    load_verified,
    promote,
    register_model,
    rollback,
    sha256,
    signing,
    version_by_alias,
)
from registry.__main__ import app
from registry.signing import UntrustedModelError
from tests.support import answers

CLASSES = ["a", "b", "c"]


def _tiny_files(tmp_path: Path) -> tuple[SpeciesClassifier, dict[str, Path]]:
    torch.manual_seed(0)
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), CLASSES).eval()
    path = tmp_path / "model.pt2"
    torch.export.save(export(model), path)
    return model, {"exported": path}


@pytest.fixture
def artifacts(tmp_path):
    return _tiny_files(tmp_path)


def _public_key(settings):
    return next(iter(signing.trusted_keys(settings.trusted_keys_file).values()))


LABELS = [i % len(CLASSES) for i in range(60)]


def _lab(right: int) -> dict:
    """Lab-slice answers of a model that gets the first `right` of 60 images right."""
    return {"lab": answers(LABELS, [i < right for i in range(len(LABELS))], len(CLASSES))}


def _register(settings, artifacts, right: int, champion_right: int | None = None):
    model_config, run = {"classes": CLASSES, "image_size": 64}, RunLog.start(settings, run_name="test")
    version = register_model(settings, artifacts, model_config, {"dataset_digest": "d1"}, run)
    champion = None if champion_right is None else _lab(champion_right)
    evaluation = Evaluation(candidate=_lab(right), baseline=champion, classes=CLASSES, image_size=64)
    return version, gate(settings.gate, settings.registered_model_name, version.version, evaluation).promoted


def test_first_version_becomes_champion_and_carries_its_signed_manifest(settings, artifacts):
    model, files = artifacts
    version, promoted = _register(settings, files, 30)
    assert promoted
    name = settings.registered_model_name
    assert version_by_alias(name, CHAMPION).version == version.version
    assert version_by_alias(name, CHALLENGER).version == version.version
    tags = MlflowClient().get_model_version(name, version.version).tags
    manifest = json.loads(tags[MANIFEST_TAG])
    assert (manifest["name"], manifest["version"], manifest["run_id"]) == (name, str(version.version), version.run_id)
    registered = manifest["files"]  # every file of the logged model, the pickle and MLmodel included
    assert tags[SIGNATURE_TAG].startswith(signing.key_id(_public_key(settings)))
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


def test_a_retrain_warm_starts_from_the_signed_weights_of_the_run_that_made_the_champion(settings, tmp_path, caplog):
    assert champion_weights(settings, tmp_path / "none") is None  # no champion yet
    register_tiny_model(read_classes(settings.base_dataset_dir), seed=0)
    assert champion_weights(settings, tmp_path / "kept-none") is None  # its run kept no weights
    run = RunLog.start(settings, run_name="with weights")
    saved = tmp_path / "weights.pt"
    torch.save({"classes": ["a"], "state_dict": {}}, saved)
    run.artifact(saved, "train")
    _, files = _tiny_files(tmp_path)
    version = register_model(settings, files, {"classes": CLASSES, "image_size": 64}, {}, run)
    promote(settings.registered_model_name, version.version)
    assert load_verified(settings).version == str(version.version)  # its weights are not taken for a file of the model
    downloaded = champion_weights(settings, tmp_path / "warm")
    assert downloaded.is_relative_to(tmp_path / "warm")
    assert torch.load(downloaded, weights_only=True)["classes"] == ["a"]
    torch.save({"classes": ["poisoned"], "state_dict": {}}, saved)  # the run's weights replaced after signing
    run.artifact(saved, "train")
    assert champion_weights(settings, tmp_path / "poisoned") is None
    assert "train/weights.pt differs from what was signed" in caplog.text


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
    served = load_verified(settings)
    assert (served.version, served.backend, served.model.classes) == (str(version.version), "torch-eager", CLASSES)
    assert served.predict(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, len(CLASSES))
    logged_model = mlflow.get_logged_model(version.source.removeprefix("models:/"))
    stored = Path(urlparse(logged_model.artifact_location).path)
    for path in ("MLmodel", "python_model.pkl"):  # what the loader reads and unpickles, altered after registration
        original = (stored / path).read_bytes()
        (stored / path).write_bytes(original + b"\n")
        with pytest.raises(UntrustedModelError, match=path):
            load_verified(settings)
        # evaluate's way to the champion: judged as if there were none, which the log says, so
        # that a champion nobody can trust does not stop every retrain that would replace it
        assert champion_predict_fn(settings) is None and path in caplog.text
        (stored / path).write_bytes(original)
    (stored / "artifacts" / "extra.py").write_text("print('not registered')")
    with pytest.raises(UntrustedModelError, match=r"extra\.py"):
        load_verified(settings)


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
    register_model(settings, files, model_config, {}, RunLog.start(settings, run_name="test"))
    promote(settings.registered_model_name, "1")
    served = load_verified(settings)
    assert served.backend == "tvm-llvm"
    batch = np.random.default_rng(2).random((3, 3, 64, 64), dtype=np.float32)  # 3 images through the batch-1 library
    with torch.inference_mode():
        assert np.abs(served.predict(batch) - model(torch.from_numpy(batch)).numpy()).max() < 1e-4
    assert load_verified(settings, backend="eager").backend == "torch-eager"


def test_a_version_with_a_cuda_library_for_the_gpu_present_is_served_by_tvm_cuda(settings, artifacts, monkeypatch):
    """The library itself needs a GPU to load: here a stand-in takes its place, and the real
    fallback (no GPU on this machine) is checked first."""
    import registry.pyfunc

    _, files = artifacts
    library = files["exported"].with_name("model_cuda_sm_80.so")
    library.write_bytes(b"a CUDA library")
    model_config = {"classes": CLASSES, "image_size": 64}
    register_model(settings, {**files, "tvm_cuda_sm_80": library}, model_config, {}, RunLog.start(settings, "cuda"))
    promote(settings.registered_model_name, "1")
    assert load_verified(settings).backend == "torch-eager"  # no GPU here

    class StandIn:
        def __init__(self, path):
            self.library = Path(path).read_bytes()

        def __call__(self, batch):
            return np.zeros((len(batch), len(CLASSES)), np.float32)

    monkeypatch.setattr(registry.pyfunc, "gpu_arch", lambda: "sm_80")
    monkeypatch.setattr(registry.pyfunc, "CudaClassifier", StandIn)
    served = load_verified(settings)
    assert (served.backend, served.model._run.library) == ("tvm-cuda", b"a CUDA library")
    assert load_verified(settings, backend="eager").backend == "torch-eager"
    monkeypatch.setattr(registry.pyfunc, "gpu_arch", lambda: "sm_90")  # a GPU the version was not built for
    assert load_verified(settings).backend == "torch-eager"


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


def test_a_version_signed_by_another_key_or_carrying_another_versions_manifest_is_refused(settings, artifacts, tmp_path, caplog):
    _, files = artifacts
    _register(settings, files, 48)
    _register(settings, files, 58, champion_right=48)  # v2, the champion
    name, client = settings.registered_model_name, MlflowClient()
    assert load_verified(settings).version == "2"
    genuine = client.get_model_version(name, "2").tags
    signing.create_key(tmp_path / "other.key", tmp_path / "other.pub")  # a key of someone's own
    client.set_model_version_tag(name, "2", SIGNATURE_TAG, signing.sign(tmp_path / "other.key", genuine[MANIFEST_TAG].encode()))
    with pytest.raises(UntrustedModelError, match=f"{name} v2: signed by key .* which is not in"):
        load_verified(settings)
    assert champion_predict_fn(settings) is None and f"{name} v2" in caplog.text
    for key in (MANIFEST_TAG, SIGNATURE_TAG):  # v1's genuine manifest and signature, copied onto v2
        client.set_model_version_tag(name, "2", key, client.get_model_version(name, "1").tags[key])
    with pytest.raises(UntrustedModelError, match=f"{name} v2 carries the signed manifest of {name} v1"):
        load_verified(settings)
    client.delete_model_version_tag(name, "2", SIGNATURE_TAG)
    with pytest.raises(UntrustedModelError, match="is not signed"):
        load_verified(settings)


def test_signing_key_create_keeps_an_existing_key_that_only_its_owner_reads(settings):
    runner = CliRunner()
    first, again = (runner.invoke(app, ["signing-key", "create"]) for _ in range(2))
    assert first.exit_code == again.exit_code == 0 and first.stdout == again.stdout
    assert settings.signing_key_file.stat().st_mode & 0o777 == 0o600
    assert list(signing.trusted_keys(settings.trusted_keys_file)) == [first.stdout.split()[2].rstrip(":")]


def test_rotating_the_signing_key_signs_trusted_versions_again_and_then_trusts_only_the_new_key(settings, artifacts, tmp_path):
    _, files = artifacts
    _register(settings, files, 48)
    old_key = signing.key_id(_public_key(settings))
    rotated = CliRunner().invoke(app, ["signing-key", "rotate"])
    assert rotated.exit_code == 0, rotated.output
    (new_key,) = signing.trusted_keys(settings.trusted_keys_file)
    assert new_key != old_key and "signed again: v1" in rotated.stdout
    assert MlflowClient().get_model_version(settings.registered_model_name, "1").tags[SIGNATURE_TAG].startswith(new_key)
    assert load_verified(settings).version == "1"
    version, _ = _register(settings, files, 58, champion_right=48)  # signed with the new key from now on
    assert load_verified(settings).version == str(version.version)
