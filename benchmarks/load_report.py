"""benchmarks/LOAD.md, load.json and load.png from `python -m benchmarks.load`'s results."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import psutil

PHASE_LABELS = {
    "upload_parse": "upload parse",
    "decode": "decode",
    "preprocess": "preprocess",
    "queue": "queue",
    "model": "model (its batch)",
    "image_store": "image store",
    "database": "database",
}


def write_load_report(results: list[dict], champion, seconds: int, out: Path) -> None:
    (out / "load.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "load.png")
    (out / "LOAD.md").write_text(markdown(results, champion, seconds))
    print(f"wrote {out / 'LOAD.md'}, load.json and load.png")


def markdown(results: list[dict], champion, seconds: int) -> str:
    lines = [
        "# The Bento under load",
        "",
        f"`python -m benchmarks.load` (`make loadtest`), {datetime.now(UTC):%Y-%m-%d}: {champion.name} v{champion.version} "
        f"served by `bentoml serve` on {psutil.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"driven by locust (closed loop, {seconds} s per row) on the same machine.",
        "",
        "| configuration | profile | users | req/s | p50 ms | p95 ms | p99 ms | not 2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['profile']} | {r['users']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['errors']} of {r['requests']} |"
        )
    errors = {kind: n for r in results for kind, n in r["error_kinds"].items()}
    lines += ["", "Answers that were not 2xx: " + ("none." if not errors else "")]
    lines += [f"- {kind}: {n}" for kind, n in errors.items()]
    lines += [
        "",
        "## Where a /predict request's time goes (mean ms, from the service's own timings)",
        "",
        "| configuration | profile | users | " + " | ".join(PHASE_LABELS.values()) + " |",
        "|---|---|---:|" + "---:|" * len(PHASE_LABELS),
    ]
    for r in results:
        cells = " | ".join(f"{r['phases_ms'][phase]:.1f}" for phase in PHASE_LABELS)
        lines.append(f"| {r['config']} | {r['profile']} | {r['users']} | {cells} |")
    lines += [
        "",
        "Upload parse runs from the door (`guards.Admission`) to the handler: the body, BentoML's form",
        "parsing and its temp file. Model is the run of the batch the request was in; queue is the wait",
        "for it. The rest of a request's latency is outside the handler: the HTTP server, the",
        "middleware and the client.",
        "",
        "![throughput and p99 by users](load.png)",
        "",
    ]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rps, p99) = plt.subplots(1, 2, figsize=(11, 4))
    for config in dict.fromkeys(r["config"] for r in results):
        rows = [r for r in results if r["config"] == config and r["profile"] == "predict"]
        users = [r["users"] for r in rows]
        rps.plot(users, [r["rps"] for r in rows], marker="o", label=config)
        p99.plot(users, [r["p99_ms"] for r in rows], marker="o", label=config)
    for axis, title in ((rps, "/predict throughput (req/s)"), (p99, "/predict p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent users")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    rps.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
