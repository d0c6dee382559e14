"""The validate stage: Great Expectations checks over a dataset's manifest; a failure stops the
pipeline before training (`python -m ml.validate --out-dir D [--dataset-dir DS]`)."""

from __future__ import annotations

import json
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
import typer
from great_expectations.expectations.row_conditions import Column
from PIL import Image

from config import Settings
from config.cli import exit_on
from ml import cli
from ml.data import dataset_digest, manifest, read_classes
from ml.data.ip102 import MAX_SIDE, MIN_SIDE
from ml.data.versions import TamperedVersionError, verify
from ml.results import ValidationSummary
from ml.tracking import NO_RUN, RunLog


class DataValidationError(RuntimeError):
    """The dataset broke at least one expectation; the message is the readable report."""


def _image_facts(path: str) -> tuple[bool, int, int]:
    try:
        with Image.open(path) as image:
            image.load()  # decode fully: truncated JPEGs open fine but fail here
            return True, *image.size
    except (OSError, ValueError):
        return False, 0, 0


def profile(root: Path) -> pd.DataFrame:
    """The manifest plus what the expectations look at: decodability, size, cross-split hashes."""
    table = manifest(root)
    facts = [_image_facts(p) for p in table["path"]]
    table["decodes"] = [f[0] for f in facts]
    table["width"] = [f[1] for f in facts]
    table["height"] = [f[2] for f in facts]
    table["splits_with_same_image"] = table.groupby("sha256")["split"].transform("nunique").fillna(1).astype(int)
    return table


def expectation_suite(num_classes: int) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name="ip102_manifest")
    for expectation in (
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="sha256"),  # the file exists
        gxe.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=num_classes - 1),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=MIN_SIDE, max_value=MAX_SIDE),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=MIN_SIDE, max_value=MAX_SIDE),
        gxe.ExpectColumnValuesToBeInSet(column="splits_with_same_image", value_set=[1]),
        gxe.ExpectColumnDistinctValuesToContainSet(
            column="label", value_set=list(range(num_classes)), row_condition=Column("split") == "train"
        ),
    ):
        suite.add_expectation(expectation)
    return suite


def _readable(results: list) -> str:
    lines = []
    for r in results:
        if r.success:
            continue
        config = r.expectation_config
        examples = r.result.get("partial_unexpected_list") or r.result.get("details") or r.result.get("observed_value")
        lines.append(f"- {config.type} {dict(config.kwargs)}: unexpected {examples!r:.300}")
    return "\n".join(lines)


def validate(settings: Settings, *, dataset_dir: Path, out_dir: Path, run: RunLog = NO_RUN) -> ValidationSummary:
    """Run the suite over the dataset at `dataset_dir`; raise DataValidationError with a readable
    report on failure. The full Great Expectations result is written to `out_dir` either way, and
    logged with the dataset's digest and size. A version changed since it was sealed fails too."""
    try:
        verify(dataset_dir)
    except TamperedVersionError as error:
        raise DataValidationError(str(error)) from error
    classes = read_classes(dataset_dir)
    table = profile(dataset_dir)
    context = gx.get_context(mode="ephemeral")
    batch = (
        context.data_sources.add_pandas("dataset")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": table})
    )
    result = batch.validate(expectation_suite(len(classes)))
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "validation.json"
    report_path.write_text(json.dumps(result.to_json_dict(), indent=1))
    run.artifact(report_path, "validation")
    if not result.success:
        raise DataValidationError(
            f"dataset {dataset_dir} failed validation (full report: {report_path}):\n{_readable(result.results)}"
        )
    summary = ValidationSummary(
        dataset_dir=dataset_dir,
        digest=dataset_digest(table, classes),
        num_images=len(table),
        num_classes=len(classes),
        report_path=report_path,
    )
    run.tags({"dataset_digest": summary.digest, "dataset_dir": str(dataset_dir)})
    run.params({"dataset.images": summary.num_images, "dataset.classes": summary.num_classes})
    return summary.save(out_dir)


def main(out_dir: cli.OutDir, dataset_dir: cli.DatasetDir = None, run_id: cli.RunId = None) -> None:
    """Validate a dataset; exit 1 with the failed expectations when it breaks one."""
    with exit_on(DataValidationError):
        cli.run_stage(validate, run_id, dataset_dir, out_dir=out_dir)


if __name__ == "__main__":
    typer.run(main)
