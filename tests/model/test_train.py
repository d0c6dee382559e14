import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from torchvision import transforms as T

from config import REPO_ROOT, SyntheticDataConfig
from ml.data import IP102Dataset, read_classes, read_split, train_transform
from ml.data.synthetic import generate_synthetic
from ml.evaluate import score
from ml.model import SpeciesClassifier, build_coca, load_classifier
from ml.prune import prune
from ml.runtime import eager_predict_fn
from ml.tracking import RunLog
from ml.train import train, warm_classifier
from ml.train.classifier import TrainImages, finetune_classifier, sampling_weights
from ml.train.engine import EpochDraws, SeededDraws, single_process_rank
from tests.support import free_port

GPU_ZERO2 = REPO_ROOT / "ml" / "train" / "ds_config_zero2_gpu.json"
DISTRIBUTED_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
MIN_TINY_TOP1 = 0.5  # chance is 0.25 (a chance model reaches 80 of 160 with p < 1e-9); measured 0.756
LOSS_CURVE_TOLERANCE = 0.01  # relative, per epoch (measured: at most 0.2%): ranks see the images one process sees


def test_training_steps_through_deepspeed(settings, tmp_path, monkeypatch):
    for key in DISTRIBUTED_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), read_classes(settings.base_dataset_dir))
    before = model.head.weight.detach().clone()
    cfg = settings.train.model_copy(update={"max_steps_per_epoch": 2})
    run = RunLog.start(settings, run_name="smoke")
    top1, epochs = finetune_classifier(
        model, settings.base_dataset_dir, cfg, epochs=1, stage="smoke", checkpoint_dir=tmp_path / "ckpt", run=run
    )
    assert epochs == 1 and 0.0 <= top1 <= 1.0
    assert not torch.equal(before, model.head.weight)  # the optimizer stepped
    assert (tmp_path / "ckpt" / "smoke-best").is_dir()  # DeepSpeed checkpoint written
    metrics = mlflow.get_run(run.run_id).data.metrics
    assert "smoke_train_loss" in metrics and metrics["smoke_steps_per_s"] > 0
    torch.save(model, tmp_path / "plain.pt")  # DeepSpeed's hooks are gone: the module pickles
    # this process's store keeps MASTER_PORT bound: a subprocess that trains must not inherit it
    assert not DISTRIBUTED_VARIABLES & set(os.environ)


@pytest.mark.slow
def test_two_processes_through_the_deepspeed_launcher_follow_the_single_process_loss_curve(settings, tmp_path):
    """Data parallel, world size 2 on CPU (gloo), the same global batch: per-epoch training loss
    within LOSS_CURVE_TOLERANCE of one process's; rank 0 alone logs and writes the classifier."""
    curves = {}
    for world_size in (1, 2):
        train_cfg = settings.train.model_copy(
            update={
                "world_size": world_size,
                "pretrain_epochs": 3,
                "finetune_epochs": 3,
                "patience": 3,
                "master_port": free_port(),
            }
        )
        run_settings = settings.model_copy(update={"train": train_cfg})
        run = RunLog.start(settings, run_name=f"world size {world_size}")
        result = train(run_settings, dataset_dir=settings.base_dataset_dir, out_dir=tmp_path / f"world{world_size}", run=run)
        client = mlflow.MlflowClient()
        curves[world_size] = {
            stage: [m.value for m in sorted(client.get_metric_history(run.run_id, f"{stage}_train_loss"), key=lambda m: m.step)]
            for stage in ("coca", "classifier")
        }
        assert result.model_path.is_file() and result.epochs_run == 3
        assert mlflow.get_run(run.run_id).data.params["train.world_size"] == str(world_size)
    print(f"per-epoch training loss by world size: {curves}")
    for stage in ("coca", "classifier"):
        single, double = np.array(curves[1][stage]), np.array(curves[2][stage])
        assert len(single) == len(double) == 3, curves
        assert np.all(np.abs(double - single) <= LOSS_CURVE_TOLERANCE * single), curves


@pytest.mark.slow
def test_zero3_shards_train_into_a_whole_classifier(settings, tmp_path):
    """ZeRO-3 leaves each rank a slice of every weight: the classifier written must be whole."""
    zero3 = json.loads(settings.train.deepspeed_config.read_text()) | {"zero_optimization": {"stage": 3}}
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    train_cfg = settings.train.model_copy(
        update={"world_size": 2, "deepspeed_config": tmp_path / "zero3.json", "master_port": free_port()}
    )
    zero3_settings = settings.model_copy(update={"train": train_cfg})
    result = train(zero3_settings, dataset_dir=settings.base_dataset_dir, out_dir=tmp_path / "out")
    # DeepSpeed's CPU all-reduce maps 69 MB of /dev/shm per rank and never unlinks it
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{train_cfg.master_port}_*"))
    trained = torch.load(result.model_path, weights_only=False)
    fresh = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), read_classes(settings.base_dataset_dir))
    assert [p.shape for p in trained.visual.parameters()] == [p.shape for p in fresh.visual.parameters()]
    assert trained(torch.zeros(1, 3, trained.image_size, trained.image_size)).shape == (1, len(trained.classes))


