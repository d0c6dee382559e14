"""No container engine runs here: the compose file, the Dockerfile, the Kubernetes manifests and
the Helm values are checked against the project: every file, command and variable they name
exists, and their ports and variables agree with the config module and `make up`."""

import configparser
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

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
DOCKERFILE = (REPO_ROOT / "infra" / "Dockerfile").read_text()
SECRET_VARIABLES = set(secrets.ENV_NAMES.values())  # what the env file holds, by the name deployments use
# Airflow's components by the Helm chart's names for their values; `workers` configures the
# KubernetesExecutor's task pods
HELM_COMPONENTS = {
    "airflow-api-server": "apiServer",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dagProcessor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "workers",
}
TASK_RUNNERS = {"airflow-worker"}  # the only Airflow processes that run tasks: Celery workers, task pods
TASK_SECRETS = {secrets.ENV_NAMES[name] for name in secrets.WORKLOADS["airflow-tasks"]}
KEY_MAKERS = {"signing-key"}  # compose's job making the model-signing key (Kubernetes: a Secret made by hand)


@dataclass
class Workload:
    """What one workload (compose service, pod, Helm component) is given."""

    secrets: set[str]  # env-file variables it receives
    env: dict[str, str]  # its environment; a Secret's key reads `$(KEY)`
    mounts: list[tuple[str, str, bool]]  # (volume, path in the container, writable)
    secret_objects: set[str] = field(default_factory=set)  # Kubernetes Secrets its environment comes from

    @property
    def volumes(self) -> set[str]:
        return {volume for volume, _, _ in self.mounts}

    def volume_at(self, path: str) -> tuple[str, bool] | None:
        """The volume holding `path`, and whether it is mounted writable; None when none does."""
        found = [(len(t), volume, writable) for volume, t, writable in self.mounts if PurePosixPath(path).is_relative_to(t)]
        return max(found)[1:] if found else None


def _compose_workload(service: dict) -> Workload:
    env = {name: str(value) for name, value in service.get("environment", {}).items()}
    held = {v for value in env.values() for v in re.findall(r"(?<!\$)\$\{(\w+)", value)} & SECRET_VARIABLES
    mounts = []
    for spec in service.get("volumes", []):
        source, target, *options = spec.split(":")
        mounts.append((source, target, "ro" not in ",".join(options).split(",")))
    return Workload(held, env, mounts)


def _kubernetes_workload(env_from: list, env: list, volumes: list, mounts: list) -> Workload:
    objects = {e["secretRef"]["name"] for e in env_from if "secretRef" in e}
    held = {secrets.ENV_NAMES[name] for obj in objects for name in secrets.WORKLOADS.get(obj.removeprefix("insect-"), ())}
    values = {}
    for entry in env:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:  # an env-file secret by its variable; the chart's own (airflow-metadata) by name
            objects.add(ref["name"])
            held.add(ref["key"])
            values[entry["name"]] = f"$({ref['key']})" if ref["key"] in SECRET_VARIABLES else f"<{ref['name']}/{ref['key']}>"
        else:
            values[entry["name"]] = str(entry.get("value", ""))
    sources = {}
    for volume in volumes:  # a PVC by its claim (every subPath of it), a Secret or ConfigMap by name
        if "persistentVolumeClaim" in volume:
            sources[volume["name"]] = f"pvc:{volume['persistentVolumeClaim']['claimName']}"
        elif "secret" in volume:
            sources[volume["name"]] = f"secret:{volume['secret']['secretName']}"
        elif "configMap" in volume:
            sources[volume["name"]] = f"configmap:{volume['configMap']['name']}"
        else:  # emptyDir and the like: the pod's own
            sources[volume["name"]] = f"pod:{id(volume)}"
    mounted = [(sources[m["name"]], m["mountPath"], not m.get("readOnly", False)) for m in mounts]
    return Workload(held & SECRET_VARIABLES, values, mounted, objects)


def _platform_workloads() -> dict[str, Workload]:
    workloads = {}
    for doc in WORKLOADS:
        spec = doc["spec"]["template"]["spec"]
        containers = spec["containers"] + spec.get("initContainers", [])
        workloads[doc["metadata"]["name"].removeprefix("insect-")] = _kubernetes_workload(
            [e for c in containers for e in c.get("envFrom", [])],
            [e for c in containers for e in c.get("env", [])],
            spec.get("volumes", []),
            [m for c in containers for m in c.get("volumeMounts", [])],
        )
    return workloads


