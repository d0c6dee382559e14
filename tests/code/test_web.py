"""The web app's templates and refusals, on their own (the pages themselves: tests/system/test_service.py)."""

from datetime import UTC, datetime
from types import SimpleNamespace

from bentos.web import registry_refusal, templates
from feedback.keys import Caller


def _row(**state):
    fields = {"created_at": datetime.now(UTC), "predicted_label": "rice leaf roller", "corrected_label": "paddy stem maggot"}
    return SimpleNamespace(**fields, **{"quarantine_reason": None, "dataset_dir": None, "kind": "label", **state})


def test_my_feedback_says_what_became_of_each_correction():
    rows = [
        _row(kind="suggestion"),
        _row(),
        _row(quarantine_reason="near-duplicate of a test image"),
        _row(dataset_dir="/data/datasets/versions/v0003"),
    ]
    trained = {"/data/datasets/versions/v0003": ["7", "8"]}
    html = templates.get_template("history.html").render(
        rows=rows, trained=trained, prefix="/app", csrf="t", caller=Caller("ann", "client")
    )
    for state in (
        "suggested, waiting for an expert",
        "confirmed, waiting for the next dataset version",
        "quarantined: near-duplicate of a test image",
        "in training dataset v0003, trained in model version 7, 8",
    ):
        assert state in " ".join(html.split()), state


def test_a_registry_that_refuses_the_service_an_alias_move_is_a_403_that_says_where_to_promote():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST

    refused = registry_refusal(MlflowException("no", error_code=PERMISSION_DENIED), "No version 7 to promote.")
    assert refused.status == 403 and "MLflow UI" in refused.message
    missing = registry_refusal(MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST), "No version 7 to promote.")
    assert (missing.status, missing.message) == (404, "No version 7 to promote.")
