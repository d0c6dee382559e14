"""A smoke run of `python -m benchmarks.hostile`: a real Bento, hostile clients in their own
processes, seconds a phase. Whether the service passes is the full run's to say; this checks that
every phase and check ran and reported, and that no made-up key was let through."""

import json

import pytest

from benchmarks import hostile
from config import get_settings


@pytest.mark.slow
def test_a_short_hostile_run_measures_every_phase_and_check(tmp_path, monkeypatch, postgres_url):
    monkeypatch.setenv("INSECT_DATA_DIR", str(tmp_path / "empty"))  # no registry there: the tiny model is served
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("INSECT_FEEDBACK__DATABASE_URL", postgres_url)
    monkeypatch.setenv("INSECT_FEEDBACK__S3_BUCKET", "")  # local image files
    get_settings.cache_clear()
    try:
        hostile.main(seconds=2, senders=8, slow_uploads=30, form_mb=2, unknown_paths_count=30, report_dir=tmp_path, fail=False)
    finally:
        get_settings.cache_clear()
    results = json.loads((tmp_path / "hostile.json").read_text())
    assert "untrained tiny model" in results["served"] and results["service"]["model"]["version"] == "1"
    assert all(phase["requests"] > 0 for phase in results["phases"].values())
    assert results["phases"]["alone"]["failed"] == 0
    flood = results["hostile"]["made-up keys"]
    assert flood["requests"] > 0 and not any(status.startswith("2") for status in flood["statuses"])
    assert results["hostile"]["slow uploads"]["uploads"] >= 30
    assert [form["framing"] for form in results["big_forms"]] == ["Content-Length", "chunked"]
    assert all(form["status"] is not None for form in results["big_forms"])  # answered, whatever it said
    assert sum(results["unknown_paths"]["statuses"].values()) == 30 and results["unknown_paths"]["after"]["status"] == 200
    assert results["verdicts"] == hostile.verdicts(results) and results["passed"] == all(results["verdicts"].values())
    report = (tmp_path / "HOSTILE.md").read_text()
    assert all(f"| {phase} |" in report for phase in results["phases"]) and (tmp_path / "hostile.png").stat().st_size > 0
