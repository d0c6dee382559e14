"""DeepSpeed on one process or many: the engine, the ranks' shards of the data, and the training
loop with early stopping that both training stages and pruning's recovery fine-tune run."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from config import TrainConfig
from config.ports import free_port
from ml.tracking import NO_RUN, RunLog

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
ScoreFn = Callable[[torch.nn.Module], float]  # higher is better


@contextmanager
def single_process_rank():
    """Let plain `python` act as rank 0 of 1 while DeepSpeed sets up (the deepspeed launcher sets
    these itself). They are removed again: this process's store keeps MASTER_PORT bound, and a
    subprocess that trains, started later, must not inherit it."""
    defaults = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    added = {key: value for key, value in defaults.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def mean_over_ranks(value: float) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


Draw = tuple[int, int]  # an image's index in the dataset, and the seed its augmentation is drawn with


class EpochDraws(Sampler[Draw]):
    """DistributedSampler's contract, with a seed per draw: every rank computes the same seeded
    draws for an epoch (a permutation, or with `weights` images in proportion to them, with
    replacement) and takes every `num_replicas`-th. Each draw carries the seed `SeededDraws`
    augments it with, so the images a step sees do not depend on how many ranks share it."""

    def __init__(self, size: int, num_replicas: int, rank: int, seed: int, weights: torch.Tensor | None = None):
        self.size, self.weights, self.num_replicas, self.rank, self.seed, self.epoch = size, weights, num_replicas, rank, seed, 0
        self.num_samples = size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        count = self.num_samples * self.num_replicas
        if self.weights is None:
            images = torch.randperm(self.size, generator=generator)[:count]
        else:
            images = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        seeds = torch.randint(2**62, (count,), generator=generator)
        return iter(list(zip(images.tolist(), seeds.tolist(), strict=True))[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class SeededDraws(Dataset):
    """`dataset[index]` for a draw, with torch's and Python's generators seeded by the draw while
    the item is made (torchvision's transforms use both: RandomChoice draws with Python's): its
    random transforms depend on the draw alone, not on the process or its history."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: Draw):
        index, seed = draw
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)


def shard_loader(dataset: Dataset, cfg: TrainConfig, weights: torch.Tensor | None = None, **kwargs) -> DataLoader:
    """Batches of this rank's shard, batch_size / world_size each. At any world size the ranks'
    batches together hold the images, augmented alike, that one process would batch at that step."""
    world = world_size()
    sampler = EpochDraws(len(dataset), num_replicas=world, rank=rank(), seed=cfg.seed, weights=weights)
    batch = max(1, cfg.batch_size // world)
    return DataLoader(
        SeededDraws(dataset), batch_size=batch, sampler=sampler, drop_last=True, num_workers=cfg.loader_workers, **kwargs
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def placement(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """Where the engine keeps the module (this rank's GPU, else the CPU) and the dtype its
    weights take there: DeepSpeed's bf16 and fp16 modes cast the module itself, so every input
    and any other model fed the same batches (a teacher) must follow."""
    precision = json.loads(Path(cfg.deepspeed_config).read_text())
    dtype = next(
        (dtype for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)) if precision.get(key, {}).get("enabled")),
        torch.float32,
    )
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    return device, dtype


def placed(batch: tuple, device: torch.device, dtype: torch.dtype) -> tuple:
    """A loader's batch on `device`, its floating-point tensors (images) cast to `dtype`."""
    return tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in batch)