def _helm_workloads() -> dict[str, Workload]:
    """Each Airflow component as the chart renders it: the values for every container, then its own."""
    env_from = yaml.safe_load(HELM_VALUES.get("extraEnvFrom") or "[]")
    secret_env = [
        {"name": s["envName"], "valueFrom": {"secretKeyRef": {"name": s["secretName"], "key": s["secretKey"]}}}
        for s in HELM_VALUES.get("secret", [])
    ]
    workloads = {}
    for name, key in HELM_COMPONENTS.items():
        own = HELM_VALUES.get(key, {})
        workloads[name] = _kubernetes_workload(
            env_from,
            HELM_VALUES.get("env", []) + secret_env + own.get("env", []),
            HELM_VALUES.get("volumes", []) + own.get("extraVolumes", []),
            HELM_VALUES.get("volumeMounts", []) + own.get("extraVolumeMounts", []),
        )
    return workloads


PLATFORMS = {
    "compose": {name: _compose_workload(service) for name, service in COMPOSE["services"].items()},
    "kubernetes": _platform_workloads() | _helm_workloads(),
}


def _environment_names() -> set[str]:
    names = {k for s in COMPOSE["services"].values() for k in s.get("environment", {})}
    names |= {e["name"] for c in CONTAINERS for e in c.get("env", [])}
    names |= {e["name"] for key in HELM_COMPONENTS.values() for e in HELM_VALUES["env"] + HELM_VALUES.get(key, {}).get("env", [])}
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
    commands = [s.get("command") or s["entrypoint"] for name, s in OUR_SERVICES.items() if name != "airflow-init"]
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
    """A workload's environment comes from one Secret at most, `insect-<workload>`, written by
    `python -m stack env-file --workload`, and every secret it interpolates is one it was given."""
    for name, workload in PLATFORMS["kubernetes"].items():
        ours = {s for s in workload.secret_objects if s.startswith("insect-")}  # not the chart's (airflow-metadata)
        assert len(ours) <= 1, (name, ours)
        own = {secrets.ENV_NAMES[n] for s in ours for n in secrets.WORKLOADS[s.removeprefix("insect-")]}
        assert workload.secrets <= own, (name, workload.secrets - own)
        used = {v for value in workload.env.values() for v in re.findall(r"\$\((\w+)\)", value)} - CONFIGMAP
        assert used <= workload.secrets, (name, used - workload.secrets)


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
    # compose's task runners (the Celery workers) hold the tasks' secrets; the MLflow server alone
    # reaches its bucket (clients go through its --serve-artifacts proxy), so no client needs its endpoint
    airflow_env = set(COMPOSE["x-airflow-common"]["environment"]) | set(COMPOSE["services"]["airflow-worker"]["environment"])
    missing = wanted - airflow_env - {"MLFLOW_S3_ENDPOINT_URL"}
    assert missing == set(), "in make up's environment but not in compose's task runners"
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
    from registry.logins import auth_config

    committed, generated = configparser.ConfigParser(), configparser.ConfigParser()
    committed.read(REPO_ROOT / "infra" / "mlflow" / "basic_auth.ini")
    generated.read_string(auth_config("sqlite:////var/lib/mlflow-auth/basic_auth.db"))
    assert dict(committed["mlflow"]) == dict(generated["mlflow"])


# printf is a shell builtin: what it prints into a pipe is no process's argument
_PRINTED_INTO_A_PIPE = re.compile(r"""printf\s+(?:'[^']*'|"[^"]*")\s+"\$\$?\{?\w+\}?"\s*\|""")


def _secrets_in(text: str) -> set[str]:
    """Secret variables `text` expands: compose's `${X}`, a shell's `$X`, `$$X` or `${!X}`, Kubernetes' `$(X)`."""
    text = _PRINTED_INTO_A_PIPE.sub("", text)
    return {a or b for a, b in re.findall(r"\$\$?\{?!?(\w+)\}?|\$\((\w+)\)", text)} & SECRET_VARIABLES


def _words(command) -> str:
    return " ".join(map(str, command)) if isinstance(command, list) else str(command)


