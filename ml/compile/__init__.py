"""Compile the classifier with TVM Relax: torch.export -> Relax -> a shared library per target.

The llvm build targets the host CPU (`ml.runtime.host_target`) and is checked against eager
PyTorch on validation images. CUDA builds are cross-compiled whenever nvcc is on PATH; without a
GPU they are checked by the kernels they carry.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from tqdm import tqdm

from config import CompileConfig
from ml.evaluate import collect_logits, torch_predict_fn
from ml.runtime import CompiledClassifier, claim_tvm_threads, host_target


class ParityError(RuntimeError):
    """The compiled model does not give the eager model's answers."""


@dataclass(frozen=True)
class CompileResult:
    exported_path: Path  # torch.export program: the eager model, loadable without our classes
    llvm_paths: dict[int, Path]  # batch size -> tuned host-CPU library
    llvm_target: dict
    cuda_paths: dict[str, Path] = field(default_factory=dict)  # arch -> library
    max_abs_diff: float = 0.0
    top1_agreement: float = 1.0


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


def to_relax(program: torch.export.ExportedProgram):
    """The exported program as a Relax module, its operators lowered to TIR. GELU and softmax
    use TVM's vectorisable erf and exp approximations (errors below 1e-6): the exact functions
    compile to one scalar libm call per element, which made GELU alone 35x slower here."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(program, keep_params_as_input=False)
    return relax.transform.LegalizeOps({"relax.nn.gelu": _gelu_with_fast_erf, "relax.nn.softmax": _fast_softmax})(mod)


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


def build(mod, target: dict):
    """Build a Relax module; GPU targets get dlight's default thread schedules first."""
    import tvm
    from tvm import relax

    tvm_target = tvm.target.Target(target)
    if target["kind"] == "cuda":
        from tvm.s_tir import dlight as dl

        with tvm_target:
            mod = relax.get_pipeline("zero")(mod)
            mod = dl.ApplyDefaultSchedule(
                dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
            )(mod)
    return tvm.relax.build(mod, target=tvm_target)


def cuda_kernel_source(library_module) -> str:
    """The CUDA source carried by a built CUDA library (checkable without a GPU)."""
    for imported in library_module.imports:
        for inner in [imported, *imported.imports]:
            if inner.kind == "cuda":
                return inner.inspect_source()
    raise ParityError("the CUDA build carries no cuda module")


def check_parity(model: torch.nn.Module, compiled, dataset_dir: Path, cfg: CompileConfig) -> tuple[float, float]:
    """Max abs logit difference and top-1 agreement of `compiled` vs eager on the val split."""
    eager, _ = collect_logits(torch_predict_fn(model), dataset_dir, "val", model.image_size)
    tvm_logits, _ = collect_logits(compiled, dataset_dir, "val", model.image_size)
    max_diff = float(np.abs(eager - tvm_logits).max())
    agreement = float(np.mean(eager.argmax(1) == tvm_logits.argmax(1)))
    if max_diff > cfg.max_abs_diff or agreement < cfg.min_top1_agreement:
        raise ParityError(
            f"TVM disagrees with eager: max |logit diff| {max_diff:.2e} (bound {cfg.max_abs_diff:.0e}), "
            f"top-1 agreement {agreement:.4f} (bound {cfg.min_top1_agreement})"
        )
    return max_diff, agreement


def compile_model(model_path: Path, dataset_dir: Path, cfg: CompileConfig, out_dir: Path, tuning_dir: Path) -> CompileResult:
    """Export; build tuned host-CPU libraries per batch size (and CUDA archs when nvcc exists);
    check parity; log metrics and the tuning records to MLflow."""
    from ml.prune import load_model

    model = load_model(model_path).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    program = export(model)
    exported_path = out_dir / "model.pt2"
    torch.export.save(program, exported_path)
    llvm_paths = {
        batch: build_static(model, batch, cfg, tuning_dir, out_dir / f"model_llvm_b{batch}.so")
        for batch in tqdm(cfg.batch_sizes, desc="tuning + building for the CPU", unit="batch size")
    }
    max_diff, agreement = check_parity(model, CompiledClassifier(llvm_paths), dataset_dir, cfg)
    mod = to_relax(program)
    cuda_paths = {}
    if shutil.which("nvcc"):
        for arch in cfg.cuda_archs:
            executable = build(mod, {"kind": "cuda", "arch": arch})
            cuda_kernel_source(executable.mod)  # fails loudly if no kernels were generated
            cuda_paths[arch] = out_dir / f"model_cuda_{arch}.so"
            executable.export_library(str(cuda_paths[arch]))
    target = host_target()
    mlflow.log_params(
        {
            "compile.llvm_mcpu": target["mcpu"],
            "compile.cuda_archs": ",".join(cuda_paths) or "none",
            "compile.batch_sizes": ",".join(map(str, cfg.batch_sizes)),
            "compile.tuning_trials": cfg.tuning_trials,
        }
    )
    mlflow.log_metrics({"tvm_max_abs_diff": max_diff, "tvm_top1_agreement": agreement})
    for name in ("database_workload.json", "database_tuning_record.json"):
        if (tuning_dir / name).exists():
            mlflow.log_artifact(str(tuning_dir / name), "tuning")
    return CompileResult(exported_path, llvm_paths, target, cuda_paths, max_diff, agreement)
