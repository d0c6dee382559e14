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


def test_image_holds_everything_make_demo_runs():
    copied = {line.split()[1] for line in (REPO / "infra" / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    code = {p.name for p in REPO.iterdir() if p.is_dir() and any(p.glob("*.py")) and p.name not in {"tests", "benchmarks"}}
    assert code <= copied, f"not in the image: {code - copied}"
    assert "scripts" in copied  # make demo runs scripts/demo.sh


def test_bentofile_names_the_service_and_existing_files_and_the_locked_versions():
    import tomllib

    bentofile = yaml.safe_load((REPO / "bentos" / "bentofile.yaml").read_text())
    module, _, service = bentofile["service"].partition(":")
    assert f"class {service}" in (REPO / (module.replace(".", "/") + ".py")).read_text()
    for pattern in bentofile["include"]:
        assert list(REPO.glob(pattern)), pattern
    locked = {p["name"]: p["version"] for p in tomllib.loads((REPO / "uv.lock").read_text())["package"]}
    pinned = [line.split(";")[0].strip() for line in (REPO / bentofile["python"]["requirements_txt"]).read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert pinned, "no requirements exported"
    for requirement in pinned:
        name, _, version = requirement.partition("==")
        assert locked.get(name.split("[")[0].lower().replace("_", "-")) == version, f"{requirement} differs from uv.lock"
    assert {"bentoml", "mlflow", "torch", "apache-tvm"} <= {r.partition("==")[0] for r in pinned}
