"""The gate promotes only what noise cannot explain (registry/gate.py), on made-up answers."""

import pytest

from config import GateConfig
from registry.gate import decide
from tests.support import answers

CLASSES = 10
LABELS = [i % CLASSES for i in range(200)]  # 20 images per class
GATE = GateConfig()


def right_except(wrong: set[int]) -> list[bool]:
    return [i not in wrong for i in range(len(LABELS))]


def slices(lab_wrong: set[int], field_wrong: set[int]) -> dict:
    return {
        "lab": answers(LABELS, right_except(lab_wrong), CLASSES),
        "field": answers(LABELS, right_except(field_wrong), CLASSES),
    }


CHAMPION = slices(lab_wrong=set(range(0, 200, 9)), field_wrong=set(range(0, 200, 2)))  # lab 0.89, field 0.50


def test_the_first_model_is_promoted():
    assert decide(CHAMPION, None, GATE).promoted


def test_a_field_gain_beyond_noise_with_lab_held_is_promoted_and_its_statistics_recorded():
    candidate = slices(lab_wrong=set(range(0, 200, 9)), field_wrong=set(range(0, 200, 6)))  # field 0.50 -> 0.83
    decision = decide(candidate, CHAMPION, GATE)
    assert decision.promoted and decision.reasons == [] and decision.improvement_slice == "field"
    assert decision.checks["improvement"]["wins"] == 66 and decision.checks["improvement"]["p_value"] < 1e-9
    assert decision.checks["lab_non_inferiority"]["difference"] == 0.0


def test_a_candidate_better_by_noise_only_is_refused():
    """4 more field images right and 2 fewer (p = 0.34) is what retraining on the same data can do."""
    field_wrong = (set(range(0, 200, 2)) - {0, 2, 4, 6}) | {1, 3}
    decision = decide(slices(lab_wrong=set(range(0, 200, 9)), field_wrong=field_wrong), CHAMPION, GATE)
    assert not decision.promoted
    assert decision.checks["improvement"]["p_value"] > 0.3
    assert any("no significant improvement on the field slice" in reason for reason in decision.reasons)


def test_a_candidate_that_regresses_a_class_is_refused_even_when_better_overall():
    class_3 = {i for i in range(200) if LABELS[i] == 3}
    candidate = slices(lab_wrong=class_3, field_wrong=set(range(0, 200, 6)))  # lab top-1 0.90 vs 0.89, class 3 at 0
    decision = decide(candidate, CHAMPION, GATE)
    assert not decision.promoted
    assert decision.checks["class_recall_lab"]["regressed"] == {3: pytest.approx(0.9)}


def test_a_field_gain_paid_for_in_the_lab_beyond_the_margin_is_refused():
    candidate = slices(lab_wrong=set(range(0, 200, 4)), field_wrong=set(range(0, 200, 6)))  # lab 0.89 -> 0.75
    decision = decide(candidate, CHAMPION, GATE)
    assert not decision.promoted and decision.checks["lab_non_inferiority"]["lower"] < -GATE.lab_margin
    assert any("lab top-1 may be worse" in reason for reason in decision.reasons)


def test_without_a_field_slice_big_enough_the_improvement_must_show_in_the_lab():
    lab_only = {"lab": CHAMPION["lab"]}
    same = decide({"lab": CHAMPION["lab"]}, lab_only, GATE)
    assert not same.promoted and same.improvement_slice == "lab"
    better = decide({"lab": answers(LABELS, right_except(set()), CLASSES)}, lab_only, GATE)  # 23 won, 0 lost
    assert better.promoted


def test_slices_of_different_images_are_refused():
    other = {"lab": answers(LABELS[1:] + LABELS[:1], right_except(set()), CLASSES)}
    with pytest.raises(ValueError, match="not the same images"):
        decide(other, {"lab": CHAMPION["lab"]}, GATE)
