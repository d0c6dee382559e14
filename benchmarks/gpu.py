"""`python -m benchmarks.gpu` (`scripts/gpu_check.sh`): the GPU path in one run that fits a short
GPU loan, reported in benchmarks/GPU_REPORT.md.

On a GPU, in order:
1. the environment: the GPUs, their CUDA arch, the versions that matter;
2. every model config built, with its size and FLOPs per image;
3. a synthetic dataset at the model's image size;
4. the pipeline's `train()` at world size = GPUs present, with the DeepSpeed config chosen for
   GPUs (ZeRO-2, bf16), two epochs per stage: steps/s and peak GPU memory;
5. pruning, with its recovery fine-tune;
6. the TVM CUDA library for the GPU present (dlight schedules, any batch size): what the
   registry serves;
7. parity of the served library with eager PyTorch on the GPU, on the validation split;
8. eager, torch.compile, ONNX Runtime (CUDA provider) and the served library, timed at each
   batch size, interleaved in one process;
9. MetaSchedule-tuned CUDA libraries, one per batch size, within `--tuning-trials` in all (the
   best record of each kernel kept in ml/compile/records/cuda_<arch>/), dlight for the rest;
10. the timings again, the tuned libraries among them (they replace step 8's figures);
11. the model registered and served by `bentoml serve`, which must pick the `tvm-cuda` backend,
    answering one /predict.

Tuning comes after the first timings because its length is the least predictable: on the first
H200 run, 21 trials on batch 1 had not finished in 3 minutes. The report is rewritten after
each step, so a run cut short keeps what it measured.

Without a GPU (or with --dry-run) every step that needs none still runs: the configs, the
dataset, training and pruning on the CPU with the GPU's DeepSpeed config (bf16 weights in the
engine), the CUDA cross-compile for `--arch` (the tuned build's path, with no records), and
registering and serving (torch-eager: a CUDA library loads only on a GPU). The report's GPU
figures then say "not run yet". The report is written whatever happens, with each step's outcome
(ran; skipped, and why; failed, and how); the exit status is 1 when a step failed.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from config import REPO_ROOT, Settings

HERE = Path(__file__).parent
TRAIN_CONFIGS = REPO_ROOT / "ml" / "train"
CUDA_RECORDS = REPO_ROOT / "ml" / "compile" / "records"
RUNTIMES = ("eager", "torch.compile", "onnxruntime-cuda", "tvm-cuda", "tvm-cuda tuned")
PACKAGES = ("torch", "apache-tvm", "deepspeed", "open-clip-torch", "onnxruntime", "onnxruntime-gpu", "mlflow", "bentoml")


class Skipped(Exception):  # noqa: N818 (a step's outcome, not an error)
    """A step that cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Outcome:
    step: str
    status: str  # ran | skipped | failed
    seconds: float
    note: str


@dataclass
class Check:
    """One run of the check: its settings, what each step left for the later ones, and the
    figures and outcomes the report is written from."""

    settings: Settings
    work: Path
    dry_run: bool
    gpus: int
    arch: str
    batches: list[int]
    iterations: int
    tuning_trials: int
    made: dict[str, object] = field(default_factory=dict)
    figures: dict[str, object] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)

    def run(self, step: Callable[[Check], str | None]) -> None:
        name, started = step_name(step), time.perf_counter()
        try:
            status, note = "ran", step(self) or ""
        except Skipped as why:
            status, note = "skipped", str(why)
        except Exception as error:  # the report must still be written, and the later steps tried
            traceback.print_exc()
            status, note = "failed", f"{type(error).__name__}: {error}"
        outcome = Outcome(name, status, time.perf_counter() - started, note)
        typer.echo(f"[{outcome.status}] {outcome.step} ({outcome.seconds:.1f} s) {outcome.note}")
        self.outcomes.append(outcome)

    def needs(self, *names: str) -> list:
        if missing := [name for name in names if name not in self.made]:
            raise Skipped(f"needs the {', '.join(missing)} of an earlier step")
        return [self.made[name] for name in names]

    def needs_gpu(self, what: str) -> None:
        if self.dry_run:
            raise Skipped(f"{what} needs a GPU (dry run)")

    @property
    def failed(self) -> bool:
        return any(outcome.status == "failed" for outcome in self.outcomes)


