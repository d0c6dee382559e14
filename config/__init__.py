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

    num_classes: int = 10
    """Species drawn. IP102 has 102; a subset keeps the CPU demo short."""
    images_per_class: int = 60
    """Images of each species, split 60/20/20 into train/val/test."""
    min_test_images_per_class: int = 40
    """The test split (the lab slice the gate judges on) gets at least this many of each species:
    with 12 a species, one image is 0.8 points of top-1 and the seed alone moved it by 11."""
    image_size: int = 64
    """Side of the square images, in pixels: the model's input size (`model.name`)."""
    seed: int = 0
    """Seed of the generator's random draws."""
    tail_ratio: float = Field(1.0, ge=1.0)
    """A long tail like IP102's: class sizes fall off geometrically from `images_per_class` (the
    first species) to `images_per_class / tail_ratio` (the last, at least 5); 1: all the same."""


class ModelConfig(Section):
    """Which CoCa variant to build: a JSON file in ml/model/configs/ (input size, widths, caption length)."""

    name: str = "coca_tiny"
    """The config's file name: `coca_tiny` (64 px, patch 8, 4 layers, width 192: the CPU demo),
    `coca_small` (256 px, patch 32, 6 layers, width 384), `coca_base` (the source system's vision
    tower: 512 px, patch 32, 12 layers, width 768, with open_clip's CoCa ViT-B/32 text towers);
    each builds and runs a forward pass on the CPU in the tests. Set `synthetic.image_size` to its
    input size."""


class TrainConfig(Section):
    """Both training stages: CoCa pretraining on captions, then the species classifier."""

    deepspeed_config: Path = REPO_ROOT / "ml" / "train" / "ds_config.json"
    """The DeepSpeed engine's settings (ZeRO stage, precision, optimizer, schedule); batch size and
    learning rate are filled in from this section. The default is ZeRO-1 in fp32 for CPUs;
    `ds_config_zero2_gpu.json` and `ds_config_zero3_gpu.json` beside it are ZeRO-2 and ZeRO-3 with
    bf16 for GPUs."""
    pretrain_epochs: int = 4
    """Epochs of CoCa pretraining on image + templated-caption pairs."""
    finetune_epochs: int = 12
    """Epochs of the species classifier's fine-tune."""
    batch_size: int = 32
    """The global batch, whatever `world_size` is."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.05
    """Weight decay."""
    patience: int = 3
    """Epochs without val improvement before early stopping."""
    seed: int = 0
    """Seed of initialisation and of every draw of an epoch."""
    max_steps_per_epoch: int | None = None
    """Cap for smoke tests; unset: whole epochs."""
    loader_workers: int = Field(0, ge=0)
    """Processes decoding and augmenting the next batches while a step runs: a GPU waits on them
    without; on a CPU they would take its cores from training."""
    warm_start: bool = True
    """A retrain starts from the champion's trained weights (skipping CoCa pretraining) when the
    champion knows the same species, and fine-tunes for `warm_start_epochs` (all of them), the
    champion distilling into it on the base images."""
    warm_start_epochs: int = 24
    """Epochs of a warm-started retrain. On the learning benchmark's 200-photo version (unpruned,
    fresh photos): 12 epochs reach lab 0.83 / field 0.52, 24 reach 0.85 / 0.60, 36 reach
    0.86 / 0.61 at 1.5x the time of 24."""
    feedback_weight: float = Field(3.0, gt=0.0)
    """How often a feedback image is drawn per epoch relative to a base image: users' photos are few
    and show what the base set lacks."""
    balance_classes: bool = False
    """Draw every class equally often (for a long-tailed dataset such as IP102) instead of in
    proportion to its images."""
    world_size: int = 1
    """Data parallel through the deepspeed launcher: processes on this host (CPU: gloo; GPU: one
    per device, NCCL)."""
    hostfile: Path | None = None
    """A DeepSpeed hostfile (`host slots=N` per line) to train on several hosts (passwordless ssh
    between them, the run directory on shared storage); unset: this host."""
    master_port: int = 29500
    """The port the launcher's ranks meet on."""


