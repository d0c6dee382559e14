"""The compile stage: the classifier through TVM Relax, torch.export -> Relax -> a shared library
per target (`python -m ml.compile --model pruned.pt --out-dir D`).

The llvm build targets the host CPU (`ml.runtime.host_target`) and is checked against eager
PyTorch on validation images. CUDA builds are cross-compiled whenever nvcc is on PATH; without a
GPU they are checked by the kernels they carry.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from config import CompileConfig, Settings
from ml.evaluate import collect_logits
from ml.model import load_classifier
from ml.results import CompileResult
from ml.runtime import (
    EXPORTED_KEY,
    CompiledClassifier,
    claim_tvm_threads,
    cuda_key,
    eager_predict_fn,
    host_target,
    llvm_key,
)
from ml.tracking import NO_RUN, RunLog


class ParityError(RuntimeError):
    """The compiled model does not give the eager model's answers."""


class CudaBuildError(RuntimeError):
    """A CUDA build came out without CUDA kernels."""


def export(model: torch.nn.Module, batch: int | None = None) -> torch.export.ExportedProgram:
    """Trace at a fixed batch size (what MetaSchedule tunes), or with a symbolic one so a single
    artifact serves any batch size."""
    size = model.image_size
    if batch is not None:
        return torch.export.export(model.eval(), (torch.rand(batch, 3, size, size),))
    dim = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(model.eval(), (torch.rand(2, 3, size, size),), dynamic_shapes={"images": {0: dim}})


def _gelu_with_fast_erf(bb, call):
    from tvm import topi

    def gelu(x):
        return topi.multiply(x, topi.add(0.5, topi.multiply(0.5, topi.fast_erf(topi.multiply(x, 0.5**0.5)))))

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _fast_softmax(bb, call):
    from tvm import topi

    return bb.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis, primfunc_name_hint="softmax")


def to_relax(program: torch.export.ExportedProgram, *, unbroadcast_matmuls: bool = False):
    """The exported program as a Relax module, its operators lowered to TIR. GELU and softmax
    use TVM's vectorisable erf and exp approximations (errors below 1e-6): the exact functions
    compile to one scalar libm call per element, which made GELU alone 35x slower here.
    `unbroadcast_matmuls` (the CUDA builds; see `_without_batch_broadcasts`) keeps the weights
    of batched matmuls whole."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(program, keep_params_as_input=False)
    if unbroadcast_matmuls:
        mod["main"] = _without_batch_broadcasts(mod["main"])
    return relax.transform.LegalizeOps({"relax.nn.gelu": _gelu_with_fast_erf, "relax.nn.softmax": _fast_softmax})(mod)


def _without_batch_broadcasts(func):
    """`matmul(x, broadcast_to(w, [..., K, N]))` as `matmul(x, w)` for a 2-D weight `w` and an
    `x` that already has the output's batch shape (either side; a no-op broadcast of `x` too):
    matmul broadcasts `w` itself. TVM's PyTorch frontend spells the broadcast out, and constant
    folding then stored `w` once per image or token: coca_base's CUDA library held 1.2 GB for
    0.2 GB of weights, coca_tiny's 138 MB for 8. The CPU builds keep the spelled-out form, which
    their shipped tuning records were made for."""
    import tvm_ffi
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    lhs, rhs = wildcard(), wildcard()
    pattern = is_op("relax.matmul")(*(is_op("relax.broadcast_to")(inner, wildcard()) | inner for inner in (lhs, rhs)))

    def same(a, b, dims: int) -> bool:  # the last `dims` dimensions of two tensors
        return all(tvm_ffi.structural_equal(a.ty.shape[a.ty.ndim - k], b.ty.shape[b.ty.ndim - k]) for k in range(1, dims + 1))

    def rewrite(call, matches):
        inners = [matches[lhs], matches[rhs]]
        for side in (0, 1):  # the weight's side
            weight, other, operand, other_operand = inners[side], inners[1 - side], call.args[side], call.args[1 - side]
            whole = other.ty.ndim == other_operand.ty.ndim and same(other, other_operand, other.ty.ndim)
            if weight.ty.ndim == 2 and not weight.same_as(operand) and same(weight, operand, 2) and whole:
                operands = (other, weight) if side == 1 else (weight, other)
                return relax.op.matmul(*operands, out_dtype=call.attrs.out_dtype)
        return call

    return rewrite_call(pattern, rewrite, func)


def host_tvm_target():
    """The host CPU as a TVM target, with the threads its kernels will run on (MetaSchedule's
    parallel extents, and the threads its measurements use)."""
    import tvm

    return tvm.target.Target({**host_target(), "num-cores": claim_tvm_threads()})


def fused_kernels(mod, target):
    """The module after Relax's fusion, its weights marked layout-free: the PrimFuncs are the
    kernels MetaSchedule tunes, and each may store its weights in the tiled order it reads them
    (TVM's CPU weight prepacking)."""
    import tvm
    from tvm import relax

    with target:
        kernels = relax.transform.AttachAttrLayoutFreeBuffers()(relax.get_pipeline("zero")(mod))
    for gvar, func in list(kernels.functions.items()):  # kernels without weights stay as they were, tuning records and all
        if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs["layout_free_buffers"]:
            kernels[gvar] = func.without_attr("layout_free_buffers")
    return kernels


def build_static(model: torch.nn.Module, batch: int, cfg: CompileConfig, tuning_dir: Path, out_path: Path) -> Path:
    """A host-CPU library for one batch size, with MetaSchedule-tuned kernels. The weights are
    constants, so their layout rewrites are folded at build time: the library holds them prepacked."""
    import tvm
    from tvm import relax

    from ml.compile.tuning import tune

    target = host_tvm_target()
    kernels = fused_kernels(to_relax(export(model, batch)), target)
    database = tune(kernels, target, cfg.tuning_trials, tuning_dir, workers=os.cpu_count())
    with target, database, tvm.transform.PassContext(opt_level=3):
        tuned = tvm.transform.Sequential(
            [
                relax.transform.MetaScheduleApplyDatabase(),
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),
            ]
        )(kernels)
        relax.build(tuned, target=target).export_library(str(out_path))
    return out_path


