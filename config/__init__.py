"""The one typed configuration shared by `ml/`, `registry/`, `dags/` and `bentos/`.

Defaults are embedded (SQLite and local files under one data directory), every field can be
overridden by an environment variable (`INSECT_<FIELD>`, nested with `__`, e.g.
`INSECT_TRAIN__FINETUNE_EPOCHS=3`; a misspelt field of a section is an error, not silence), and
the standard variables a user already sets are honoured: `MLFLOW_TRACKING_URI`,
`MLFLOW_REGISTRY_URI`, `AIRFLOW_HOME`.

Importing this module does no I/O; `get_settings()` reads the environment once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Section(BaseModel):
    """A section of the settings: an unknown field (a misspelt INSECT_<SECTION>__<FIELD>) is refused."""

    model_config = ConfigDict(extra="forbid")


class SyntheticDataConfig(Section):
    """The generated demo dataset (IP102 layout, the first `num_classes` IP102 species)."""

    num_classes: int = 10  # IP102 has 102; a subset keeps the CPU demo short
    images_per_class: int = 60  # split 60/20/20 into train/val/test
    # The test split (the lab slice the gate judges on) gets at least this many of each species:
    # with 12 a species, one image is 0.8 points of top-1 and the seed alone moved it by 11.
    min_test_images_per_class: int = 40
    image_size: int = 64  # pixels, square
    seed: int = 0
    # A long tail like IP102's: class sizes fall off geometrically from `images_per_class` (the
    # first species) to `images_per_class / tail_ratio` (the last, at least 5); 1: all the same.
    tail_ratio: float = Field(1.0, ge=1.0)


class ModelConfig(Section):
    """Which CoCa variant to build: a JSON file in ml/model/configs/ (input size, widths, caption length)."""

    name: str = "coca_tiny"


class TrainConfig(Section):
    """Both training stages: CoCa pretraining on captions, then the species classifier."""

    deepspeed_config: Path = REPO_ROOT / "ml" / "train" / "ds_config.json"
    pretrain_epochs: int = 4
    finetune_epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    patience: int = 3  # epochs without val improvement before early stopping
    seed: int = 0
    max_steps_per_epoch: int | None = None  # cap for smoke tests
    # Processes decoding and augmenting the next batches while a step runs: a GPU waits on them
    # without; on a CPU they would take its cores from training.
    loader_workers: int = Field(0, ge=0)
    # A retrain starts from the champion's trained weights (skipping CoCa pretraining) when the
    # champion knows the same species, and fine-tunes for `warm_start_epochs` (all of them), the
    # champion distilling into it on the base images. On the learning benchmark's 200-photo version
    # (unpruned, fresh photos): 12 epochs reach lab 0.83 / field 0.52, 24 reach 0.85 / 0.60, 36
    # reach 0.86 / 0.61 at 1.5x the time of 24.
    warm_start: bool = True
    warm_start_epochs: int = 24
    # How often a feedback image is drawn per epoch relative to a base image: users' photos are few
    # and show what the base set lacks.
    feedback_weight: float = Field(3.0, gt=0.0)
    # Draw every class equally often (for a long-tailed dataset such as IP102) instead of in
    # proportion to its images.
    balance_classes: bool = False
    # Data parallel through the deepspeed launcher: processes on this host (CPU: gloo; GPU: one
    # per device), or a DeepSpeed hostfile (`host slots=N` per line) for several hosts.
    world_size: int = 1
    hostfile: Path | None = None
    master_port: int = 29500


class PruneConfig(Section):
    mlp_ratio: float = 0.5  # fraction of each ViT block's MLP hidden channels removed
    head_ratio: float = 0.33  # fraction of each block's attention heads removed, rounded up (3 heads: one)
    importance: Literal["magnitude", "taylor"] = "magnitude"  # L2 norm of weights, or |weight x gradient|
    finetune_epochs: int = 8  # recovery fine-tune, distilled from the unpruned model (early-stopped)
    max_top1_drop: float = 0.05  # the step fails when pruning costs more val top-1 than this


class CompileConfig(Section):
    batch_sizes: list[int] = [1]  # one tuned host-CPU library each; larger batches run in chunks of the largest
    # MetaSchedule trials per batch size, spent on kernels no record covers (0: none); the default
    # model's kernels are covered by the records shipped in ml/compile/records, so it tunes nothing
    tuning_trials: int = 64
    cuda_archs: list[str] = ["sm_80", "sm_90"]  # cross-compiled whenever nvcc is on PATH
    max_abs_diff: float = 1e-3  # parity bound between TVM and eager logits
    min_top1_agreement: float = 0.999


class GateConfig(Section):
    """When a retrained model replaces the champion (registry/gate.py; README: "The gate")."""

    lab_margin: float = 0.05  # lab top-1 may be at most this much worse (lower bound of a paired bootstrap)
    alpha: float = 0.05  # the improvement must be significant at this level (one-sided exact McNemar)
    max_class_recall_drop: float = 0.25  # no class with enough images may lose more recall than this
    min_class_images: int = 10  # classes with fewer images in a slice are too noisy to judge alone
    min_field_images: int = 20  # a smaller field slice cannot show an improvement: lab must
    bootstrap_samples: int = 2000


class DriftConfig(Section):
    """The drift watch (dags/drift_watch.py): the champion's outputs on the newest predictions
    against its outputs on lab images it never trained on (ml/drift.py; README: "Drift")."""

    window: int = 200  # newest predictions compared
    min_predictions: int = 30  # fewer make no test worth running
    alpha: float = 0.01  # drift when the permutation p-value is below this
    permutations: int = 1000
    schedule: str = "@daily"


class FeedbackConfig(Section):
    """Where user feedback lands. Unset URLs mean the embedded defaults: a PostgreSQL cluster the
    project starts under the data directory, and images as files under the data directory."""

    database_url: str | None = None  # e.g. postgresql+psycopg2://user:pw@host/db
    postgres_port: int = 5433  # of the embedded cluster (5432 is left to a system server)
    s3_bucket: str | None = None  # set to keep images in S3 (boto3; AWS_* credentials)
    s3_endpoint_url: str | None = None  # MinIO, moto, ... ; unset means AWS
    s3_prefix: str = "feedback"
    max_image_bytes: int = 5 * 1024 * 1024
    # pixels an image may declare in its header, checked before it is decoded, on every route:
    # decoding is ~15 ms a megapixel here, and Pillow's own limit (89 Mpx) let a 280 KB PNG cost 1.3 s
    max_image_pixels: int = Field(16_000_000, ge=1)
    min_new_samples: int = 5  # the ingest DAG publishes a dataset version from this many trainable rows
    # clients' suggestions train once this many distinct keys agree on an image's species (unset: only a labeler's do)
    client_agreement: int | None = None
    # share of new trainable images held out of training as the field slice (chosen by image hash)
    field_holdout_share: float = Field(0.2, ge=0.0, lt=1.0)
    ingest_schedule: str = "@hourly"  # the ingest DAG's schedule (cron or preset)
    # every database and S3 call gives up after this long (connect, statement, pool wait, read)
    storage_timeout_s: float = Field(5.0, gt=0)


class ServeConfig(Section):
    """The Bento HTTP service."""

    host: str = "127.0.0.1"  # "0.0.0.0" serves every interface (a container, behind a proxy)
    port: int = 3000
    alias: str = "champion"  # the registry alias served
    top_k: int = 3
    unsure_below: float = Field(0.5, ge=0, le=1)  # the web app says "not sure" below this probability
    review_hold_s: float = 600.0  # how long a labeler holds a review item before another may take it
    # where people open the UIs, for the web app's links (unset: no link)
    mlflow_ui_url: str | None = None
    airflow_ui_url: str | None = None
    reload_interval_s: float = 10.0  # how often the alias is polled for a new version
    backend: Literal["auto", "tvm", "eager"] = "auto"  # auto: the TVM build for this GPU, else this CPU, else eager
    # requests per API key and sliding window, by role (limits' notation); JSON to override
    rate_limits: dict[str, str] = {"client": "120/minute", "labeler": "1200/minute", "admin": "1200/minute"}
    # lookups of keys not known to be good, per client address (a made-up key costs one; past
    # this, 429 without touching the database); a good key, once seen, is not counted. Web pages
    # asked for without a session have a budget of this size of their own (then as a stranger's).
    unknown_key_limit: str = "30/minute"
    # a stranger's refusal (no key, an unknown key, no route, a web form without a session) waits
    # about this long, by half either way, before it is sent (1,000 at most at once): a client that
    # loops on refusals then sends one every few seconds, not the 1,800 a second that took a good
    # client's p99 from 20 to 450 ms. Beside 300 slow uploads, the good client's p99 was 3.0x its
    # alone figure at 1 s, 2.0x at 2 s (benchmarks/HOSTILE.md has the run at the default).
    stranger_delay_s: float = Field(2.0, ge=0)
    # the body limit of every POST route that takes no image (sign-in, review decisions, /model)
    max_form_bytes: int = Field(16 * 1024, ge=1024)
    # every MLflow call of the service (the alias watcher, the web app's pages) gives up after this
    registry_timeout_s: float = Field(5.0, gt=0)
    workers: int = Field(1, ge=1)  # service processes, each with its own model and batching
    # where the rate limits count (limits' storage URI): memory:// counts per process, so more
    # than one worker needs a shared store, e.g. redis://127.0.0.1:6380/1
    rate_limit_store: str = "memory://"
    max_batch_size: int = 32  # images the model runs at once (1: no batching)
    # /predict and /feedback requests taken at once; one more gets 503 with Retry-After at the door
    max_in_flight: int = 256
    storage_threads: int = 4  # database and S3 calls run on these, never on classification's threads
    # after a storage failure, predictions are answered without being stored for this long
    storage_retry_s: float = 5.0
    # threads each worker's model runs on (TVM's pool, torch's intra-op threads); unset: its share
    # of the physical cores less one, left to the request path (HTTP, decoding, storage). On 2
    # cores that kept the p99 at 64 users lower in both runs of benchmarks/LOAD.md (790 and 460
    # ms, against 1,100 and 850 with the model on every core); the throughput at 16 users went
    # either way (184 against 169 req/s, then 172 against 211), and one user alone is 11-17% slower.
    model_threads: int | None = Field(None, ge=1)
    # how long a thread may hold the interpreter lock while another waits (Python's default: 5 ms).
    # Every return from the model, the database or a decoding thread waits for the lock: beside a
    # busy event loop a batch of 4 took 28 ms at 5 ms, 8 at 1 ms (3.6 ms alone)
    gil_switch_interval_ms: float = Field(1.0, gt=0)

    def threads_per_model(self, physical_cores: int) -> int:
        return self.model_threads or max(1, physical_cores // self.workers - 1)

    @model_validator(mode="after")
    def _limits_shared_by_workers(self) -> ServeConfig:
        if self.workers > 1 and self.rate_limit_store.startswith("memory://"):
            raise ValueError(
                f"serve.workers={self.workers} with rate limits counted in memory would let a key through at "
                f"{self.workers} times its limit: set INSECT_SERVE__RATE_LIMIT_STORE to a shared store (redis://...)"
            )
        return self


class RetryConfig(Section):
    """Every DAG task's retries (Airflow's convention: a delay, growing exponentially). Failures
    that waiting cannot heal, such as a dataset failing validation, fail at once without retry."""

    retries: int = 2
    delay_s: float = 60.0
    max_delay_s: float = 900.0


def _airflow_executor(name: str) -> str:
    """`make up EXECUTOR=celery` as well as Airflow's own class names."""
    return {"local": "LocalExecutor", "celery": "CeleryExecutor"}.get(str(name).lower(), name)