def step_name(step: Callable[[Check], str | None]) -> str:
    """How the log and the report name a step."""
    return step.__name__.replace("_", " ")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def deepspeed_config_for(gpus: int) -> Path:
    """ZeRO-2 with bf16 where there are GPUs; ZeRO-1 in fp32 on CPUs."""
    return TRAIN_CONFIGS / ("ds_config_zero2_gpu.json" if gpus else "ds_config.json")


@dataclass(frozen=True)
class Sizes:
    """How much the check trains: a GPU run two short epochs per stage, a dry run two steps."""

    num_classes: int
    images_per_class: int  # the generator draws about 0.4 s a 512-px image on 2 cores
    epochs: int
    batch_size: int
    max_steps_per_epoch: int | None

    @classmethod
    def default(cls, dry_run: bool) -> Sizes:
        return cls(4, 10, 1, 8, 2) if dry_run else cls(10, 30, 2, 16, None)


def check_settings(settings: Settings, model: str, gpus: int, work: Path, sizes: Sizes, dry_run: bool) -> Settings:
    """The pipeline's settings for the check: everything under `work`, the model's image size,
    `sizes`, and the GPU's DeepSpeed config (in a dry run too, on the CPU: what the GPU run
    will use)."""
    from config.ports import free_port
    from ml.model import load_config

    image_size = load_config(model)["vision_cfg"]["image_size"]
    sections = {
        "model": {"name": model},
        "synthetic": {
            "num_classes": sizes.num_classes,
            "images_per_class": sizes.images_per_class,
            "image_size": image_size,
            "min_test_images_per_class": 0,
        },
        "train": {
            "deepspeed_config": deepspeed_config_for(max(gpus, 1)),
            "world_size": max(gpus, 1),
            "master_port": free_port(),
            "pretrain_epochs": sizes.epochs,
            "finetune_epochs": sizes.epochs,
            "patience": sizes.epochs,  # every epoch runs
            "batch_size": sizes.batch_size,
            "max_steps_per_epoch": sizes.max_steps_per_epoch,
            "loader_workers": 0 if dry_run else min(8, (os.cpu_count() or 2) // 2),
        },
        # a few steps teach no accuracy worth guarding: the check measures, the gate is elsewhere
        "prune": {"finetune_epochs": 1, "max_top1_drop": 1.0},
        # its own embedded database and local image store, whatever the shell points at
        "feedback": {"database_url": None, "postgres_port": free_port(), "s3_bucket": None},
    }
    updates = {name: getattr(settings, name).model_copy(update=values) for name, values in sections.items()}
    return settings.model_copy(update={"data_dir": work / "data", "mlflow_tracking_uri": None, **updates})


def environment(check: Check) -> str:
    gpus = [torch.cuda.get_device_name(i) for i in range(check.gpus)]
    check.figures["environment"] = {
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "gpus": gpus,
        "arch": check.arch,
        "cuda": torch.version.cuda or "none",
        **{name: package_version(name) for name in PACKAGES},
    }
    return f"{len(gpus)} × {gpus[0]} ({check.arch})" if gpus else f"no GPU: dry run, CUDA builds for {check.arch}"


def model_configs(check: Check) -> str:
    from ml.model import SpeciesClassifier, available_configs, build_coca
    from ml.prune import count_flops

    rows = {}
    for name in available_configs():
        coca = build_coca(name)
        classifier = SpeciesClassifier.from_coca(coca, ["a", "b"]).eval()
        flops, params = count_flops(classifier)
        rows[name] = {
            "image_size": classifier.image_size,
            "coca_params_m": sum(p.numel() for p in coca.parameters()) / 1e6,
            "classifier_params_m": params / 1e6,
            "gflops_per_image": flops / 1e9,
        }
    check.figures["configs"] = rows
    return ", ".join(rows)


def dataset(check: Check) -> str:
    from ml.data.synthetic import generate_synthetic

    cfg = check.settings.synthetic
    check.made["dataset"] = generate_synthetic(check.work / "dataset", cfg)
    return f"{cfg.num_classes} species, {cfg.images_per_class} images each, {cfg.image_size} px"


def training(check: Check) -> str:
    import mlflow

    from ml.data import read_split
    from ml.tracking import RunLog
    from ml.train import train

    (data,) = check.needs("dataset")
    cfg = check.settings.train
    run = RunLog.start(check.settings, run_name="gpu check")
    result = train(check.settings, dataset_dir=data, out_dir=check.work / "train", run=run)
    steps_per_epoch = min(len(read_split(data, "train")) // cfg.batch_size, cfg.max_steps_per_epoch or 1 << 30)
    metrics = mlflow.get_run(run.run_id).data.metrics
    check.figures["training"] = {
        "model": check.settings.model.name,
        "deepspeed_config": cfg.deepspeed_config.name,
        "device": "GPU" if check.gpus else "CPU",
        "world_size": cfg.world_size,
        "batch_size": cfg.batch_size,
        "epochs": cfg.pretrain_epochs,
        "steps_per_epoch": steps_per_epoch,
        **{key: value for key, value in metrics.items() if key.endswith(("_steps_per_s", "_peak_gpu_mib"))},
    }
    check.made["trained"] = result.model_path
    return (
        f"{cfg.deepspeed_config.name} at world size {cfg.world_size}, {cfg.pretrain_epochs} × {steps_per_epoch} steps per stage"
    )


def pruning(check: Check) -> str:
    from ml.prune import prune

    trained, data = check.needs("trained", "dataset")
    result = prune(check.settings, model_path=trained, dataset_dir=data, out_dir=check.work / "prune")
    check.figures["pruning"] = {"gflops_before": result.flops_before / 1e9, "gflops_after": result.flops_after / 1e9}
    check.made["pruned"] = result.model_path
    return f"{result.flops_before / 1e9:.2f} -> {result.flops_after / 1e9:.2f} GFLOP per image"


def cuda_library(check: Check) -> str:
    """The library the pipeline registers: the exported program (any batch size), dlight."""
    from ml.compile import build_cuda_libraries, export
    from ml.model import load_classifier

    (pruned,) = check.needs("pruned")
    program = export(load_classifier(pruned))
    out = check.work / "compile"
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, out / "model.pt2")
    libraries = build_cuda_libraries(program, [check.arch], out)
    if not libraries:
        raise Skipped("nvcc is not on PATH")
    check.made["exported"], check.made["cuda library"] = out / "model.pt2", libraries[check.arch]
    return f"{libraries[check.arch].stat().st_size / 2**20:.1f} MiB for {check.arch}"


def tuned_libraries(check: Check) -> str:
    """One library per batch size: the kernels MetaSchedule measured on this GPU take its best
    schedule, the rest dlight's. In a dry run nothing can be measured: the same build, no records."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm_ffi import structural_hash

    from ml.compile import build_cuda, cuda_kernel_source, cuda_target, export, to_relax
    from ml.compile.tuning import keep_best, tune
    from ml.model import load_classifier

    (pruned,) = check.needs("pruned")
    model = load_classifier(pruned)
    target = cuda_target(check.arch) if check.dry_run else tvm.target.Target.from_device(tvm.cuda(0))
    trials = 0 if check.dry_run else check.tuning_trials // len(check.batches)
    tuning_dir, libraries, kernels = check.work / "tuning-cuda", {}, set()
    for batch in check.batches:
        mod = to_relax(export(model, batch), unbroadcast_matmuls=True)
        with target:
            fused = relax.get_pipeline("zero")(mod)
        kernels |= {structural_hash(task.dispatched[0]) for task in ms.relax_integration.extract_tasks(fused, target)}
        database = tune(fused, target, trials, tuning_dir, workers=os.cpu_count(), shipped=False)
        executable = build_cuda(mod, target, database)
        cuda_kernel_source(executable.mod)
        libraries[batch] = check.work / "compile" / f"model_cuda_{check.arch}_tuned_b{batch}.so"
        executable.export_library(str(libraries[batch]))
    check.made["tuned libraries"] = libraries
    if check.dry_run:
        return f"batch sizes {check.batches}: {len(kernels)} kernels, untuned (MetaSchedule measures on a GPU)"
    kept = keep_best([ms.database.JSONDatabase(work_dir=str(tuning_dir))], kernels, CUDA_RECORDS / f"cuda_{check.arch}")
    check.figures["tuning"] = {"trials": check.tuning_trials, "kernels": len(kernels), "records_kept": kept}
    kept_in = f"{CUDA_RECORDS.name}/cuda_{check.arch}"
    return f"{check.tuning_trials} trials over {len(kernels)} kernels; best records of {kept} in {kept_in}"


def parity(check: Check) -> str:
    from ml.compile import check_parity
    from ml.model import load_classifier
    from ml.runtime import CudaClassifier

    check.needs_gpu("loading a CUDA library")
    pruned, data, library = check.needs("pruned", "dataset", "cuda library")
    model = load_classifier(pruned).cuda()
    max_diff, agreement = check_parity(model, CudaClassifier(library), data, check.settings.compile)
    check.figures["parity"] = {"max_abs_diff": max_diff, "top1_agreement": agreement}
    return f"max |logit diff| {max_diff:.1e}, top-1 agreement {agreement:.4f}"


def timings(check: Check) -> str:
    """Every runtime but the tuned builds, which come later: tuning may outlast a short loan."""
    check.needs_gpu("timing on the GPU")
    return time_runtimes(check)


def tuned_timings(check: Check) -> str:
    """Every runtime again, the tuned builds among them; these figures replace the first ones."""
    check.needs_gpu("timing on the GPU")
    check.needs("tuned libraries")
    return time_runtimes(check)


def time_runtimes(check: Check) -> str:
    from benchmarks.measure import Timing, time_interleaved
    from benchmarks.runtimes import onnx_runtime
    from ml.model import load_classifier
    from ml.prune import count_flops
    from ml.runtime import CudaClassifier, eager_predict_fn

    pruned, library = check.needs("pruned", "cuda library")
    tuned = check.made.get("tuned libraries", {})

    def tuned_at(batch: int):
        if batch not in tuned:
            raise LookupError("built by the tuned libraries step, after these timings")
        return CudaClassifier(tuned[batch])

    model, rounds, results, skipped = load_classifier(pruned), 10, [], []
    gflop = count_flops(model)[0] / 1e9
    on_gpu = load_classifier(pruned).cuda()
    compiled = torch.compile(on_gpu)  # once: a second batch size recompiles it for any batch size
    for batch in check.batches:
        x = np.random.default_rng(0).random((batch, 3, model.image_size, model.image_size), dtype=np.float32)
        makers = (
            lambda: eager_predict_fn(on_gpu),
            lambda: eager_predict_fn(compiled),
            lambda batch=batch: onnx_runtime(model, batch, check.work / "onnx", "CUDAExecutionProvider"),
            lambda: CudaClassifier(library),
            lambda batch=batch: tuned_at(batch),
        )
        prepare = dict(zip(RUNTIMES, makers, strict=True))
        reference, runs, setup = eager_predict_fn(on_gpu)(x), {}, {}
        for runtime, make in prepare.items():
            started = time.perf_counter()
            try:
                runs[runtime] = make()
            except LookupError as why:  # a runtime this machine lacks
                skipped.append(f"{runtime}: {why}")
                continue
            runs[runtime](x)  # compiled, loaded, warm
            setup[runtime] = time.perf_counter() - started
        seconds = time_interleaved(runs, x, check.iterations, rounds)
        for runtime, run in runs.items():
            diff = float(np.abs(run(x) - reference).max())
            results.append(Timing("pruned", runtime, batch, seconds[runtime], 0.0, gflop * batch, diff, setup[runtime], rounds))
            typer.echo(results[-1].line())
    check.figures["timings"] = results
    check.figures["timings_skipped"] = sorted(set(skipped))
    return f"{len(results)} timings at batch sizes {check.batches}" + (f"; skipped {sorted(set(skipped))}" if skipped else "")


def serving(check: Check) -> str:
    """Register the pruned model with its CUDA library, as the pipeline does, and ask `bentoml
    serve` for one prediction: the backend must be tvm-cuda on a GPU, torch-eager without one."""
    import httpx

    from benchmarks.fixtures import BentoServer
    from config.ports import free_port
    from feedback import db, keys, postgres
    from ml.data import read_classes, read_split
    from ml.model import load_classifier
    from ml.runtime import EXPORTED_KEY, cuda_key
    from ml.tracking import RunLog
    from registry import promote, register_model

    pruned, exported, library, data = check.needs("pruned", "exported", "cuda library", "dataset")
    if postgres.server_program("postgres") is None:
        raise Skipped("no PostgreSQL server binaries here (the Bento keeps API keys and predictions in PostgreSQL)")
    settings, model = check.settings, load_classifier(pruned)
    model_config = {"classes": read_classes(data), "image_size": model.image_size}
    run = RunLog.start(settings, run_name="gpu check: serve")
    artifacts = {EXPORTED_KEY: exported, cuda_key(check.arch): library}
    registered = register_model(settings, artifacts, model_config, {}, run)
    promote(settings.registered_model_name, registered.version)
    engine = db.engine(settings)  # the embedded cluster under the check's data dir, migrated
    key = keys.key_in_file(engine, check.work / "api.key", name="gpu-check", role="client").read_text().strip()
    port = free_port()
    env = {
        "INSECT_DATA_DIR": str(settings.data_dir),
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "INSECT_FEEDBACK__DATABASE_URL": db.database_url(settings),
        "INSECT_FEEDBACK__S3_BUCKET": "",  # the local image store under the data dir
        "INSECT_SERVE__PORT": str(port),
    }
    bento = BentoServer(port, check.work / "bento.log", env).start()
    try:
        bento.wait_ready()
        name, _ = read_split(data, "test")[0]
        answer = httpx.post(
            f"{bento.base}/predict",
            files={"image": (name, (data / "images" / name).read_bytes(), "image/jpeg")},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        answer.raise_for_status()
    finally:
        bento.stop()
        engine.dispose()
        postgres.stop(settings.postgres_dir)
    backend, expected = answer.json()["model"]["backend"], "torch-eager" if check.dry_run else "tvm-cuda"
    check.figures["serving"] = {"backend": backend, "species": answer.json()["species"]}
    if backend != expected:
        raise RuntimeError(f"the Bento served with {backend}, not {expected}")
    return f"/predict answered {answer.json()['species']!r} with backend {backend}"


# the served library's parity and timings before tuning, whose length is the least predictable
STEPS = (
    environment,
    model_configs,
    dataset,
    training,
    pruning,
    cuda_library,
    parity,
    timings,
    tuned_libraries,
    tuned_timings,
    serving,
)


def main(
    dry_run: Annotated[
        bool | None, typer.Option("--dry-run/--gpu", help="default: a dry run exactly when no GPU is present")
    ] = None,
    model: Annotated[str, typer.Option(help="the model config to train and compile")] = "coca_base",
    batches: Annotated[list[int], typer.Option("--batch", help="inference batch sizes to build and time")] = [1, 8, 32],  # noqa: B006
    iterations: Annotated[int, typer.Option(help="timed calls per runtime and batch size")] = 200,
    tuning_trials: Annotated[int, typer.Option(help="MetaSchedule trials in all, shared by the batch sizes")] = 96,
    arch: Annotated[str, typer.Option(help="the CUDA arch a dry run builds for (a GPU run builds for its own)")] = "sm_90",
    work: Annotated[Path | None, typer.Option(help="scratch directory (default: <data dir>/gpu-check)")] = None,
    out: Annotated[Path, typer.Option(help="where GPU_REPORT.md goes")] = HERE,
) -> None:
    from benchmarks.gpu_report import write_gpu_report
    from config import get_settings
    from ml.runtime import gpu_arch

    gpus = torch.cuda.device_count()
    dry_run = (gpus == 0) if dry_run is None else dry_run
    if not dry_run and gpus == 0:
        raise typer.BadParameter("--gpu, but torch sees no GPU here; run with --dry-run")
    if not dry_run:  # fp32 means fp32: the parity and timing references must not round to TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    gpus = 0 if dry_run else gpus
    work = work or get_settings().data_dir / "gpu-check"
    settings = check_settings(get_settings(), model, gpus, work, Sizes.default(dry_run), dry_run)
    arch = arch if dry_run else gpu_arch() or arch
    check = Check(settings, work, dry_run, gpus, arch, batches, iterations, tuning_trials)
    for step in STEPS:
        check.run(step)
        report = write_gpu_report(out, check)  # after each step: a run cut short still leaves its figures
    typer.echo(f"report: {report}")
    if check.failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