class PruneConfig(Section):
    """The prune stage (ml/prune.py): structured pruning of every ViT block with torch-pruning."""

    mlp_ratio: float = 0.5
    """Fraction of each ViT block's MLP hidden channels removed."""
    head_ratio: float = 0.33
    """Fraction of each block's attention heads removed, rounded up (3 heads: one)."""
    importance: Literal["magnitude", "taylor"] = "magnitude"
    """L2 norm of weights, or |weight x gradient|."""
    finetune_epochs: int = 8
    """Recovery fine-tune, distilled from the unpruned model (early-stopped)."""
    max_top1_drop: float = 0.05
    """The step fails when pruning costs more val top-1 than this."""


class CompileConfig(Section):
    """The compile stage (ml/compile): TVM Relax libraries for this host's CPU and for CUDA GPUs."""

    batch_sizes: list[int] = [1]
    """One tuned host-CPU library each; larger batches run in chunks of the largest."""
    tuning_trials: int = 64
    """MetaSchedule trials per batch size, spent on kernels no record covers (0: none); the default
    model's kernels (batch 1 and 8) are covered by the records shipped in ml/compile/records, so it
    tunes nothing."""
    cuda_archs: list[str] = ["sm_80", "sm_90"]
    """CUDA targets, cross-compiled whenever nvcc is on PATH."""
    max_abs_diff: float = 1e-3
    """Parity bound between TVM and eager logits on the validation images."""
    min_top1_agreement: float = 0.999
    """Top-1 agreement between TVM and eager required on the validation images."""


class GateConfig(Section):
    """When a retrained model replaces the champion (registry/gate.py; docs/gate-and-drift.md)."""

    lab_margin: float = 0.05
    """Lab top-1 may be at most this much worse (lower bound of a paired bootstrap, 90 %)."""
    alpha: float = 0.05
    """The improvement must be significant at this level (one-sided exact McNemar)."""
    max_class_recall_drop: float = 0.25
    """No class with enough images may lose more recall than this."""
    min_class_images: int = 10
    """Classes with fewer images in a slice are too noisy to judge alone."""
    min_field_images: int = 20
    """A smaller field slice cannot show an improvement: the lab slice must."""
    bootstrap_samples: int = 2000
    """Resamples of the paired bootstrap."""


class DriftConfig(Section):
    """The drift watch (dags/drift_watch.py): the champion's outputs on the newest predictions
    against its outputs on lab images it never trained on (ml/drift.py; docs/gate-and-drift.md)."""

    window: int = 200
    """Newest predictions compared."""
    min_predictions: int = 30
    """Fewer make no test worth running."""
    alpha: float = 0.01
    """Drift when the permutation p-value is below this: the share of drift-free days flagged anyway."""
    permutations: int = 1000
    """Permutations of the test (the smallest p-value 1000 can give is 0.001)."""
    schedule: str = "@daily"
    """The drift_watch DAG's schedule (cron or preset)."""


class FeedbackConfig(Section):
    """Where user feedback lands. Unset URLs mean the embedded defaults: a PostgreSQL cluster the
    project starts under the data directory, and images as files under the data directory."""

    database_url: str | None = None
    """E.g. `postgresql+psycopg2://user:pw@host/db`; unset: the embedded cluster in `<data_dir>/postgres`."""
    postgres_port: int = 5433
    """Of the embedded cluster (5432 is left to a system server)."""
    s3_bucket: str | None = None
    """Set to keep images in S3 (boto3; AWS_* credentials); unset: files under `<data_dir>/feedback/images`."""
    s3_endpoint_url: str | None = None
    """MinIO, moto, ... ; unset means AWS."""
    s3_prefix: str = "feedback"
    """Where in the bucket the images go."""
    max_image_bytes: int = 5 * 1024 * 1024
    """The largest image upload (5 MiB); the upload routes take 64 KiB of form besides."""
    max_image_pixels: int = Field(16_000_000, ge=1)
    """Pixels an image may declare in its header, checked before it is decoded, on every route:
    decoding is ~15 ms a megapixel here, and Pillow's own limit (89 Mpx) let a 280 KB PNG cost 1.3 s."""
    min_new_samples: int = 5
    """The ingest DAG publishes a dataset version from this many trainable rows."""
    client_agreement: int | None = None
    """Clients' suggestions train once this many distinct keys agree on an image's species (unset: only a labeler's do)."""
    field_holdout_share: float = Field(0.2, ge=0.0, lt=1.0)
    """Share of new trainable images held out of training as the field slice (chosen by image hash)."""
    ingest_schedule: str = "@hourly"
    """The ingest DAG's schedule (cron or preset)."""
    storage_timeout_s: float = Field(5.0, gt=0)
    """Every database and S3 call gives up after this long (connect, statement, pool wait, read)."""