def test_the_gpu_zero2_bf16_config_trains_and_prunes_into_a_float32_cpu_classifier(settings, tmp_path):
    """The GPU config's precision (bf16 weights inside the engine), run here on the CPU: batches,
    the distilling teacher and the validation passes follow the engine's dtype, and what each stage
    writes is a float32 model on the CPU, as the compile and serving steps take it."""
    gpu = settings.train.model_copy(update={"deepspeed_config": GPU_ZERO2, "max_steps_per_epoch": 2})
    gpu_settings = settings.model_copy(update={"train": gpu})
    trained = train(gpu_settings, dataset_dir=settings.base_dataset_dir, out_dir=tmp_path / "train")
    pruned = prune(gpu_settings, model_path=trained.model_path, dataset_dir=settings.base_dataset_dir, out_dir=tmp_path / "prune")
    for path in (trained.model_path, pruned.model_path):
        model = load_classifier(path)
        assert {(p.dtype, p.device.type) for p in model.state_dict().values()} == {(torch.float32, "cpu")}
        assert np.isfinite(eager_predict_fn(model)(np.zeros((1, 3, model.image_size, model.image_size), np.float32))).all()


def _train_split(root: Path, labels: list[int], feedback: list[int]) -> TrainImages:
    root.mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    (root / "train.txt").write_text("".join(f"{i}.jpg {label}\n" for i, label in enumerate(labels)))
    rows = "".join(f"feedback:{i},x,{i}.jpg,a,train\n" for i in feedback)
    (root / "samples.csv").write_text("source,sha256,file,label,split\n" + rows)
    return TrainImages(root, image_size=16)


def test_feedback_images_are_drawn_more_often_and_each_class_equally_when_balanced(settings, tmp_path):
    images = _train_split(tmp_path / "ds", labels=[0] * 6 + [1] * 2, feedback=[6])
    assert images.from_user.tolist() == [False] * 6 + [True, False]
    assert sampling_weights(_train_split(tmp_path / "base", [0, 0, 1], []), settings.train) is None  # uniform
    weights = sampling_weights(images, settings.train.model_copy(update={"feedback_weight": 3.0}))
    assert weights.tolist() == [1.0] * 6 + [3.0, 1.0]
    balanced = sampling_weights(images, settings.train.model_copy(update={"feedback_weight": 3.0, "balance_classes": True}))
    assert balanced[:6].sum() == pytest.approx(balanced[6:].sum())  # each class half the draws
    assert balanced[6] == pytest.approx(3 * balanced[7])


@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 1.0, 6.0, 0.0])])
def test_ranks_share_one_draw_of_images_and_augmentation_seeds_that_follows_the_weights(weights):
    alone = EpochDraws(4, num_replicas=1, rank=0, seed=3, weights=weights)
    ranks = [EpochDraws(4, num_replicas=2, rank=r, seed=3, weights=weights) for r in (0, 1)]
    drawn = []
    for epoch in range(200):
        for sampler in (alone, *ranks):
            sampler.set_epoch(epoch)
        one = list(alone)
        assert sorted(one) == sorted(list(ranks[0]) + list(ranks[1]))  # the same draws at any world size
        assert len({seed for _, seed in one}) == len(one)  # every draw augmented its own way
        drawn += [index for index, _ in one]
    counts = np.bincount(drawn, minlength=4) / len(drawn)
    if weights is None:
        assert counts.tolist() == [0.25] * 4  # a permutation each epoch
    else:
        assert counts[3] == 0 and counts[2] == pytest.approx(0.75, abs=0.03)


def test_a_draw_is_augmented_by_its_seed_whatever_the_process_drew_before(settings):
    images = SeededDraws(IP102Dataset(settings.base_dataset_dir, "train", train_transform(32)))
    image, label = images[(0, 7)]
    torch.rand(100)  # another history of the process's generator
    again, same_label = images[(0, 7)]
    assert torch.equal(again, image) and same_label == label
    assert not torch.equal(images[(0, 8)][0], image)
    choices = SeededDraws(IP102Dataset(settings.base_dataset_dir, "train", T.RandomChoice([T.ToTensor(), T.PILToTensor()])))
    chosen = choices[(0, 7)][0].dtype  # float or uint8, picked with Python's generator
    assert all(choices[(0, 7)][0].dtype == chosen for _ in range(20))  # the same pick every time


