import shutil

import pytest

from ml.validate import DataValidationError, validate


@pytest.fixture
def copy_of(tiny_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    return root


def test_valid_dataset_passes(settings, tiny_dataset, tmp_path):
    summary = validate(settings, dataset_dir=tiny_dataset, out_dir=tmp_path)
    assert summary.num_images == 40 and summary.num_classes == 4 and len(summary.digest) == 64
    assert summary.report_path.is_file()


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda r: (r / "images" / "000_0000.jpg").write_bytes(b"not a jpeg"), "decodes"),
        (lambda r: (r / "images" / "000_0001.jpg").unlink(), "sha256"),
        (lambda r: (r / "val.txt").write_text((r / "val.txt").read_text() + "000_0002.jpg 0\n"), "splits_with_same_image"),
        (lambda r: (r / "test.txt").write_text((r / "test.txt").read_text() + "000_0003.jpg 9\n"), "label"),
        (
            lambda r: (r / "train.txt").write_text(
                "".join(line + "\n" for line in (r / "train.txt").read_text().split("\n") if line and not line.endswith(" 2"))
            ),
            "expect_column_distinct_values_to_contain_set",
        ),
    ],
    ids=["undecodable", "missing", "duplicate-across-splits", "label-out-of-range", "empty-class"],
)
def test_corrupted_dataset_fails_with_readable_report(settings, copy_of, tmp_path, corrupt, expected):
    corrupt(copy_of)
    with pytest.raises(DataValidationError, match=expected) as failure:
        validate(settings, dataset_dir=copy_of, out_dir=tmp_path / "report")
    assert "full report" in str(failure.value)
