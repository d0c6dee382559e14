"""No container engine runs here: the compose file, the Dockerfile, the Kubernetes manifests and
the Helm values are checked against the project: every file, command and variable they name
exists, and their ports and variables agree with the config module and `make up`."""

import json
import re

import pytest
import yaml

from config import REPO_ROOT, Settings
from stack import Stack, secrets

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
KUBERNETES = REPO_ROOT / "infra" / "kubernetes"
MANIFESTS = [doc for doc in yaml.safe_load_all((KUBERNETES / "platform.yaml").read_text()) if doc]
HELM_VALUES = yaml.safe_load((KUBERNETES / "airflow-values.yaml").read_text())
OUR_SERVICES = {name: s for name, s in COMPOSE["services"].items() if s.get("image") == "insect-mlops:latest"}
WORKLOADS = [doc for doc in MANIFESTS if doc["kind"] in ("Deployment", "Job")]
CONTAINERS = [
    c for doc in WORKLOADS for c in doc["spec"]["template"]["spec"]["containers"] if c["image"] == "insect-mlops:latest"
]
CONFIGMAP = {k for doc in MANIFESTS if doc["kind"] == "ConfigMap" for k in doc["data"]}


def _environment_names() -> set[str]:
    names = {k for s in COMPOSE["services"].values() for k in s.get("environment", {})}
    names |= {e["name"] for c in CONTAINERS for e in c.get("env", [])}
    names |= {e["name"] for e in HELM_VALUES["env"]}
    return names | {k for doc in MANIFESTS if doc["kind"] == "ConfigMap" for k in doc["data"]}


def _settings_field_exists(variable: str) -> bool:
    model, *path = variable.removeprefix("INSECT_").lower().split("__")
    fields = Settings.model_fields
    for name in [model, *path]:
        if name not in fields:
            return False
        fields = getattr(fields[name].annotation, "model_fields", {})
    return True


def test_our_services_run_from_the_project_image_with_commands_from_its_environment():
    build = COMPOSE["x-insect-image"]["build"]
    assert (REPO_ROOT / build["context"] / build["dockerfile"]).is_file()
    assert "ENV PATH=/app/.venv/bin:$PATH" in (REPO_ROOT / "infra" / "Dockerfile").read_text()
    commands = [s["command"] for name, s in OUR_SERVICES.items() if name != "airflow-init"]
    commands += [c["command"] for c in CONTAINERS]
    for command in commands:
        program = command[0]
        assert program == "make" or (REPO_ROOT / ".venv" / "bin" / program).is_file(), command
        if program == "bentoml":
            module, _, cls = command[2].partition(":")
            assert f"class {cls}" in (REPO_ROOT / (module.replace(".", "/") + ".py")).read_text()
        if program == "make":
            assert f"\n{command[1]}:" in (REPO_ROOT / "Makefile").read_text()


def test_mounted_files_exist_and_the_database_script_creates_what_make_up_creates():
    mounts = [v.split(":")[0] for s in COMPOSE["services"].values() for v in s.get("volumes", []) if v.startswith("./")]
    assert mounts and all((REPO_ROOT / m).is_file() for m in mounts), mounts
    script = (REPO_ROOT / "infra" / "postgres" / "create-databases.sh").read_text()
    from stack import DATABASES

    for database, secret in DATABASES.items():
        assert f"{database}:{secrets.ENV_NAMES[secret]}" in script


def test_every_variable_compose_and_kubernetes_interpolate_comes_from_the_env_file():
    text = (REPO_ROOT / "docker-compose.yml").read_text()
    compose_vars = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    kubernetes_vars = set(
        re.findall(r"\$\((\w+)\)", (KUBERNETES / "platform.yaml").read_text() + (KUBERNETES / "airflow-values.yaml").read_text())
    )
    configmap = {k for doc in MANIFESTS if doc["kind"] == "ConfigMap" for k in doc["data"]}
    assert compose_vars and compose_vars <= set(secrets.ENV_NAMES.values())
    assert kubernetes_vars and kubernetes_vars <= set(secrets.ENV_NAMES.values()) | configmap


