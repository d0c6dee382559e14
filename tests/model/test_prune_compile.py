import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tvm.s_tir import meta_schedule as ms
from tvm_ffi import structural_hash

from config import CompileConfig, ModelConfig, PruneConfig, SyntheticDataConfig
from ml.compile import (
    ParityError,
    build_cuda,
    build_cuda_libraries,
    build_static,
    check_parity,
    cuda_kernel_source,
    cuda_target,
    export,
    fused_kernels,
    host_tvm_target,
    to_relax,
)
from ml.compile.tuning import SHIPPED_BATCH_SIZES, SHIPPED_RECORDS, keep_best, new_tasks
from ml.model import SelfAttention, SpeciesClassifier, build_coca
from ml.prune import count_flops, make_heads_prunable, prune_structure, recovery_finetune
from ml.runtime import CompiledClassifier, aligned_zeros
from ml.train.classifier import distillation_loss


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), ["a", "b", "c", "d"]).eval()


def test_head_prunable_attention_computes_what_multihead_attention_did(tiny_model):
    model = copy.deepcopy(tiny_model)
    images = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        before = model(images)
        make_heads_prunable(model)
        after = model(images)
    assert all(isinstance(block.attn, SelfAttention) for block in model.visual.transformer.resblocks)
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_pruning_removes_mlp_channels_and_heads_and_keeps_the_model_working(tiny_model, tiny_dataset, settings, importance):
    model = copy.deepcopy(tiny_model)
    flops_before, params_before = count_flops(model)
    prune_structure(model, settings.prune.model_copy(update={"importance": importance}), tiny_dataset)
    flops_after, params_after = count_flops(model)
    blocks = model.visual.transformer.resblocks
    assert {block.mlp.c_fc.out_features for block in blocks} == {384}  # 768 * 0.5
    assert {(block.attn.num_heads, block.attn.qkv.out_features, block.attn.proj.in_features) for block in blocks} == {
        (2, 384, 128)
    }
    assert flops_after < 0.6 * flops_before and params_after < params_before
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 4)
    assert all(p.grad is None for p in model.parameters())  # Taylor's gradients are not left behind


def test_recovery_finetune_gives_the_same_weights_whatever_the_random_state(tiny_model, tiny_dataset, settings, tmp_path):
    cfg = settings.prune.model_copy(update={"finetune_epochs": 1})
    weights = []
    for attempt in range(2):
        torch.rand(attempt + 1)  # the process's random state differs between the two
        model = copy.deepcopy(tiny_model)
        prune_structure(model, cfg)
        recovery_finetune(model, tiny_model, tiny_dataset, settings, tmp_path / str(attempt))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_distillation_loss_is_zero_only_when_the_student_matches_the_teacher():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    assert distillation_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_loss(torch.tensor([[0.0, 2.0, -1.0]]), teacher).item() > 0.1


def test_pruned_model_compiles_and_matches_eager(tiny_model, tiny_dataset, tmp_path, settings):
    model = copy.deepcopy(tiny_model)
    prune_structure(model, settings.prune, tiny_dataset)
    untuned = settings.compile.model_copy(update={"tuning_trials": 0})
    compiled = CompiledClassifier({1: build_static(model.eval(), 1, untuned, tmp_path / "tuning", tmp_path / "b1.so")})
    max_diff, agreement = check_parity(model, compiled, tiny_dataset, settings.compile)
    assert max_diff < 1e-4 and agreement == 1.0


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 3, 7, 5), (1,)])
def test_aligned_zeros_start_where_tvm_takes_them_without_a_copy(shape):
    import tvm

    images = aligned_zeros(shape)
    assert images.shape == shape and images.dtype == np.float32 and not images.any()
    assert images.ctypes.data % 64 == 0
    tvm.runtime.from_dlpack(images)  # refuses arrays that are not 64-byte aligned


def test_tvm_llvm_build_matches_eager(tiny_model, tiny_dataset, tmp_path, settings):
    untuned = settings.compile.model_copy(update={"tuning_trials": 0})
    compiled = CompiledClassifier(
        {b: build_static(tiny_model, b, untuned, tmp_path / "tuning", tmp_path / f"b{b}.so") for b in (1, 2)}
    )
    batch = np.random.default_rng(0).random((5, 3, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        eager = tiny_model(torch.from_numpy(batch)).numpy()
    assert np.abs(compiled(batch) - eager).max() < 1e-4  # 5 images: chunks of 2, 2 and a padded 1
    max_diff, agreement = check_parity(tiny_model, compiled, tiny_dataset, settings.compile)
    assert max_diff < 1e-3 and agreement == 1.0


def test_compiled_classifier_runs_tvm_on_every_physical_core(tiny_model, tmp_path, settings):
    """TVM alone would take half the logical CPUs: one of this machine's two cores."""
    import psutil

    library = build_static(
        tiny_model, 1, settings.compile.model_copy(update={"tuning_trials": 0}), tmp_path / "tuning", tmp_path / "b1.so"
    )
    threads_after_load = (
        f"import tvm_ffi; from ml.runtime import CompiledClassifier; CompiledClassifier({{1: {str(library)!r}}}); "
        "print(tvm_ffi.get_global_func('runtime.NumThreads')())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", threads_after_load], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == psutil.cpu_count(logical=False)


def test_only_kernels_with_weights_get_layout_free_buffers(tiny_model):
    """Weights may be prepacked into the order a schedule reads them; a kernel without weights keeps
    its plain form, so records tuned before prepacking still match it."""
    import tvm

    kernels = fused_kernels(to_relax(export(tiny_model, 1)), host_tvm_target())
    prim_funcs = {gvar.name_hint: func for gvar, func in kernels.functions.items() if isinstance(func, tvm.tirx.PrimFunc)}
    marked = {name for name, func in prim_funcs.items() if "layout_free_buffers" in func.attrs}
    assert all(list(prim_funcs[name].attrs["layout_free_buffers"]) for name in marked)
    assert any(name.startswith("fused_matmul") for name in marked) and any(name.startswith("conv2d") for name in marked)
    assert any(name.startswith("reshape") for name in set(prim_funcs) - marked)


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
    kernels = {gvar.name_hint for gvar in fused_kernels(to_relax(export(tiny_model, 1)), host_tvm_target()).get_global_vars()}
    called = kernels_called(library, x)
    assert any(name.endswith("_prepacked") for name in called)  # tuned kernels read their weights prepacked
    assert {name.removesuffix("_prepacked") for name in called} <= kernels  # no weight rewrite runs per call
    torch.manual_seed(1)  # a retrained model: other weights, same shapes
    retrained = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), ["a", "b", "c", "d"]).eval()
    build_static(retrained, 1, cfg, tuning, tmp_path / "again.so")
    assert (tuning / "database_tuning_record.json").read_text() == records  # nothing tuned the second time