class ServeConfig(Section):
    """The Bento HTTP service."""

    host: str = "127.0.0.1"
    """`0.0.0.0` serves every interface (a container, behind a proxy)."""
    port: int = 3000
    """The Bento's port."""
    alias: str = "champion"
    """The registry alias served."""
    top_k: int = 3
    """Species in a `/predict` answer's `top_k` (a request may ask for up to 102)."""
    unsure_below: float = Field(0.5, ge=0, le=1)
    """The web app says "not sure" below this probability."""
    review_hold_s: float = 600.0
    """How long a labeler holds a review item before another may take it."""
    mlflow_ui_url: str | None = None
    """Where people open MLflow's UI, for the web app's links (unset: no link)."""
    airflow_ui_url: str | None = None
    """Where people open Airflow's UI, for the web app's links (unset: no link)."""
    reload_interval_s: float = 10.0
    """How often the alias is polled for a new version."""
    backend: Literal["auto", "tvm", "eager"] = "auto"
    """`auto`: the TVM build for this GPU, else for this CPU, else eager."""
    rate_limits: dict[str, str] = {"client": "120/minute", "labeler": "1200/minute", "admin": "1200/minute"}
    """Requests per API key and sliding window, by role (limits' notation); JSON to override."""
    unknown_key_limit: str = "30/minute"
    """Lookups of keys not known to be good, per client address (a made-up key costs one; past
    this, 429 without touching the database); a good key, once seen, is not counted. Web pages
    asked for without a session have a budget of this size of their own (then as a stranger's)."""
    stranger_delay_s: float = Field(2.0, ge=0)
    """A stranger's refusal (no key, an unknown key, no route, a web form without a session) waits
    about this long, by half either way, before it is sent (1,000 at most at once): a client that
    loops on refusals then sends one every few seconds, not the 1,800 a second that took a good
    client's p99 from 20 to 450 ms. Beside 300 slow uploads, the good client's p99 was 3.0x its
    alone figure at 1 s, 2.0x at 2 s (benchmarks/HOSTILE.md has the run at the default)."""
    max_form_bytes: int = Field(16 * 1024, ge=1024)
    """The body limit of every POST route that takes no image (sign-in, review decisions, /model)."""
    registry_timeout_s: float = Field(5.0, gt=0)
    """Every MLflow call of the service (the alias watcher, the web app's pages) gives up after this
    (one retry)."""
    workers: int = Field(1, ge=1)
    """Service processes, each with its own model and batching."""
    rate_limit_store: str = "memory://"
    """Where the rate limits count (limits' storage URI): memory:// counts per process, so more
    than one worker needs a shared store, e.g. redis://127.0.0.1:6380/1."""
    max_batch_size: int = 32
    """Images the model runs at once (1: no batching)."""
    max_in_flight: int = 256
    """`/predict` and `/feedback` requests taken at once; one more gets 503 with Retry-After at the door."""
    storage_threads: int = 4
    """Database and S3 calls run on these, never on classification's threads."""
    storage_retry_s: float = 5.0
    """After a storage failure, predictions are answered without being stored for this long; the
    storage monitor probes the stores this often."""
    model_threads: int | None = Field(None, ge=1)
    """Threads each worker's model runs on (TVM's pool, torch's intra-op threads); unset: its share
    of the physical cores less one, left to the request path (HTTP, decoding, storage). On 2
    cores that kept the p99 at 64 users lower in both runs of benchmarks/LOAD.md (790 and 460
    ms, against 1,100 and 850 with the model on every core); the throughput at 16 users went
    either way (184 against 169 req/s, then 172 against 211), and one user alone is 11-17% slower."""
    gil_switch_interval_ms: float = Field(1.0, gt=0)
    """How long a thread may hold the interpreter lock while another waits (Python's default: 5 ms).
    Every return from the model, the database or a decoding thread waits for the lock: beside a
    busy event loop a batch of 4 took 28 ms at 5 ms, 8 at 1 ms (3.6 ms alone)."""

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
    that waiting cannot heal, such as a dataset failing validation, fail at once without retry
    (`AirflowFailException`); a task out of tries logs one `TASK FAILED: dag.task in run …, try n
    of n: error` line (the plugins/failure_report.py listener)."""

    retries: int = 2
    """Retries of a failed task."""
    delay_s: float = 60.0
    """Wait before the first retry, doubling with each one."""
    max_delay_s: float = 900.0
    """The longest wait between retries."""


def _airflow_executor(name: str) -> str:
    """`make up EXECUTOR=celery` as well as Airflow's own class names."""
    return {"local": "LocalExecutor", "celery": "CeleryExecutor"}.get(str(name).lower(), name)


