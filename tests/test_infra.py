"""No container engine runs here: check the compose file and Dockerfile against the project."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_compose_builds_from_existing_files_and_runs_make_targets():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    makefile = (REPO / "Makefile").read_text()
    for name, service in compose["services"].items():
        assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        assert service["environment"]["INSECT_DATA_DIR"] == "/data"
        if service["command"][0] == "make":
            assert f"\n{service['command'][1]}:" in makefile


def test_dockerfile_copies_only_what_exists():
    for line in (REPO / "infra" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
