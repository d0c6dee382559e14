"""benchmarks/GPU_REPORT.md from a run of `python -m benchmarks.gpu`: every figure it measured,
"not run yet" for each GPU figure a dry run could not, and each step's outcome."""

from __future__ import annotations

import datetime
from pathlib import Path

from benchmarks.gpu import RUNTIMES, STEPS, Check, step_name

NOT_RUN = "not run yet"
STAGES = {"coca": "CoCa pretraining", "classifier": "classifier fine-tune"}


def write_gpu_report(out: Path, check: Check) -> Path:
    lines = [
        "# GPU check",
        "",
        f"Written by `scripts/gpu_check.sh` (`python -m benchmarks.gpu`) on {datetime.date.today()}, "
        + ("a **dry run** on a machine without a GPU." if check.dry_run else "a run on the GPU below."),
        "",
    ]
    if check.dry_run:
        lines += [
            f"> **The GPU figures are {NOT_RUN}.** A dry run does every step that needs no GPU (the configs, the dataset, "
            "training and pruning on the CPU with the GPU's DeepSpeed config, the CUDA cross-compile, registering and "
            "serving); run `scripts/gpu_check.sh` on a GPU machine to fill in the rest.",
            "",
        ]
    for section in (_machine, _steps, _training, _parity, _latency, _serving, _configs):
        lines += [*section(check), ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "GPU_REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _machine(check: Check) -> list[str]:
    env = check.figures.get("environment", {})
    gpus = env.get("gpus") or []
    gpu = f"{len(gpus)} × {gpus[0]} ({env['arch']})" if gpus else f"none (CUDA builds cross-compiled for {check.arch})"
    versions = ", ".join(f"{name} {env[name]}" for name in ("torch", "apache-tvm", "deepspeed", "open-clip-torch") if name in env)
    onnx = [
        f"{name} {env[name]}" for name in ("onnxruntime", "onnxruntime-gpu") if env.get(name, "not installed") != "not installed"
    ]
    return [
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        f"| GPU | {gpu} |",
        f"| CPU | {env.get('cpu', '?')}, {env.get('cpu_cores', '?')} cores |",
        f"| CUDA (torch's) | {env.get('cuda', '?')} |",
        f"| packages | {versions}{', ' + ', '.join(onnx) if onnx else ''} |",
    ]


def _steps(check: Check) -> list[str]:
    rows = [f"| {o.step} | {o.status} | {o.seconds:.1f} | {o.note.replace('|', '/')} |" for o in check.outcomes]
    done = {o.step for o in check.outcomes}
    # the report is rewritten after each step: in a run cut short, these rows stay
    rows += [f"| {name} | not reached | | the run ended before this step |" for name in map(step_name, STEPS) if name not in done]
    total = sum(o.seconds for o in check.outcomes)
    return [
        "## Steps",
        "",
        "| step | outcome | seconds | notes |",
        "| --- | --- | ---: | --- |",
        *rows,
        f"| all | | {total:.1f} | |",
    ]


def _training(check: Check) -> list[str]:
    figures = check.figures.get("training")
    if not figures:
        return ["## DeepSpeed training", "", f"{NOT_RUN}: the training step did not run (see Steps)."]
    head = (
        f"## DeepSpeed training: {figures['model']}, `{figures['deepspeed_config']}`, world size {figures['world_size']}, "
        f"global batch {figures['batch_size']}, {figures['epochs']} × {figures['steps_per_epoch']} steps per stage"
    )
    on_cpu, batch, rows = figures["device"] == "CPU", figures["batch_size"], []
    for stage, title in STAGES.items():
        speed, memory = figures.get(f"{stage}_steps_per_s"), figures.get(f"{stage}_peak_gpu_mib")
        measured = f"{speed:.2f} | {speed * batch:.1f}" if speed else "? | ?"
        if on_cpu:
            rows.append(f"| {title} | {NOT_RUN} | {NOT_RUN} | {NOT_RUN} | {measured} |")
        else:
            rows.append(f"| {title} | {measured} | {memory / 1024:.2f} |" if memory else f"| {title} | {measured} | ? |")
    columns = "| stage | steps/s | images/s | peak GPU memory (GiB) |" + (" dry run, CPU: steps/s | images/s |" if on_cpu else "")
    return [
        head,
        "",
        "Steps per second in each stage's last epoch, after its first step; memory is the peak PyTorch had allocated on the GPU.",
        "",
        columns,
        "| --- |" + " ---: |" * (columns.count("|") - 2),
        *rows,
    ]


def _parity(check: Check) -> list[str]:
    cfg, figures = check.settings.compile, check.figures.get("parity")
    diff = f"{figures['max_abs_diff']:.1e}" if figures else NOT_RUN
    agreement = f"{figures['top1_agreement']:.4f}" if figures else NOT_RUN
    return [
        "## Parity: the TVM CUDA library (what the registry serves) against eager PyTorch on the GPU",
        "",
        "Validation split, fp32 on both sides (TF32 off).",
        "",
        "| max \\|logit diff\\| | top-1 agreement | bounds |",
        "| ---: | ---: | --- |",
        f"| {diff} | {agreement} | ≤ {cfg.max_abs_diff:.0e}, ≥ {cfg.min_top1_agreement} |",
    ]


def _latency(check: Check) -> list[str]:
    timings = check.figures.get("timings") or []
    eager = {t.batch: t.median_ms for t in timings if t.runtime == "eager"}
    measured = {(t.batch, t.runtime): t for t in timings}
    rows = []
    for batch in check.batches:
        for runtime in RUNTIMES:
            t = measured.get((batch, runtime))
            if t is None:
                rows.append(f"| {batch} | {runtime} | {NOT_RUN} | | | | |")
                continue
            speedup = f"{eager[batch] / t.median_ms:.2f}×" if batch in eager else "?"
            figures = f"{t.median_ms:.3f} | {t.p99_ms:.3f} | {t.images_per_s:.0f} | {speedup} | {t.max_abs_diff:.1e}"
            rows.append(f"| {batch} | {runtime} | {figures} |")
    skipped = check.figures.get("timings_skipped") or []
    return [
        "## Latency on the GPU: the pruned model",
        "",
        "Each call takes a numpy batch and returns numpy logits, as the service calls the model: the copies to and "
        "from the GPU are in every figure. Runtimes alternate in blocks within one process. `tvm-cuda` is the library "
        "the registry serves (any batch size, dlight schedules); `tvm-cuda tuned` is built for that batch size with "
        f"MetaSchedule's records ({check.tuning_trials} trials in all).",
        "",
        "| batch | runtime | median ms | p99 ms | images/s | × eager | max \\|diff\\| vs eager |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        *([""] + [f"Skipped: {reason}." for reason in skipped] if skipped else []),
    ]


def _serving(check: Check) -> list[str]:
    figures = check.figures.get("serving")
    answer = f"backend `{figures['backend']}`, answered {figures['species']!r}" if figures else NOT_RUN
    on_gpu = "" if figures and not check.dry_run else f"; on a GPU: {NOT_RUN}" if figures else ""
    return ["## Serving", "", f"`bentoml serve` of the registered version, one `/predict`: {answer}{on_gpu}."]


def _configs(check: Check) -> list[str]:
    rows = [
        f"| {name} | {c['image_size']} | {c['coca_params_m']:.1f} | {c['classifier_params_m']:.1f} | "
        f"{c['gflops_per_image']:.2f} |"
        for name, c in (check.figures.get("configs") or {}).items()
    ]
    return [
        "## Model configs (`ml/model/configs/`)",
        "",
        "| config | image px | CoCa params (M) | classifier params (M) | GFLOP per image (classifier) |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
    ]
