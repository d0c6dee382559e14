import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import REPO_ROOT, SyntheticDataConfig
from ml.data import SPLITS, IP102Dataset, all_captions, dataset_digest, manifest, read_classes, read_split
from ml.data.ip102 import FIELD_SPLIT
from ml.data.synthetic import MARKER, canvas_size, class_sizes, generate_synthetic, species_plan, user_photos
from ml.data.versions import Sample, build_version, in_field_holdout
from ml.evaluate import evaluation_slices
from tests.support import TINY_ENV


def test_generator_writes_ip102_layout(tiny_dataset):
    assert read_classes(tiny_dataset) == ["rice leaf roller", "rice leaf caterpillar", "paddy stem maggot", "asiatic rice borer"]
    assert (tiny_dataset / "classes.txt").read_text().startswith("1 rice leaf roller\n")
    counts = {split: len(read_split(tiny_dataset, split)) for split in SPLITS}
    assert counts == {"train": 24, "val": 8, "test": 8}
    for split in SPLITS:
        assert {label for _, label in read_split(tiny_dataset, split)} == {0, 1, 2, 3}
    with Image.open(tiny_dataset / "images" / read_split(tiny_dataset, "test")[0][0]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"


def test_a_long_tail_dataset_falls_off_by_the_ratio_and_keeps_every_class_in_every_split(tmp_path):
    cfg = SyntheticDataConfig(num_classes=6, images_per_class=40, image_size=16, tail_ratio=8.0, min_test_images_per_class=0)
    assert class_sizes(cfg) == [40, 26, 17, 11, 8, 5]
    dataset = generate_synthetic(tmp_path / "tail", cfg)
    counts = manifest(dataset).groupby("label").size().tolist()
    assert counts == class_sizes(cfg)
    for split in SPLITS:
        assert {label for _, label in read_split(dataset, split)} == set(range(6))


def test_the_lab_test_split_holds_enough_of_each_species_to_measure(tmp_path):
    dataset = generate_synthetic(tmp_path / "ds", SyntheticDataConfig(num_classes=3, images_per_class=10, image_size=16))
    assert [len(read_split(dataset, split)) for split in SPLITS] == [3 * 6, 3 * 2, 3 * 40]


def test_small_images_are_drawn_three_times_as_large_and_large_ones_at_their_own_size():
    """The demo's and tests' images keep their antialiasing; a 512-px dataset (the GPU check's)
    is drawn at 512 px, not 1,536, which took ten times as long."""
    assert [canvas_size(size) for size in (64, 128, 256, 512)] == [192, 384, 256, 512]


def test_classes_are_visually_distinct_but_images_vary(tiny_dataset):
    plans = [species_plan(i, 4) for i in range(4)]
    assert len(set(plans)) == 4
    first_two = [np.asarray(Image.open(tiny_dataset / "images" / f"000_000{i}.jpg"), dtype=float) for i in range(2)]
    assert np.abs(first_two[0] - first_two[1]).mean() > 5  # pose, background and noise differ


def test_loader_reads_a_hand_made_ip102_directory(tmp_path: Path):
    (tmp_path / "images").mkdir()
    for name, colour in [("a.jpg", "red"), ("b.jpg", "blue"), ("c.jpg", "green")]:
        Image.new("RGB", (40, 30), colour).save(tmp_path / "images" / name)
    (tmp_path / "classes.txt").write_text("1 rice leaf roller\n2 grub\n")
    (tmp_path / "train.txt").write_text("a.jpg 0\nb.jpg 1\n")
    (tmp_path / "val.txt").write_text("c.jpg 1\n")
    (tmp_path / "test.txt").write_text("")
    assert read_classes(tmp_path) == ["rice leaf roller", "grub"]
    dataset = IP102Dataset(tmp_path, "train")
    image, label = dataset[1]
    assert len(dataset) == 2 and label == 1 and image.getpixel((0, 0))[2] > 200
    table = manifest(tmp_path)
    assert list(table["split"]) == ["train", "train", "val"] and table["sha256"].notna().all()


def test_plain_classes_file_without_numbers(tmp_path: Path):
    (tmp_path / "classes.txt").write_text("aphids\nred spider\n")
    assert read_classes(tmp_path) == ["aphids", "red spider"]


def test_malformed_split_line_names_file_and_line(tmp_path: Path):
    (tmp_path / "train.txt").write_text("a.jpg 0\nb.jpg\n")
    with pytest.raises(ValueError, match=r"train.txt:2"):
        read_split(tmp_path, "train")


def test_digest_changes_with_content(tiny_dataset):
    table, classes = manifest(tiny_dataset), read_classes(tiny_dataset)
    digest = dataset_digest(table, classes)
    assert digest == dataset_digest(table.sample(frac=1, random_state=0), classes)  # order-free
    table.loc[0, "label"] = 3
    assert dataset_digest(table, classes) != digest


def test_captions_name_the_species():
    captions = all_captions(["Rice Stemfly"])
    assert captions and all("rice stemfly" in c for c in captions)


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def ip102_checkout(tiny_dataset, tmp_path) -> Path:
    """A dataset in the IP102 layout the generator did not write (a real checkout, for all it knows)."""
    root = tmp_path / "ip102"
    shutil.copytree(tiny_dataset, root, ignore=shutil.ignore_patterns(MARKER))
    return root


def test_the_generator_refuses_a_directory_it_did_not_write_and_leaves_it_alone(ip102_checkout):
    before = _contents(ip102_checkout)
    with pytest.raises(FileExistsError, match="did not write"):
        generate_synthetic(ip102_checkout, SyntheticDataConfig(num_classes=4, images_per_class=5))
    assert _contents(ip102_checkout) == before


def test_make_data_leaves_a_configured_ip102_checkout_byte_for_byte_unchanged(ip102_checkout, tmp_path):
    before = _contents(ip102_checkout)
    env = {**os.environ, **TINY_ENV, "INSECT_DATA_DIR": str(tmp_path / "data"), "INSECT_DATASET_DIR": str(ip102_checkout)}
    made = subprocess.run(["make", "data"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    assert _contents(ip102_checkout) == before
    assert (tmp_path / "data" / "datasets" / "synthetic" / "classes.txt").is_file()  # it drew into its own directory


def test_regenerating_redraws_beside_so_hard_linked_versions_keep_their_images(tmp_path):
    root = generate_synthetic(tmp_path / "synthetic", SyntheticDataConfig(num_classes=4, images_per_class=5))
    image = root / "images" / "000_0000.jpg"
    os.link(image, tmp_path / "published.jpg")  # what a dataset version does
    published, drawn_at = image.read_bytes(), image.stat().st_mtime_ns
    generate_synthetic(root, SyntheticDataConfig(num_classes=4, images_per_class=5))
    assert image.stat().st_mtime_ns == drawn_at  # the same settings: nothing rewritten
    generate_synthetic(root, SyntheticDataConfig(num_classes=4, images_per_class=5, seed=1))
    assert image.read_bytes() != published and (tmp_path / "published.jpg").read_bytes() == published


def test_field_photos_differ_from_the_lab_where_users_differ_smaller_dimmer_on_the_ground(tiny_dataset):
    lab = [np.asarray(Image.open(tiny_dataset / "images" / name), np.float32) for name, _ in read_split(tiny_dataset, "train")]
    field = [np.asarray(image, np.float32) for image, _ in user_photos(num_classes=4, count=24, size=64, seed=1)]
    assert np.mean([image.mean() for image in field]) < 0.85 * np.mean([image.mean() for image in lab])  # dimmer
    greenness = (
        [np.mean(image[..., 1] - image[..., 2]) for image in lab],
        [np.mean(image[..., 1] - image[..., 2]) for image in field],
    )
    assert np.mean(greenness[1]) < np.mean(greenness[0])  # soil and sand, not leaves
    assert [label for _, label in user_photos(4, 8, 64, seed=1)] == [0, 1, 2, 3, 0, 1, 2, 3]


def _samples(count: int, label: str) -> list[Sample]:
    photos = []
    for i in range(count):
        out = io.BytesIO()
        next(user_photos(1, 1, 32, seed=i))[0].save(out, format="JPEG")
        data = out.getvalue()
        photos.append(Sample(hashlib.sha256(data).hexdigest(), label, data, f"feedback:{i}"))
    return photos


def test_a_hash_chosen_share_of_new_images_is_held_out_as_the_field_slice_and_never_trains(tiny_dataset, tmp_path):
    label = read_classes(tiny_dataset)[0]
    samples = _samples(40, label)
    first = build_version(tiny_dataset, samples[:30], tmp_path / "v1", field_share=0.3)
    field = dict(read_split(first.root, FIELD_SPLIT))
    expected = {f"feedback_{s.sha256[:16]}.jpg" for s in samples[:30] if in_field_holdout(s.sha256, 0.3)}
    assert set(field) == expected and 3 <= len(field) <= 18 and first.held_out == len(field)
    assert not set(field) & set(dict(read_split(first.root, "train")))
    # sent again (relabelled) or built on: a held-out image stays held out, and the slice only grows
    second = build_version(first.root, [*samples[:30], *samples[30:]], tmp_path / "v2", field_share=0.3)
    assert set(field) <= set(dict(read_split(second.root, FIELD_SPLIT)))
    assert not set(dict(read_split(second.root, FIELD_SPLIT))) & set(dict(read_split(second.root, "train")))
    assert second.added + second.held_out == 10 and len(second.skipped) == len(field)
    assert evaluation_slices(second.root) == {"lab": "test", "field": FIELD_SPLIT}
    assert evaluation_slices(tiny_dataset) == {"lab": "test"}