def kernels_called(library, x: np.ndarray) -> set[str]:
    """The TIR kernels one call of the library's `main` runs."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    called = set()
    vm.set_instrument(lambda func, symbol, before_run, *rest: called.add(str(symbol)) or 0)
    vm["main"](tvm.runtime.tensor(x))
    return {name for name in called if not name.startswith("vm.builtin.")}


def test_shipped_records_cover_every_kernel_of_the_default_pruned_model():
    """Fails when the default model config, pruning ratios or class count change without
    regenerating ml/compile/records (python -m ml.compile.tuning), at the pipeline's batch sizes
    and the benchmark's."""
    torch.manual_seed(0)
    classes = [f"class {i}" for i in range(SyntheticDataConfig().num_classes)]
    model = SpeciesClassifier.from_coca(build_coca(ModelConfig().name), classes).eval()
    prune_structure(model, PruneConfig(importance="magnitude"))
    target = host_tvm_target()
    shipped = ms.database.JSONDatabase(work_dir=str(SHIPPED_RECORDS), allow_missing=False)
    for batch in {*CompileConfig().batch_sizes, *SHIPPED_BATCH_SIZES}:
        kernels = fused_kernels(to_relax(export(model, batch)), target)
        assert new_tasks(ms.relax_integration.extract_tasks(kernels, target), [shipped]) == []


def test_regenerated_records_keep_only_the_kernels_asked_for(tmp_path):
    """`python -m ml.compile.tuning` ships the records of the kernels the models have today, not
    those of kernels an older model or compile pipeline had."""
    shipped = ms.database.JSONDatabase(work_dir=str(SHIPPED_RECORDS), allow_missing=False)
    wanted = structural_hash(shipped.get_all_tuning_records()[0].workload.mod)
    assert keep_best([shipped], {wanted}, tmp_path) == 1
    kept = ms.database.JSONDatabase(work_dir=str(tmp_path)).get_all_tuning_records()
    assert [structural_hash(record.workload.mod) for record in kept] == [wanted]


def test_regenerated_records_keep_the_fastest_schedule_of_each_kernel(tmp_path):
    shipped = ms.database.JSONDatabase(work_dir=str(SHIPPED_RECORDS), allow_missing=False)
    record = shipped.get_all_tuning_records()[0]
    (tmp_path / "found").mkdir()
    found = ms.database.JSONDatabase(work_dir=str(tmp_path / "found"))
    workload = found.commit_workload(record.workload.mod)
    for seconds in (3e-5, 1e-5, 2e-5):  # three schedules measured for one kernel
        found.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, [seconds], record.target, record.args_info))
    assert keep_best([found], {structural_hash(record.workload.mod)}, tmp_path / "best") == 1
    kept = ms.database.JSONDatabase(work_dir=str(tmp_path / "best")).get_all_tuning_records()
    assert [[float(s) for s in k.run_secs] for k in kept] == [[1e-5]]


def test_parity_check_fails_on_a_different_model(tiny_model, tiny_dataset, settings):
    def wrong(batch):
        return np.zeros((len(batch), 4), dtype=np.float32)

    with pytest.raises(ParityError, match="max"):
        check_parity(tiny_model, wrong, tiny_dataset, settings.compile)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA cross-compilation needs nvcc")
def test_cuda_cross_compile_carries_kernels_for_the_arch_and_each_weight_once(tiny_model, tmp_path):
    """TVM's PyTorch frontend broadcast weights over the batch, and constant folding stored a copy
    per image: the library was 138 MB for 8 MB of weights."""
    executable = build_cuda(to_relax(export(tiny_model), unbroadcast_matmuls=True), cuda_target("sm_80"))
    assert "__global__" in cuda_kernel_source(executable.mod)
    library = build_cuda_libraries(export(tiny_model), ["sm_80"], tmp_path)["sm_80"]
    weights = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    assert library.stat().st_size < 2 * weights


def test_matmuls_without_spelled_out_batch_broadcasts_compute_the_same(tiny_model):
    import tvm
    from tvm import relax

    images = torch.rand(8, 3, 64, 64)
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        kernels = relax.get_pipeline("zero")(to_relax(export(tiny_model, 8), unbroadcast_matmuls=True))
    main = relax.VirtualMachine(relax.build(kernels, target=target), tvm.cpu())["main"]
    with torch.inference_mode():
        expected = tiny_model(images).numpy()
    assert np.abs(main(tvm.runtime.tensor(images.numpy()))[0].numpy() - expected).max() < 1e-4
