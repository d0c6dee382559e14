import mlflow
import torch

from ml.data import read_classes
from ml.model import SpeciesClassifier, build_coca
from ml.train import finetune_classifier
from registry.tracking import run as tracked_run


def test_training_steps_through_deepspeed(settings, tmp_path):
    model = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), read_classes(settings.resolved_dataset_dir))
    before = model.head.weight.detach().clone()
    cfg = settings.train.model_copy(update={"max_steps_per_epoch": 2})
    with tracked_run(settings) as run:
        top1, epochs = finetune_classifier(model, settings.resolved_dataset_dir, cfg, epochs=1, stage="smoke",
                                           checkpoint_dir=tmp_path / "ckpt")
    assert epochs == 1 and 0.0 <= top1 <= 1.0
    assert not torch.equal(before, model.head.weight)  # the optimizer stepped
    assert (tmp_path / "ckpt" / "smoke-best").is_dir()  # DeepSpeed checkpoint written
    assert "smoke_train_loss" in mlflow.get_run(run.info.run_id).data.metrics
    torch.save(model, tmp_path / "plain.pt")  # DeepSpeed's hooks are gone: the module pickles
