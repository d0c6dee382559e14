import copy
import shutil

import numpy as np
import pytest
import torch

from ml.compile import ParityError, build, build_static, check_parity, cuda_kernel_source, export, to_relax
from ml.model import SpeciesClassifier, build_coca
from ml.prune import count_macs, prune_mlp_channels
from ml.runtime import CompiledClassifier


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), ["a", "b", "c", "d"]).eval()


def test_pruning_removes_mlp_channels_and_keeps_the_model_working(tiny_model):
    model = copy.deepcopy(tiny_model)
    macs_before, params_before = count_macs(model)
    prune_mlp_channels(model, 0.5)
    macs_after, params_after = count_macs(model)
    hidden = {block.mlp.c_fc.out_features for block in model.visual.transformer.resblocks}
    assert hidden == {384}  # 768 * 0.5
    assert macs_after < 0.75 * macs_before and params_after < params_before
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 4)


def test_tvm_llvm_build_matches_eager(tiny_model, tiny_dataset, tmp_path, settings):
    untuned = settings.compile.model_copy(update={"tuning_trials": 0})
    compiled = CompiledClassifier({b: build_static(tiny_model, b, untuned, tmp_path / "tuning", tmp_path / f"b{b}.so") for b in (1, 2)})
    batch = np.random.default_rng(0).random((5, 3, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        eager = tiny_model(torch.from_numpy(batch)).numpy()
    assert np.abs(compiled(batch) - eager).max() < 1e-4  # 5 images: chunks of 2, 2 and a padded 1
    max_diff, agreement = check_parity(tiny_model, compiled, tiny_dataset, settings.compile)
    assert max_diff < 1e-3 and agreement == 1.0


@pytest.mark.slow
def test_tuning_records_are_kept_and_reused_for_the_same_shapes(tiny_model, tmp_path, settings):
    cfg = settings.compile.model_copy(update={"tuning_trials": 16})
    tuning = tmp_path / "tuning"
    library = build_static(tiny_model, 1, cfg, tuning, tmp_path / "first.so")
    records = (tuning / "database_tuning_record.json").read_text()
    assert records.count("\n") >= 8  # measured candidates were recorded
    x = np.random.default_rng(1).random((1, 3, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        assert np.abs(CompiledClassifier({1: library})(x) - tiny_model(torch.from_numpy(x)).numpy()).max() < 1e-4
    torch.manual_seed(1)  # a retrained model: other weights, same shapes
    retrained = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), ["a", "b", "c", "d"]).eval()
    build_static(retrained, 1, cfg, tuning, tmp_path / "again.so")
    assert (tuning / "database_tuning_record.json").read_text() == records  # nothing tuned the second time


def test_parity_check_fails_on_a_different_model(tiny_model, tiny_dataset, settings):
    def wrong(batch):
        return np.zeros((len(batch), 4), dtype=np.float32)

    with pytest.raises(ParityError, match="max"):
        check_parity(tiny_model, wrong, tiny_dataset, settings.compile)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA cross-compilation needs nvcc")
def test_cuda_cross_compile_carries_kernels_for_the_arch(tiny_model, tmp_path):
    executable = build(to_relax(export(tiny_model)), {"kind": "cuda", "arch": "sm_80"})
    source = cuda_kernel_source(executable.mod)
    assert "__global__" in source
    executable.export_library(str(tmp_path / "model_cuda.so"))
    assert (tmp_path / "model_cuda.so").stat().st_size > 0