def cuda_target(arch: str):
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch})


def build_cuda(mod, target, database=None):
    """Build a Relax module for a CUDA target: the kernels `database` holds tuned schedules for
    take them (MetaSchedule's records), every other one dlight's default thread schedules."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    with target, tvm.transform.PassContext(opt_level=3):
        mod = relax.get_pipeline("zero")(mod)
        if database is not None:
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        mod = dl.ApplyDefaultSchedule(  # leaves the kernels scheduled above as they are
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
        )(mod)
    return tvm.relax.build(mod, target=target)


def cuda_kernel_source(library_module) -> str:
    """The CUDA source carried by a built CUDA library (checkable without a GPU)."""
    for imported in library_module.imports:
        for inner in [imported, *imported.imports]:
            if inner.kind == "cuda":
                return inner.inspect_source()
    raise CudaBuildError("the CUDA build carries no cuda module")


def check_parity(model: torch.nn.Module, compiled, dataset_dir: Path, cfg: CompileConfig) -> tuple[float, float]:
    """Max abs logit difference and top-1 agreement of `compiled` vs eager on the val split."""
    eager, _ = collect_logits(eager_predict_fn(model), dataset_dir, "val", model.image_size)
    tvm_logits, _ = collect_logits(compiled, dataset_dir, "val", model.image_size)
    max_diff = float(np.abs(eager - tvm_logits).max())
    agreement = float(np.mean(eager.argmax(1) == tvm_logits.argmax(1)))
    if max_diff > cfg.max_abs_diff or agreement < cfg.min_top1_agreement:
        raise ParityError(
            f"TVM disagrees with eager: max |logit diff| {max_diff:.2e} (bound {cfg.max_abs_diff:.0e}), "
            f"top-1 agreement {agreement:.4f} (bound {cfg.min_top1_agreement})"
        )
    return max_diff, agreement


def build_cuda_libraries(program: torch.export.ExportedProgram, archs: list[str], out_dir: Path) -> dict[str, Path]:
    """One library per CUDA arch, cross-compiled; none where nvcc is missing."""
    if not shutil.which("nvcc"):
        return {}
    mod, paths = to_relax(program, unbroadcast_matmuls=True), {}
    for arch in archs:
        executable = build_cuda(mod, cuda_target(arch))
        cuda_kernel_source(executable.mod)  # fails loudly if no kernels were generated
        paths[arch] = out_dir / f"model_cuda_{arch}.so"
        executable.export_library(str(paths[arch]))
    return paths


def compile_model(
    settings: Settings, *, model_path: Path, dataset_dir: Path, out_dir: Path, run: RunLog = NO_RUN
) -> CompileResult:
    """Export; build tuned host-CPU libraries per batch size (and CUDA archs when nvcc exists);
    check parity on the validation split; log metrics and the tuning records to `run`."""
    cfg, tuning_dir = settings.compile, settings.tuning_dir
    model = load_classifier(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    program = export(model)
    torch.export.save(program, out_dir / "model.pt2")
    llvm_paths = {
        batch: build_static(model, batch, cfg, tuning_dir, out_dir / f"model_llvm_b{batch}.so")
        for batch in tqdm(cfg.batch_sizes, desc="tuning + building for the CPU", unit="batch size")
    }
    max_diff, agreement = check_parity(model, CompiledClassifier(llvm_paths), dataset_dir, cfg)
    cuda_paths = build_cuda_libraries(program, cfg.cuda_archs, out_dir)
    target = host_target()
    run.params(
        {
            "compile.llvm_mcpu": target["mcpu"],
            "compile.cuda_archs": ",".join(cuda_paths) or "none",
            "compile.batch_sizes": ",".join(map(str, cfg.batch_sizes)),
            "compile.tuning_trials": cfg.tuning_trials,
        }
    )
    run.metrics({"tvm_max_abs_diff": max_diff, "tvm_top1_agreement": agreement})
    for name in ("database_workload.json", "database_tuning_record.json"):
        if (tuning_dir / name).exists():
            run.artifact(tuning_dir / name, "tuning")
    artifacts = {
        EXPORTED_KEY: out_dir / "model.pt2",
        **{llvm_key(batch): path for batch, path in llvm_paths.items()},
        **{cuda_key(arch): path for arch, path in cuda_paths.items()},
    }
    result = CompileResult(artifacts=artifacts, llvm_target=target, max_abs_diff=max_diff, top1_agreement=agreement)
    return result.save(out_dir)