def test_no_command_line_in_compose_or_kubernetes_holds_a_secret():
    """A secret in a command line is in the process's argv, which `ps` shows: compose's
    `${VAR}`, Kubernetes' `$(VAR)`, and a shell's own `$VAR` handed to a program alike. A
    secret reaches a program through its environment, a file or its stdin."""
    compose = [s[k] for s in COMPOSE["services"].values() for k in ("command", "entrypoint") if k in s]
    compose += [s["healthcheck"]["test"] for s in COMPOSE["services"].values() if "healthcheck" in s]
    containers = [c for doc in WORKLOADS for c in doc["spec"]["template"]["spec"]["containers"]]  # Redis's too
    kubernetes = [c[k] for c in containers for k in ("command", "args") if k in c]
    probes = [c[p] for c in containers for p in ("livenessProbe", "readinessProbe") if p in c]
    kubernetes += [probe["exec"]["command"] for probe in probes if "exec" in probe]
    helm = [HELM_VALUES.get(key, {}) for key in HELM_COMPONENTS.values()]
    kubernetes += [component[k] for component in helm for k in ("command", "args") if k in component]
    leaks = {_words(command): _secrets_in(_words(command)) for command in compose + kubernetes}
    assert compose and kubernetes and not any(leaks.values()), {c: s for c, s in leaks.items() if s}


def test_the_database_script_passes_no_password_on_a_command_line():
    """psql reads each role's password from its own environment (`\\getenv`, psql 15+), not `-v`."""
    script = (REPO_ROOT / "infra" / "postgres" / "create-databases.sh").read_text()
    assert not re.search(r"-v\s*password=", script) and "${!" not in script and not _secrets_in(script)
    assert "\\getenv password :password_var" in script
    postgres = COMPOSE["services"]["postgres"]
    assert int(postgres["image"].partition(":")[2].split("-")[0]) >= 15  # \getenv is psql 15's


def _is_feedback_migrate(command: list[str]) -> bool:
    return command == ["python", "-m", "feedback", "migrate"]


def test_the_feedback_migrate_command_exists():
    from feedback.__main__ import app

    assert "migrate" in {command.name or command.callback.__name__ for command in app.registered_commands}


def _login_and_database(url: str) -> tuple[str, str]:
    """`postgresql+psycopg2://LOGIN:PASSWORD@HOST/DB` -> (LOGIN, HOST/DB)."""
    credentials, _, where = url.partition("://")[2].rpartition("@")
    return credentials.partition(":")[0], where


def test_compose_migrates_the_feedback_database_once_before_the_bento_starts():
    """An init job runs `python -m feedback migrate` on the Bento's database, as its owner, once
    PostgreSQL is healthy; the Bento (and Airflow, whose DAGs read it) waits for it to complete,
    and connects as a role of its own; the key administrator's tool as another."""
    [name] = [name for name, service in OUR_SERVICES.items() if _is_feedback_migrate(service.get("command", []))]
    job, bento = COMPOSE["services"][name], COMPOSE["services"]["bento"]
    keys = COMPOSE["services"]["feedback-keys"]
    logins = [_login_and_database(s["environment"]["INSECT_FEEDBACK__DATABASE_URL"]) for s in (job, bento, keys)]
    assert logins == [
        ("insect", "postgres:5432/insect"),
        ("insect_service", "postgres:5432/insect"),
        ("insect_keys", "postgres:5432/insect"),
    ]
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

    assert _login_and_database(database(container)) == ("insect", "$(POSTGRES_HOST):5432/insect")  # the owner migrates
    assert _login_and_database(database(served)) == ("insect_service", "$(POSTGRES_HOST):5432/insect")
    assert container["envFrom"][0] == {"secretRef": {"name": "insect-feedback-migrate"}}  # the owner's password: its own Secret
    init_containers = bento["spec"]["template"]["spec"].get("initContainers", [])
    assert not any(_is_feedback_migrate(c.get("command", [])) for c in init_containers)  # not once per replica


# Least privilege: each workload holds its own secrets and mounts only what it uses.