class StackConfig(Section):
    """`make up`: the platform as services on this machine, each on 127.0.0.1 at these ports."""

    postgres_port: int = 5434  # Airflow's metadata, MLflow's store and the feedback tables
    s3_port: int = 9000  # rclone's S3 server: MLflow artifacts and feedback images
    mlflow_port: int = 5000
    airflow_port: int = 8080  # the API server, which also serves the UI
    executor: Annotated[Literal["LocalExecutor", "CeleryExecutor"], BeforeValidator(_airflow_executor)] = "LocalExecutor"
    workers: int = 2  # Celery workers, one task at a time each (CeleryExecutor only)
    # Airflow tasks at once (LocalExecutor: one worker process each, kept once started; Airflow's
    # default of 32 left 32 idle processes on 2 cores)
    parallelism: int = Field(2, ge=1)
    redis_port: int = 6380  # Celery's broker, the Bento's rate-limit counts (6379 is left to a system server)
    bento_workers: int = Field(2, ge=1)  # the Bento's processes, sharing the rate limits in Redis
    start_timeout_s: float = 180.0  # per service, until its health check passes


class SigningConfig(Section):
    """Model-version signatures (registry/signing.py): the training tasks sign with the private
    key; every loader trusts only the public keys listed in the trusted-keys file (OpenSSH
    lines). Unset: both under `<data_dir>/keys`, made by `python -m registry signing-key create`."""

    key_file: Path | None = None  # only the processes that register models may read it
    trusted_keys_file: Path | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INSECT_", env_nested_delimiter="__", extra="ignore", protected_namespaces=())

    data_dir: Path = REPO_ROOT / "data"
    # A real IP102 checkout goes here; unset means the generated synthetic dataset.
    dataset_dir: Path | None = None
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "INSECT_MLFLOW_TRACKING_URI")
    )
    airflow_home: Path | None = Field(None, validation_alias=AliasChoices("AIRFLOW_HOME", "INSECT_AIRFLOW_HOME"))
    experiment_name: str = "insect-classifier"
    registered_model_name: str = "insect-classifier"

    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    compile: CompileConfig = CompileConfig()
    gate: GateConfig = GateConfig()
    drift: DriftConfig = DriftConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    serve: ServeConfig = ServeConfig()
    stack: StackConfig = StackConfig()
    retry: RetryConfig = RetryConfig()
    signing: SigningConfig = SigningConfig()

    @property
    def base_dataset_dir(self) -> Path:
        """The dataset the first model trains on (feedback versions build on it): a real IP102
        checkout when `dataset_dir` names one, else the generated synthetic dataset."""
        return self.dataset_dir or self.synthetic_dataset_dir

    @property
    def synthetic_dataset_dir(self) -> Path:
        """Where the generator writes the synthetic dataset; it writes nowhere else."""
        return self.data_dir / "datasets" / "synthetic"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.data_dir / 'mlflow.db'}"

    # Where each part keeps its files under the data directory. (`duplicates` pairs these
    # properties by their shape: one line each, alike on purpose.)

    @property
    def artifact_root(self) -> Path:
        """Where a local MLflow store keeps artifacts (only used with the embedded default)."""
        return self.data_dir / "mlartifacts"

    @property
    def resolved_airflow_home(self) -> Path:
        return self.airflow_home or self.data_dir / "airflow"

    @property
    def dataset_versions_dir(self) -> Path:
        """Dataset versions built from feedback (`v0001`, ...), each a full IP102 layout."""
        return self.data_dir / "datasets" / "versions"

    @property
    def postgres_dir(self) -> Path:
        """The embedded PostgreSQL cluster (only used when no database URL is configured)."""
        return self.data_dir / "postgres"

    @property
    def image_store_dir(self) -> Path:
        """Feedback images when no S3 bucket is configured."""
        return self.data_dir / "feedback" / "images"

    @property
    def tuning_dir(self) -> Path:
        """MetaSchedule's tuning records, shared by every compile so retrains reuse them."""
        return self.data_dir / "tuning"

    @property
    def stack_dir(self) -> Path:
        """`make up`'s services: their data, logs, generated secrets and supervisord's files."""
        return self.data_dir / "stack"

    @property
    def signing_key_file(self) -> Path:
        return self.signing.key_file or self.data_dir / "keys" / "model-signing.key"

    @property
    def trusted_keys_file(self) -> Path:
        return self.signing.trusted_keys_file or self.data_dir / "keys" / "trusted-model-keys.pub"

    @property
    def work_dir(self) -> Path:
        """Scratch space for checkpoints and build outputs between DAG tasks."""
        return self.data_dir / "work"

    def stage_dir(self, run_id: str, stage: str) -> Path:
        """Where one stage of one retraining run writes: `<work dir>/<MLflow run id>/<stage>`."""
        return self.work_dir / run_id / stage


@lru_cache
def get_settings() -> Settings:
    return Settings()