def test_each_kubernetes_workload_reads_only_its_own_secret():
    """A workload's Secret is `insect-<workload>`, written by `python -m stack env-file --workload`,
    and every secret its containers interpolate is in that Secret."""
    from_helm = yaml.safe_load(HELM_VALUES["extraEnvFrom"])
    helm = {"metadata": {"name": "airflow"}, "secrets": [e["secretRef"]["name"] for e in from_helm if "secretRef" in e]}
    helm["text"] = yaml.safe_dump(HELM_VALUES["env"])
    workloads = [helm] + [
        {
            "metadata": doc["metadata"],
            "secrets": [
                e["secretRef"]["name"]
                for c in doc["spec"]["template"]["spec"]["containers"]
                for e in c.get("envFrom", [])
                if "secretRef" in e
            ],
            "text": yaml.safe_dump(doc["spec"]["template"]["spec"]["containers"]),
        }
        for doc in WORKLOADS
    ]
    for workload in workloads:
        assert len(workload["secrets"]) <= 1, workload["metadata"]["name"]
        names = [name for secret in workload["secrets"] for name in secrets.WORKLOADS[secret.removeprefix("insect-")]]
        used = set(re.findall(r"\$\(?(\w+)\)?", workload["text"])) - CONFIGMAP
        assert used <= {secrets.ENV_NAMES[name] for name in names}, (workload["metadata"]["name"], used)


def test_env_file_holds_every_secret_privately(tmp_path):
    values = secrets.load_or_create(tmp_path / "secrets.json")
    secrets.write_env_file(values, tmp_path / ".env")
    written = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines())
    assert written == {secrets.ENV_NAMES[name]: values[name] for name in secrets.NAMES}
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0


