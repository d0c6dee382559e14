import torch

from ml.data import all_captions
from ml.model import CaptionTokenizer, SpeciesClassifier, available_configs, build_coca


def test_every_config_builds_and_runs():
    for name in available_configs():
        coca = build_coca(name, vocab_size=50)
        size = coca.visual.image_size[0]
        out = coca(torch.rand(1, 3, size, size), torch.randint(1, 50, (1, 24)))  # batch 1, on the CPU
        assert torch.isfinite(out["logits"]).all() and out["logits"].shape[-1] == 50


def test_caption_tokenizer_is_compact_and_keeps_pad_and_eot_order():
    tokenize = CaptionTokenizer(24, all_captions(["grub", "red spider"]))
    ids = tokenize(["a photo of a grub."])[0]
    assert tokenize.vocab_size < 60
    assert ids[0] == tokenize.vocab_size - 2 and ids.max() == tokenize.vocab_size - 1  # sot, eot keep the top
    assert ids[-1] == 0  # padding


def test_classifier_takes_unit_range_images():
    classifier = SpeciesClassifier.from_coca(build_coca("coca_tiny", vocab_size=50), ["a", "b", "c"])
    assert classifier(torch.rand(5, 3, 64, 64)).shape == (5, 3)
