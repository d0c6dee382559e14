"""benchmarks/HOSTILE.md, hostile.json and hostile.png from `python -m benchmarks.hostile`'s results."""

from __future__ import annotations

import json
from pathlib import Path

P99_RATIO = 3.0  # a phase's p99 may be at most this many times the alone p99
QUANTILES = [*range(100), 99.5, 99.9, 100]  # of the good client's latency, kept for the plot


def write_hostile_report(results: dict, out: Path) -> None:
    """Write the JSON, the plot and the Markdown report (made from the JSON's contents) to `out`."""
    (out / "hostile.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "hostile.png")
    (out / "HOSTILE.md").write_text(markdown(results))
    print(f"wrote {out / 'HOSTILE.md'}, hostile.json and hostile.png")


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else "**PASS**" if ok else "**FAIL**"


def markdown(results: dict) -> str:
    """The report: the set-up, a row per phase, what the hostile clients got, the checks, the verdicts."""
    service, machine, verdicts = results["service"], results["machine"], results["verdicts"]
    model = service["model"]
    passed = sum(verdicts.values())
    lines = [
        "# The Bento beside hostile clients",
        "",
        f"`python -m benchmarks.hostile` (`make hostile`), {results['date']}, on {machine['cores']} cores "
        f"({machine['cpu']}): {results['served']}, served by `bentoml serve` with {service['workers']} worker "
        f"(backend {model.get('backend', '?')}; at most {service['max_in_flight']} uploads at once; key rate limits "
        f"{service['key_rate_limits']}; unknown keys {service['unknown_key_limit']} an address; strangers' refusals "
        f"sent after {service['stranger_delay_s']:g} s; body limits "
        f"{service['max_form_bytes']:,} bytes for forms, {service['max_image_bytes']:,} for images; database "
        f"{service['database']}; images in {service['image_store']}). "
        "Every client runs on the same machine, so what the hostile ones cost the cores is part of every figure.",
        "",
        f"**{'PASS' if results['passed'] else 'FAIL'}**: {passed} of {len(verdicts)} criteria pass.",
        "",
        f"## The good client: POST /predict, one request at a time, {results['seconds']:g} s a phase",
        "",
        f"| phase | requests | failed | p50 ms | p99 ms | p99 / alone | service's CPU (cores) | no failed request "
        f"| p99 within {P99_RATIO:g}× alone |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    alone = results["phases"]["alone"]["p99_ms"]
    for name, phase in results["phases"].items():
        checks = [verdicts.get(f"{name}: {what}") for what in ("no failed requests", f"p99 within {P99_RATIO:g}x alone")]
        lines.append(
            f"| {name} | {phase['requests']} | {phase['failed']} | {phase['p50_ms']:.1f} | {phase['p99_ms']:.1f} "
            f"| {phase['p99_ms'] / alone:.2f} | {phase['service_cores']:.2f} | {verdict(checks[0])} | {verdict(checks[1])} |"
        )
    failures = {f"{name}: {status}": n for name, p in results["phases"].items() for status, n in p["statuses"].items()}
    failures = {k: n for k, n in failures.items() if not k.rpartition(": ")[2].startswith("2")}
    lines += [
        "",
        "The good client's answers that were not 2xx: " + (", ".join(f"{k} × {n}" for k, n in failures.items()) or "none."),
    ]
    lines += ["", "![the good client's latency per phase](hostile.png)", "", "## What the hostile clients got", ""]
    flood = results["hostile"]["made-up keys"]
    statuses = ", ".join(f"{status} × {n}" for status, n in sorted(flood["statuses"].items()))
    lines += [
        f"- **Made-up keys**: {flood['connections']} senders in {flood['processes']} processes, POST /predict with a new "
        f"`Bearer insect_<random>` each time (busy on {flood['cores']:.2f} cores themselves): {flood['requests']} "
        f"requests in {flood['window_s']:g} s ({flood['requests'] / flood['window_s']:.0f} a second), answered {statuses}.",
        "",
    ]
    uploads = results["hostile"]["slow uploads"]
    lines += [
        f"- **Slow uploads**: {uploads['connections']} connections at once (one process) POSTing /app/identify without a "
        "session, announcing a 5 MB form and sending 8 bytes of it every 100 ms, a new connection at once when "
        f"answered (busy on {uploads['cores']:.2f} cores themselves): {uploads['uploads']} uploads in "
        f"{uploads['window_s']:g} s ({uploads['uploads'] / uploads['window_s']:.0f} a second).",
        "",
        "| answer | uploads | median bytes sent | most bytes sent | median seconds to the answer |",
        "|---|---:|---:|---:|---:|",
    ]
    for status, answer in uploads["answers"].items():
        lines.append(
            f"| {status} | {answer['count']} | {answer['median_sent']:.0f} | {answer['max_sent']} | {answer['median_s']:.2f} |"
        )
    lines += [
        "",
        "## Two checks",
        "",
        "| form to /app/sign-in | answer | seconds | bytes sent when answered | refused before it is read |",
        "|---|---|---:|---:|---|",
    ]
    for form in results["big_forms"]:
        name = f"{form['bytes'] / 1e6:g} MB form ({form['framing']})"
        lines.append(
            f"| {name} | {form['status_line']} | {form['seconds']:.2f} | {form['sent']:,} "
            f"| {verdict(verdicts[f'{name}: 413 before it is read'])} |"
        )
    paths = results["unknown_paths"]
    before, after = paths["before"], paths["after"]
    criterion = f"{paths['requests']} made-up paths: /metrics keeps its samples"
    answered = ", ".join(f"{status} × {n}" for status, n in paths["statuses"].items())
    lines += [
        "",
        f"{paths['requests']} requests without a key to `/no-such-route-<uuid>` (answered {answered}), after a few such "
        "requests to let a catch-all label appear; /metrics read with an admin key:",
        "",
        "| /metrics | status | bytes | sample lines | `bentoml_service_request_total` lines |",
        "|---|---:|---:|---:|---:|",
        f"| before | {before['status']} | {before['bytes']:,} | {before['samples']} | {before['request_total_samples']} |",
        f"| after | {after['status']} | {after['bytes']:,} | {after['samples']} | {after['request_total_samples']} |",
        "",
        f"Same number of samples: {verdict(verdicts[criterion])}.",
        "",
        "## Criteria",
        "",
        *(f"- {verdict(ok)} {name}" for name, ok in verdicts.items()),
        "",
        "## Rerun",
        "",
        "`make hostile` (or `python -m benchmarks.hostile`; `--help` lists the options) serves the champion of the "
        "configured registry (`make demo` makes one; without one it registers an untrained tiny model in a temp data "
        "dir and says so above) on the configured PostgreSQL (the embedded one by default) and image store, runs the "
        "three phases and the two checks, rewrites this file, hostile.json and hostile.png, and exits 1 when a "
        "criterion fails (`--no-fail`: 0). Run it on a quiet machine: anything else on the cores moves the p99s. "
        "A 413 counts as before the form is read when at most 16 MiB had gone out (what loopback socket buffers take "
        "without the server reading).",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """The good client's latency distribution (a CDF) in each phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for name, phase in results["phases"].items():
        axis.plot(phase["quantiles_ms"], QUANTILES, label=f"{name} (p99 {phase['p99_ms']:.0f} ms)")
    bound = P99_RATIO * results["phases"]["alone"]["p99_ms"]
    axis.axvline(bound, color="grey", linestyle="--", label=f"{P99_RATIO:g}× the alone p99 (the bound)")
    axis.set_xscale("log")
    axis.set_xlabel("latency of POST /predict (ms)")
    axis.set_ylabel("percentile")
    axis.set_title("The good client, one request at a time")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