def test_every_insect_and_airflow_variable_is_a_real_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("INSECT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("INSECT_STACK__EXECUTOR", "celery")
    from airflow.configuration import conf

    options = conf.configuration_description  # Airflow's own and its installed providers' options
    stack = Stack(Settings())
    local = stack.environment() | stack.airflow_secrets()
    for name in _environment_names() | set(local):
        if name.startswith("INSECT_"):
            assert _settings_field_exists(name), name
        elif name.startswith("AIRFLOW__"):
            section, key = name.removeprefix("AIRFLOW__").lower().split("__")
            assert key in options.get(section, {}).get("options", {}), name


def test_deployments_set_what_make_up_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("INSECT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("INSECT_STACK__EXECUTOR", "celery")  # compose runs Celery workers
    stack = Stack(Settings())
    local = stack.environment() | stack.airflow_secrets()
    # a container listens on its own interface (make up: 127.0.0.1); its home and port are the image's
    # make up alone keeps SimpleAuthManager (on 127.0.0.1); compose logs in through FAB
    make_up_only = ("AIRFLOW_HOME", "AIRFLOW__API__PORT", "AIRFLOW__API__HOST", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER")
    wanted = {k for k in local if not k.startswith(make_up_only)}
    airflow_env = set(COMPOSE["x-airflow-common"]["environment"])
    assert wanted - airflow_env == set(), "in make up's environment but not in compose's Airflow services"
    kubernetes = _environment_names() | set(secrets.ENV_NAMES.values())
    service_env = {k for k in local if not k.startswith("AIRFLOW")}
    assert service_env - kubernetes == set()


@pytest.mark.parametrize(
    ("service", "port"), [("mlflow", "mlflow_port"), ("airflow-apiserver", "airflow_port"), ("minio", "s3_port"), ("bento", None)]
)
def test_published_ports_are_the_configured_ones(service, port):
    settings = Settings()
    expected = settings.serve.port if port is None else getattr(settings.stack, port)
    assert any(published.endswith(f"{expected}:{expected}") for published in COMPOSE["services"][service]["ports"])


def test_compose_publishes_every_port_on_the_hosts_loopback_only():
    published = [port for service in COMPOSE["services"].values() for port in service.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for port in published), published


def test_no_compose_service_but_minio_and_its_init_job_holds_minios_root_login():
    root = secrets.ENV_NAMES["minio_root_password"]
    holders = {name for name, service in COMPOSE["services"].items() if root in yaml.safe_dump(service.get("environment", {}))}
    assert holders == {"minio", "minio-buckets"}
    assert COMPOSE["services"]["minio"]["environment"]["MINIO_ROOT_USER"] not in yaml.safe_dump(COMPOSE["x-insect-env"])
    init = (REPO_ROOT / "infra" / "minio" / "init.sh").read_text()
    # the services' keys belong to a user the policy limits to the two buckets
    assert """ "$AWS_SECRET_ACCESS_KEY" | mc admin user add local "$AWS_ACCESS_KEY_ID"\n""" in init  # the secret on stdin
    policy = json.loads((REPO_ROOT / "infra" / "minio" / "insect-buckets.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}{suffix}" for bucket in ("mlflow", "feedback") for suffix in ("", "/*")}


def test_kubernetes_serves_on_the_configured_ports_with_the_helm_chart_on_kubernetes_executor():
    settings = Settings()
    ports = {c["name"]: c["ports"][0]["containerPort"] for c in CONTAINERS if c.get("ports")}
    assert ports == {"mlflow": settings.stack.mlflow_port, "bento": settings.serve.port}
    services = {doc["metadata"]["name"]: doc["spec"]["ports"][0]["port"] for doc in MANIFESTS if doc["kind"] == "Service"}
    assert services == {"insect-mlflow": settings.stack.mlflow_port, "insect-bento": settings.serve.port, "insect-redis": 6379}
    assert HELM_VALUES["executor"] == "KubernetesExecutor"
    assert f"{HELM_VALUES['images']['airflow']['repository']}:latest" == next(iter(OUR_SERVICES.values()))["image"]
    import importlib.metadata

    assert HELM_VALUES["airflowVersion"] == importlib.metadata.version("apache-airflow")


def test_dockerfile_copies_only_what_exists():
    for line in (REPO_ROOT / "infra" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), source


def test_image_holds_everything_the_services_run():
    copied = {
        line.split()[1] for line in (REPO_ROOT / "infra" / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")
    }
    code = {p.name for p in REPO_ROOT.iterdir() if p.is_dir() and any(p.glob("*.py")) and p.name not in {"tests", "benchmarks"}}
    assert code <= copied, f"not in the image: {code - copied}"
    assert "scripts" in copied  # make demo runs scripts/demo.sh


def test_bentofile_names_the_service_and_existing_files_and_the_locked_versions():
    import tomllib

    bentofile = yaml.safe_load((REPO_ROOT / "bentos" / "bentofile.yaml").read_text())
    module, _, service = bentofile["service"].partition(":")
    assert f"class {service}" in (REPO_ROOT / (module.replace(".", "/") + ".py")).read_text()
    for pattern in bentofile["include"]:
        assert list(REPO_ROOT.glob(pattern)), pattern
    locked = {p["name"]: p["version"] for p in tomllib.loads((REPO_ROOT / "uv.lock").read_text())["package"]}
    pinned = [
        line.split(";")[0].strip()
        for line in (REPO_ROOT / bentofile["python"]["requirements_txt"]).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert pinned, "no requirements exported"
    for requirement in pinned:
        name, _, version = requirement.partition("==")
        assert locked.get(name.split("[")[0].lower().replace("_", "-")) == version, f"{requirement} differs from uv.lock"
    assert {"bentoml", "mlflow", "torch", "apache-tvm"} <= {r.partition("==")[0] for r in pinned}


def test_the_build_context_leaves_out_the_environment_data_and_secrets():
    ignored = {line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    assert {".venv", "data", ".env", ".env.*", ".git"} <= ignored
    copied = {
        word
        for line in (REPO_ROOT / "infra" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for word in line.split()[1:-1]
    }
    assert not copied & ignored


def test_compose_and_kubernetes_put_the_base_dataset_in_place_before_the_first_retrain():
    assert "python -m ml.data generate" in COMPOSE["services"]["airflow-init"]["command"][0]
    [job] = [c for c in CONTAINERS if c["command"] == ["python", "-m", "ml.data", "generate"]]
    assert {"name": "INSECT_DATA_DIR", "value": "/data"} in job["env"] and job["volumeMounts"][0]["mountPath"] == "/data"


def test_compose_and_kubernetes_configure_mlflows_logins_as_make_up_does():
    import configparser

    from registry.logins import auth_config

    committed, generated = configparser.ConfigParser(), configparser.ConfigParser()
    committed.read(REPO_ROOT / "infra" / "mlflow" / "basic_auth.ini")
    generated.read_string(auth_config("sqlite:////var/lib/mlflow-auth/basic_auth.db"))
    assert dict(committed["mlflow"]) == dict(generated["mlflow"])


def test_no_command_line_in_compose_or_kubernetes_holds_a_secret():
    """Compose's `${VAR}` and Kubernetes' `$(VAR)` in a command put the value in the process's
    argv (which `ps` shows); a shell's own `$$VAR`, read from the environment inside, does not."""
    names = set(secrets.ENV_NAMES.values())
    compose = [yaml.safe_dump(s[k]) for s in COMPOSE["services"].values() for k in ("command", "entrypoint") if k in s]
    containers = [c for doc in WORKLOADS for c in doc["spec"]["template"]["spec"]["containers"]]  # Redis's too
    kubernetes = [yaml.safe_dump(c[k]) for c in containers for k in ("command", "args") if k in c]
    interpolated = {v for text in compose for v in re.findall(r"(?<!\$)\$\{(\w+)", text)}
    interpolated |= {v for text in kubernetes for v in re.findall(r"\$\((\w+)\)", text)}
    assert compose and kubernetes and not interpolated & names, interpolated & names


def _is_feedback_migrate(command: list[str]) -> bool:
    return command == ["python", "-m", "feedback", "migrate"]


def test_the_feedback_migrate_command_exists():
    from feedback.__main__ import app

    assert "migrate" in {command.name or command.callback.__name__ for command in app.registered_commands}


def test_compose_migrates_the_feedback_database_once_before_the_bento_starts():
    """An init job runs `python -m feedback migrate` on the Bento's database once PostgreSQL is
    healthy; the Bento (and Airflow, whose DAGs read it) waits for it to complete."""
    [name] = [name for name, service in OUR_SERVICES.items() if _is_feedback_migrate(service.get("command", []))]
    job, bento = COMPOSE["services"][name], COMPOSE["services"]["bento"]
    assert job["environment"]["INSECT_FEEDBACK__DATABASE_URL"] == bento["environment"]["INSECT_FEEDBACK__DATABASE_URL"]
    assert job["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "restart" not in job  # a job, not a service that stays up
    waits = {"condition": "service_completed_successfully"}
    assert bento["depends_on"][name] == waits
    assert COMPOSE["services"]["airflow-worker"]["depends_on"][name] == waits


def test_kubernetes_has_a_job_migrating_the_bentos_feedback_database():
    [job] = [doc for doc in MANIFESTS if doc["kind"] == "Job" and doc["metadata"]["name"] == "insect-feedback-migrate"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert _is_feedback_migrate(container["command"]) and container["image"] == "insect-mlops:latest"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] >= 1
    [bento] = [doc for doc in MANIFESTS if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "insect-bento"]
    [served] = bento["spec"]["template"]["spec"]["containers"]

    def database(c: dict) -> str:
        return next(e["value"] for e in c["env"] if e["name"] == "INSECT_FEEDBACK__DATABASE_URL")

    assert database(container) == database(served)
    assert container["envFrom"] == served["envFrom"]  # the same Secret and endpoints as the Bento's
    init_containers = bento["spec"]["template"]["spec"].get("initContainers", [])
    assert not any(_is_feedback_migrate(c.get("command", [])) for c in init_containers)  # not once per replica