@pytest.mark.parametrize("platform", PLATFORMS)
def test_only_airflows_task_runners_hold_the_tasks_secrets_and_signing_key(platform):
    """The `airflow` MLflow login (it may promote), the feedback database, the S3 key reading
    feedback and the model-signing key reach the processes that run tasks, and no other part of
    Airflow (its API server, scheduler, DAG processor, triggerer and init jobs)."""
    workloads = PLATFORMS[platform]
    runner = workloads["airflow-worker"]
    assert runner.secrets >= TASK_SECRETS
    key = runner.volume_at(runner.env.get("INSECT_SIGNING__KEY_FILE", "/nowhere"))
    assert key, "the task runners get no model-signing key"
    for name, workload in workloads.items():
        if name.startswith("airflow-") and name not in TASK_RUNNERS:
            assert not workload.secrets & TASK_SECRETS, (name, workload.secrets & TASK_SECRETS)
            assert workload.env.get("MLFLOW_TRACKING_USERNAME") != "airflow", name
            assert key[0] not in workload.volumes and "INSECT_SIGNING__KEY_FILE" not in workload.env, name


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_bento_holds_no_secret_of_mlflow_or_of_airflows_tasks(platform):
    """The network-facing Bento holds its own logins only: none of the MLflow server's (its
    database, admin, S3 keys), nor the tasks' MLflow login, S3 key or signing key."""
    workloads = PLATFORMS[platform]
    bento, mlflow, runner = workloads["bento"], workloads["mlflow"], workloads["airflow-worker"]
    assert bento.secrets and not bento.secrets & mlflow.secrets, bento.secrets & mlflow.secrets
    # what both use by design: the feedback tables (the Bento writes, the tasks read), compose's one Redis
    shared = {secrets.ENV_NAMES["feedback_db_password"], secrets.ENV_NAMES["redis_password"]}
    assert bento.secrets & runner.secrets <= shared, bento.secrets & runner.secrets - shared
    assert bento.env.get("MLFLOW_TRACKING_USERNAME") == "bento"
    assert "INSECT_SIGNING__KEY_FILE" not in bento.env
    key = runner.volume_at(runner.env.get("INSECT_SIGNING__KEY_FILE", "/nowhere"))
    private = {volume for volume, _, _ in runner.mounts if volume.startswith("secret:")} | ({key[0]} if key else set())
    assert not bento.volumes & private, bento.volumes & private


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_signing_key_is_mounted_where_tasks_run_and_the_trusted_keys_read_only(platform):
    workloads = PLATFORMS[platform]
    runner, bento = workloads["airflow-worker"], workloads["bento"]
    key = runner.volume_at(runner.env.get("INSECT_SIGNING__KEY_FILE", "/nowhere"))
    assert key and not key[1], "the task runners read the private key from a volume they cannot write"
    holders = {name for name, workload in workloads.items() if key[0] in workload.volumes}
    assert "airflow-worker" in holders and holders <= TASK_RUNNERS | KEY_MAKERS, holders
    trusted = runner.volume_at(runner.env["INSECT_SIGNING__TRUSTED_KEYS_FILE"])
    assert trusted and not trusted[1] and trusted[0] != key[0]
    assert bento.volume_at(bento.env.get("INSECT_SIGNING__TRUSTED_KEYS_FILE", "/nowhere")) == trusted  # the same keys, read-only
    for name, workload in workloads.items():  # whoever may write the trusted keys could make the Bento load any model
        assert name in KEY_MAKERS or (trusted[0], True) not in {(v, w) for v, _, w in workload.mounts}, name


def test_compose_makes_the_signing_key_once_before_the_bento_and_airflow_start():
    from registry.__main__ import signing_key

    assert "create" in {command.name for command in signing_key.registered_commands}
    command = ["python", "-m", "registry", "signing-key", "create"]
    [name] = [name for name, service in COMPOSE["services"].items() if service.get("command") == command]
    job, worker = COMPOSE["services"][name], COMPOSE["services"]["airflow-worker"]
    assert name in KEY_MAKERS and "restart" not in job  # a job, not a service that stays up
    for setting in ("INSECT_SIGNING__KEY_FILE", "INSECT_SIGNING__TRUSTED_KEYS_FILE"):
        assert job["environment"][setting] == worker["environment"][setting]
    bento = COMPOSE["services"]["bento"]["environment"]
    assert job["environment"]["INSECT_SIGNING__TRUSTED_KEYS_FILE"] == bento["INSECT_SIGNING__TRUSTED_KEYS_FILE"]
    assert not _secrets_in(yaml.safe_dump(job.get("environment", {})))  # it needs no other secret
    for service in ("bento", "airflow-worker", "airflow-scheduler"):
        assert COMPOSE["services"][service]["depends_on"][name] == {"condition": "service_completed_successfully"}