class CountingTeacher(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return self.model(images)


@pytest.mark.parametrize("teach_users_photos", [True, False])
def test_a_champion_teaching_a_retrain_teaches_only_the_base_images(settings, tmp_path, teach_users_photos):
    dataset = shutil.copytree(settings.base_dataset_dir, tmp_path / "all-from-users")
    rows = "".join(f"feedback:{i},x,{name},y,train\n" for i, (name, _) in enumerate(read_split(dataset, "train")))
    (dataset / "samples.csv").write_text("source,sha256,file,label,split\n" + rows)
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), read_classes(dataset))
    teacher = CountingTeacher(copy.deepcopy(model).eval())
    cfg = settings.train.model_copy(update={"max_steps_per_epoch": 2, "batch_size": 8})
    finetune_classifier(
        model,
        dataset,
        cfg,
        epochs=1,
        stage="t",
        checkpoint_dir=tmp_path / "ckpt",
        teacher=teacher,
        teach_users_photos=teach_users_photos,
    )
    assert teacher.seen == (16 if teach_users_photos else 0)  # 2 steps of 8 images, every one a user's


@pytest.mark.slow
def test_training_learns_well_above_chance_and_the_same_seed_gives_the_same_weights(settings, tmp_path):
    """A training bug that leaves the model at chance (0.25 here) fails this; so does hidden
    nondeterminism, which would make every comparison of two retrains partly noise."""
    dataset = generate_synthetic(tmp_path / "dataset", SyntheticDataConfig(num_classes=4, images_per_class=30))
    cfg = settings.train.model_copy(update={"pretrain_epochs": 2, "finetune_epochs": 10, "patience": 10})
    seeded = settings.model_copy(update={"train": cfg})
    first, again = (train(seeded, dataset_dir=dataset, out_dir=tmp_path / name) for name in ("first", "again"))
    model = load_classifier(first.model_path)
    lab = score(eager_predict_fn(model), dataset, model.classes, model.image_size)["lab"]
    print(f"test top-1 {lab.metrics['top1']:.3f} on {len(lab.labels)} images, val top-1 {first.val_top1:.3f}")
    assert lab.metrics["top1"] >= MIN_TINY_TOP1
    weights, weights_again = model.state_dict(), load_classifier(again.model_path).state_dict()
    assert all(torch.equal(weights[key], weights_again[key]) for key in weights)

    # a retrain from these weights skips pretraining and keeps what they knew
    weights_file = first.model_path.with_name("weights.pt")
    warm_cfg = cfg.model_copy(update={"warm_start_epochs": 2})
    warm_settings = seeded.model_copy(update={"train": warm_cfg})
    warm = train(warm_settings, dataset_dir=dataset, out_dir=tmp_path / "warm", warm_start=weights_file)
    assert not (tmp_path / "warm" / "checkpoints" / "coca-best").exists() and warm.epochs_run == 2
    warm_model = load_classifier(warm.model_path)
    assert score(eager_predict_fn(warm_model), dataset, model.classes, model.image_size)["lab"].metrics["top1"] >= MIN_TINY_TOP1
    assert warm_classifier("coca_tiny", ["other", "species"], weights_file) is None  # other species: from scratch


@pytest.mark.slow
def test_a_training_killed_in_its_third_epoch_resumes_there_and_ends_as_an_uninterrupted_one(settings, tmp_path):
    """A retried train task used to start again from epoch 0; now it resumes after the last complete
    epoch, with the optimizer, schedule and random generators where they were."""
    env = {**os.environ, "INSECT_TRAIN__FINETUNE_EPOCHS": "5", "INSECT_TRAIN__PATIENCE": "5"}

    def train_command(out: Path) -> list[str]:
        return [sys.executable, "-m", "ml.train", "--out-dir", str(out), "--dataset-dir", str(settings.base_dataset_dir)]

    killed = subprocess.Popen(train_command(tmp_path / "killed"), env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    progress = tmp_path / "killed" / "checkpoints" / "classifier-progress.json"
    while not (progress.is_file() and json.loads(progress.read_text())["epoch"] == 1):  # two epochs done
        assert killed.poll() is None, "training ended before its third epoch"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    resumed = subprocess.run(train_command(tmp_path / "killed"), env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "classifier: resuming after epoch 2" in resumed.stdout
    assert "coca: resuming after epoch 1" in resumed.stdout  # pretraining had finished: restored, not rerun
    uninterrupted = subprocess.run(train_command(tmp_path / "whole"), env=env, cwd=REPO_ROOT, capture_output=True)
    assert uninterrupted.returncode == 0
    results = [json.loads((tmp_path / name / "result.json").read_text()) for name in ("killed", "whole")]
    assert results[0]["val_top1"] == results[1]["val_top1"] and results[0]["epochs_run"] == results[1]["epochs_run"] == 5
    weights = [load_classifier(tmp_path / name / "classifier.pt").state_dict() for name in ("killed", "whole")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_a_single_process_training_takes_a_free_rendezvous_port_not_one_derived_from_its_pid():
    """The port was 29500 + pid % 1000: a retried task failed with EADDRINUSE when that port was
    held (in CI, by another process whose pid agreed modulo 1000)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 29500 + os.getpid() % 1000))
        held.listen()
        with single_process_rank(), socket.socket() as store:
            store.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))