class StackConfig(Section):
    """`make up`: the platform as services on this machine, each on 127.0.0.1 at these ports."""

    postgres_port: int = 5434
    """Airflow's metadata, MLflow's store and the feedback tables."""
    s3_port: int = 9000
    """rclone's S3 server for the mlflow bucket, MLflow's key only (stack/s3.py: one server per set
    of rights)."""
    s3_feedback_port: int = 9001
    """rclone's S3 server for the feedback bucket's photo prefix, the Bento's key."""
    s3_feedback_read_port: int = 9002
    """rclone's S3 server for the feedback bucket read-only, the Airflow tasks' key."""
    mlflow_port: int = 5000
    """The MLflow tracking server."""
    airflow_port: int = 8080
    """Airflow's API server, which also serves the UI."""
    executor: Annotated[Literal["LocalExecutor", "CeleryExecutor"], BeforeValidator(_airflow_executor)] = "LocalExecutor"
    """Airflow's executor (`local` and `celery` say the same: `make up EXECUTOR=celery`)."""
    workers: int = 2
    """Celery workers, one task at a time each (CeleryExecutor only)."""
    parallelism: int = Field(2, ge=1)
    """Airflow tasks at once (LocalExecutor: one worker process each, kept once started; Airflow's
    default of 32 left 32 idle processes on 2 cores)."""
    redis_port: int = 6380
    """Celery's broker, the Bento's rate-limit counts (6379 is left to a system server)."""
    bento_workers: int = Field(2, ge=1)
    """The Bento's processes, sharing the rate limits in Redis."""
    start_timeout_s: float = 180.0
    """Per service, until its health check passes."""


class SigningConfig(Section):
    """Model-version signatures (registry/signing.py): the training tasks sign with the private
    key; every loader trusts only the public keys listed in the trusted-keys file (OpenSSH
    lines). Unset: both under `<data_dir>/keys`, made by `python -m registry signing-key create`."""

    key_file: Path | None = None
    """The private key; only the processes that register models may read it. Unset:
    `<data_dir>/keys/model-signing.key`."""
    trusted_keys_file: Path | None = None
    """The public keys every model loader trusts. Unset: `<data_dir>/keys/trusted-model-keys.pub`."""


class Settings(BaseSettings):
    """Every setting: the project-wide ones, then one section per part of the platform."""

    model_config = SettingsConfigDict(env_prefix="INSECT_", env_nested_delimiter="__", extra="ignore", protected_namespaces=())

    data_dir: Path = REPO_ROOT / "data"
    """Everything the project writes."""
    dataset_dir: Path | None = None
    """A real IP102 checkout (`images/`, `train.txt`, `val.txt`, `test.txt`, `classes.txt`) to train
    on unchanged; unset: the generated synthetic dataset in `<data_dir>/datasets/synthetic` (the
    generator writes only into its own directory and refuses any directory it did not write;
    redrawn with other settings, it draws beside and swaps, so published versions keep their
    images)."""
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "INSECT_MLFLOW_TRACKING_URI")
    )
    """Any MLflow store or server; unset: `sqlite:///<data_dir>/mlflow.db`, artifacts in
    `<data_dir>/mlartifacts`."""
    airflow_home: Path | None = Field(None, validation_alias=AliasChoices("AIRFLOW_HOME", "INSECT_AIRFLOW_HOME"))
    """Airflow's home; unset: `<data_dir>/airflow`."""
    experiment_name: str = "insect-classifier"
    """The MLflow experiment runs log into."""
    registered_model_name: str = "insect-classifier"
    """The model's name in the MLflow registry."""

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