def test_kubernetes_holds_the_signing_key_in_a_secret_and_the_trusted_keys_in_a_configmap():
    workloads = PLATFORMS["kubernetes"]
    runner = workloads["airflow-worker"]
    key, _ = runner.volume_at(runner.env["INSECT_SIGNING__KEY_FILE"])
    trusted, _ = runner.volume_at(runner.env["INSECT_SIGNING__TRUSTED_KEYS_FILE"])
    assert key.startswith("secret:") and trusted.startswith("configmap:")
    text = (KUBERNETES / "platform.yaml").read_text()  # how they are made, from the command that makes the key
    assert "python -m registry signing-key create" in text
    assert f"kubectl create secret generic {key.removeprefix('secret:')} " in text
    assert f"kubectl create configmap {trusted.removeprefix('configmap:')} " in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_no_workload_but_mlflow_mounts_its_login_store(platform):
    auth = configparser.ConfigParser()
    auth.read(REPO_ROOT / "infra" / "mlflow" / "basic_auth.ini")
    database = auth["mlflow"]["database_uri"].removeprefix("sqlite:///")
    workloads = PLATFORMS[platform]
    store = workloads["mlflow"].volume_at(database)
    assert store and store[1], "MLflow's login store is on no volume of its own"
    assert {name for name, workload in workloads.items() if store[0] in workload.volumes} == {"mlflow"}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_bento_shares_no_writable_volume_with_airflow(platform):
    """Files the Bento could write must never be where Airflow's tasks load from (they unpickle
    checkpoints): the Bento reads models through the registry only."""
    workloads = PLATFORMS[platform]
    bento = workloads["bento"]
    task_data = {volume for volume, _, writable in workloads["airflow-worker"].mounts if writable}
    airflow = {name: w for name, w in workloads.items() if name.startswith("airflow-") or w.volumes & task_data}
    airflow.pop("bento", None)
    for name, workload in airflow.items():
        for volume in bento.volumes & workload.volumes:
            mounts = [m for m in bento.mounts + workload.mounts if m[0] == volume]
            assert not any(writable for _, _, writable in mounts), (name, volume)


def _image_user() -> tuple[int, int]:
    """The `USER uid:gid` every stage of infra/Dockerfile runs as (its own last, else its base stage's)."""
    users: dict[str, str] = {}
    for stage in re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]:
        base, _, name = stage.split("\n", 1)[0].partition(" AS ")
        found = re.findall(r"^USER (\S+)", stage, flags=re.MULTILINE)
        users[name.strip() or f"stage {len(users)}"] = found[-1] if found else users.get(base.strip(), "root")
    assert len(set(users.values())) == 1 and re.fullmatch(r"\d+:\d+", next(iter(users.values()))), users
    uid, gid = map(int, next(iter(users.values())).split(":"))
    return uid, gid


def test_every_container_of_ours_runs_as_a_non_root_user():
    uid, gid = _image_user()
    assert uid > 0 and gid > 0
    ours = {name: s for name, s in COMPOSE["services"].items() if "build" in s or name == "redis"}  # Redis: our command
    users = {name: str(s.get("user", "root")) for name, s in ours.items()}
    assert {u for name, u in users.items() if name != "redis"} == {f"{uid}:{gid}"}, users
    assert users["redis"].partition(":")[0] not in ("root", "0"), users
    for doc in WORKLOADS:  # Redis's pod too
        spec = doc["spec"]["template"]["spec"]
        context = spec.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) > 0, doc["metadata"]["name"]
        if any(c["image"] == "insect-mlops:latest" for c in spec["containers"]):  # volumes writable by the image's user
            assert (context["runAsUser"], context.get("runAsGroup"), context.get("fsGroup")) == (uid, gid, gid)
        for container in spec["containers"]:
            own = container.get("securityContext", {})
            assert own.get("runAsUser", uid) != 0 and not own.get("privileged") and own.get("allowPrivilegeEscalation") is False
    pod = HELM_VALUES["securityContexts"]["pod"]
    assert pod["runAsNonRoot"] is True and (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)
    assert (HELM_VALUES["uid"], HELM_VALUES["gid"]) == (uid, gid)
    assert HELM_VALUES["securityContexts"]["containers"]["allowPrivilegeEscalation"] is False


def test_the_image_gives_its_user_every_directory_a_volume_is_mounted_on():
    """A new named volume takes the owner of the image's directory it is mounted on: without
    these, the services could not write their volumes."""
    uid, gid = _image_user()
    text = DOCKERFILE.replace("\\\n", " ")
    owned = {p for m in re.finditer(rf"install -d -o {uid} -g {gid} ([^&;\n]+)", text) for p in m.group(1).split()}
    wanted = {
        target
        for name, workload in PLATFORMS["compose"].items()
        if "build" in COMPOSE["services"][name]
        for source, target, writable in workload.mounts
        if not source.startswith(("./", "/"))
    }
    wanted.add(HELM_VALUES.get("airflowHome", "/opt/airflow"))  # the chart's AIRFLOW_HOME
    assert wanted and wanted <= owned, wanted - owned
    assert text.index(f"install -d -o {uid}") < text.index("VOLUME ")  # a change after VOLUME is lost