def deepspeed_engine(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """A DeepSpeed engine for `model`, with batch size, learning rate, weight decay and the
    schedule's length from `cfg`: the JSON file holds only what DeepSpeed alone decides."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # late: importing it picks the accelerator from the environment set above

    ds_config = json.loads(Path(cfg.deepspeed_config).read_text())
    ds_config["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // world_size())
    ds_config["optimizer"]["params"].update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if "scheduler" in ds_config:
        ds_config["scheduler"]["params"]["total_num_steps"] = max(1, total_steps)
        ds_config["scheduler"]["params"]["warmup_num_steps"] = max(1, min(total_steps // 10, 100))
    with single_process_rank():
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
        )
    return engine


def fit(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    score_fn: ScoreFn,
    *,
    cfg: TrainConfig,
    epochs: int,
    stage: str,
    checkpoint_dir: Path,
    run: RunLog = NO_RUN,
) -> tuple[float, int]:
    """Train with early stopping on `score_fn`; the best epoch's weights are restored from its
    DeepSpeed checkpoint. Returns (best score, epochs run). Per-epoch metrics go to `run`.

    Every epoch ends in a checkpoint of its own (weights, optimizer, schedule, and as client state
    the epoch, the best so far and the random generators' states), so a run killed mid-way and
    started again on the same `checkpoint_dir` (a retried task) resumes after the last complete
    epoch, and one that had finished only restores its best epoch."""
    steps_per_epoch = min(len(loader), cfg.max_steps_per_epoch or len(loader))
    own_attributes = {id(obj): set(vars(obj)) for obj in [*model.parameters(), *model.modules()]}
    engine, where = deepspeed_engine(model, cfg, steps_per_epoch * epochs), placement(cfg)
    progress = _resume(engine, checkpoint_dir, stage)
    best, best_epoch, epoch = progress["best"], progress["best_epoch"], progress["epoch"]
    first_epoch = epochs if progress["finished"] else epoch + 1
    for epoch in range(first_epoch, epochs):
        loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        engine.train()
        losses, step_ends = [], []
        batches = tqdm(
            loader, total=steps_per_epoch, desc=f"{stage} epoch {epoch + 1}/{epochs}", unit="batch", disable=not is_rank0()
        )
        for step, batch in enumerate(batches):
            if step == steps_per_epoch:
                break
            loss = loss_fn(engine, placed(batch, *where))
            engine.backward(loss)
            engine.step()
            losses.append(mean_over_ranks(loss.item()))  # the loss of the whole (global) batch
            step_ends.append(time.perf_counter())  # .item() waited for the step's kernels
            batches.set_postfix(loss=f"{np.mean(losses):.3f}")
        engine.eval()
        score = score_fn(engine.module)
        metrics = {f"{stage}_train_loss": float(np.mean(losses)), f"{stage}_val_score": score}
        run.metrics(metrics | _speed(stage, step_ends), step=epoch)
        if score > best:
            best, best_epoch = score, epoch
            engine.save_checkpoint(str(checkpoint_dir), tag=f"{stage}-best")
        stop = epoch - best_epoch >= cfg.patience or epoch == epochs - 1
        _save_progress(engine, checkpoint_dir, stage, epoch=epoch, best=best, best_epoch=best_epoch, finished=stop)
        if stop:
            break
    engine.load_checkpoint(str(checkpoint_dir), tag=f"{stage}-best", load_optimizer_states=False, load_lr_scheduler_states=False)
    _release(engine, own_attributes)
    return best, epoch + 1


def _speed(stage: str, step_ends: list[float]) -> dict[str, float]:
    """Steps per second after the first step (which also pays for start-up: allocations, kernel
    selection), and on a GPU the peak memory this process has had allocated there."""
    speed = {f"{stage}_steps_per_s": (len(step_ends) - 1) / (step_ends[-1] - step_ends[0])} if len(step_ends) > 1 else {}
    if torch.cuda.is_available():
        speed[f"{stage}_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return speed


def _save_progress(engine, checkpoint_dir: Path, stage: str, **progress) -> None:
    """The epoch's own checkpoint, then the marker that points at it (replaced atomically), then
    the epoch before it removed: a kill at any moment leaves the marker on a complete one."""
    tag = f"{stage}-epoch{progress['epoch']}"
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={**progress, "rng": rng})
    if is_rank0():
        marker = checkpoint_dir / f"{stage}-progress.json"
        previous = json.loads(marker.read_text())["tag"] if marker.is_file() else None
        partial = marker.with_suffix(".partial")
        partial.write_text(json.dumps({**progress, "tag": tag}))
        partial.replace(marker)
        if previous:
            shutil.rmtree(checkpoint_dir / previous, ignore_errors=True)


def _resume(engine, checkpoint_dir: Path, stage: str) -> dict:
    """Where an earlier run of this stage on `checkpoint_dir` got to, with its states loaded into
    `engine`; a fresh start when there is none."""
    marker = checkpoint_dir / f"{stage}-progress.json"
    if not marker.is_file():
        return {"epoch": -1, "best": -float("inf"), "best_epoch": -1, "finished": False}
    progress = json.loads(marker.read_text())
    _, state = engine.load_checkpoint(str(checkpoint_dir), tag=progress["tag"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if is_rank0():
        print(f"{stage}: resuming after epoch {progress['epoch'] + 1} from {checkpoint_dir / progress['tag']}", flush=True)
    return progress


def _release(engine, own_attributes: dict[int, set[str]]) -> None:
    """Detach DeepSpeed from the module, leaving a plain float32 one on the CPU behind (picklable,
    exportable, what the later stages load): drop its forward hooks and the attributes ZeRO hung
    on each parameter and submodule (process groups and hook classes among them).
    Under ZeRO-3 each rank holds a slice of every weight: gather them whole first."""
    whole = None
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            whole = [p.data.detach().clone().float() for p in params]
    engine.destroy()
    if whole is not None:
        for param, data in zip(engine.module.parameters(), whole, strict=True):
            param.data = data
    for hook in (engine.module_forward_pre_hook, engine.module_forward_post_hook):
        if hook is not None:
            hook.remove()
    for obj in [*engine.module.parameters(), *engine.module.modules()]:
        for key in set(vars(obj)) - own_attributes.get(id(obj), set()):
            delattr(obj, key)
    engine.module.to("cpu", torch.float32)