S3_USERS = ("mlflow", "bento", "airflow-worker")  # each its own MinIO user, policy and secret key


def _s3_login(workload: Workload) -> tuple[str, str | None]:
    """The access key id a workload uses, and the env-file variable its secret key comes from."""
    found = re.findall(r"\$[{(](\w+)", workload.env.get("AWS_SECRET_ACCESS_KEY", ""))
    return workload.env.get("AWS_ACCESS_KEY_ID", ""), found[0] if found else None


@pytest.mark.parametrize("platform", PLATFORMS)
def test_each_service_uses_its_own_s3_user_and_only_mlflow_reaches_its_bucket(platform):
    workloads = PLATFORMS[platform]
    logins = {name: _s3_login(workloads[name]) for name in S3_USERS}
    users, keys = {user for user, _ in logins.values()}, {key for _, key in logins.values()}
    assert len(users) == len(keys) == len(S3_USERS) and keys <= SECRET_VARIABLES, logins
    assert all(re.fullmatch(r"[\w-]+", user) for user in users), logins  # a name, not a secret
    mlflow_key = logins["mlflow"][1]
    holders = {name for name, workload in workloads.items() if mlflow_key in workload.secrets}
    assert holders <= {"mlflow", "minio-buckets"}, holders
    for name, workload in workloads.items():  # every S3 client is one of the users above
        assert name in S3_USERS or _s3_login(workload) == ("", None), name


def _policy(user: str) -> set[tuple[str, str]]:
    """(action, resource) pairs the user's MinIO policy allows."""
    policy = json.loads((REPO_ROOT / "infra" / "minio" / f"{user}.json").read_text())
    pairs = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and set(statement) == {"Effect", "Action", "Resource"}
        for action in [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]:
            for resource in [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]:
                pairs.add((action, resource))
    return pairs


def test_minio_gives_each_service_what_it_does_and_no_more():
    services = COMPOSE["services"]
    user = {name: _s3_login(PLATFORMS["compose"][name])[0] for name in S3_USERS}
    assert user == {name: _s3_login(PLATFORMS["kubernetes"][name])[0] for name in S3_USERS}
    [destination] = [a.partition("=")[2] for a in services["mlflow"]["command"] if a.startswith("--artifacts-destination=")]
    assert "--serve-artifacts" in services["mlflow"]["command"]  # clients reach the artifacts through MLflow, with their login
    mlflow = "arn:aws:s3:::" + destination.removeprefix("s3://")
    feedback = "arn:aws:s3:::" + COMPOSE["x-insect-env"]["INSECT_FEEDBACK__S3_BUCKET"]
    photos = f"{feedback}/{Settings().feedback.s3_prefix}/*"
    # the Bento stores photos under its prefix and reads them back (the review page); its
    # readiness probe's HeadBucket needs ListBucket (a missing photo is then 404, not 403)
    assert _policy(user["bento"]) == {("s3:ListBucket", feedback), ("s3:PutObject", photos), ("s3:GetObject", photos)}
    # Airflow's tasks read the photos: exports into dataset versions, the drift watch
    assert _policy(user["airflow-worker"]) == {("s3:ListBucket", feedback), ("s3:GetObject", f"{feedback}/*")}
    # the MLflow server: its bucket's objects (a failed multipart upload aborted), no administration of it
    objects = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    assert _policy(user["mlflow"]) == {("s3:ListBucket", mlflow)} | {(action, f"{mlflow}/*") for action in objects}
    policies = {p.stem for p in (REPO_ROOT / "infra" / "minio").glob("*.json")}
    assert policies == set(user.values())  # no policy left from the one all-bucket user
    # the init job makes each user with its policy, its secret key read on stdin
    init = (REPO_ROOT / "infra" / "minio" / "init.sh").read_text()
    job = PLATFORMS["compose"]["minio-buckets"]
    for name in S3_USERS:
        login, key = _s3_login(PLATFORMS["compose"][name])
        assert f'\nuser {login} "${key}"\n' in init and key in job.secrets
        assert f"./infra/minio/{login}.json" in [m[0] for m in job.mounts]
    assert """printf '%s\\n' "$2" | mc admin user add local "$1"\n""" in init
    assert job.secrets == {secrets.ENV_NAMES["minio_root_password"]} | {_s3_login(PLATFORMS["compose"][n])[1] for n in S3_USERS}
