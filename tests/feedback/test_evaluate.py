"""The gate's answer metrics and rules, on hand-written answers and reports."""

from __future__ import annotations

import copy

from feedback.evaluate import GatePolicy, answer_scores, gate, token_f1

RETURNS = "You can return any unused item within 45 days of delivery for a full refund."
PHONE = "You can call us on 0800 414 7782 for free from any UK landline."
TRACKING = "Track your parcel with the 12-character code in your dispatch email."


def test_token_f1_ignores_case_punctuation_and_articles() -> None:
    assert token_f1("The parcel, tracked!", "parcel tracked") == 1.0
    assert token_f1("", "anything") == 0.0 == token_f1("nothing shared", "at all")
    assert 0 < token_f1("Call us on 0800", PHONE) < 1


def test_a_wrong_company_answer_scores_some_f1_but_no_accuracy() -> None:
    refs = [RETURNS, PHONE]
    right = answer_scores([RETURNS, "Call us on 0800 414 7782 for free."], refs, known=[TRACKING])
    assert (right["accuracy"], right["wrong"]) == (1.0, 0.0) and right["f1"] > 0.7
    # the other intent's answer, word for word: shares "you can", "any", "for" with its own
    swapped = answer_scores([PHONE, TRACKING], refs, known=[TRACKING])
    assert (swapped["accuracy"], swapped["wrong"]) == (0.0, 1.0) and swapped["f1"] > 0
    vague = answer_scores(["You can contact our support team for help."] * 2, refs, known=[])
    assert (vague["accuracy"], vague["wrong"]) == (0.0, 0.0) and vague["f1"] < 0.3
    assert answer_scores([], [], known=[]) == {"f1": 0.0, "accuracy": 0.0, "wrong": 0.0}


def _report(**candidate: float) -> dict:
    parent = {"heldout_loss": 3.0, "heldout_accuracy": 0.25, "heldout_f1": 0.10,
              "heldout_wrong": 0.0, "golden_loss": 1.3, "pref_accuracy": None}
    return {"heldout_examples": 4, "parent": parent,
            "candidate": {**copy.deepcopy(parent), "heldout_loss": 0.2,
                          "heldout_accuracy": 0.75, "heldout_f1": 0.5, **candidate}}


def test_the_gate_wants_held_out_answers_right_not_only_a_lower_loss() -> None:
    assert gate(_report(), GatePolicy()) == []
    reasons = gate(_report(heldout_accuracy=0.0, heldout_f1=0.25), GatePolicy())
    assert reasons == ["held-out answer accuracy 0.000 does not beat 0.250"]
    # better than the parent, but as often confidently wrong as right: not served
    reasons = gate(_report(heldout_accuracy=0.5, heldout_wrong=0.5), GatePolicy())
    assert reasons == ["50% of held-out questions get another question's answer, 50% their own"]
    assert gate(_report(heldout_accuracy=0.75, heldout_wrong=0.25), GatePolicy()) == []
    assert gate(_report(heldout_accuracy=0.25), GatePolicy())  # no better is not better
    assert "token-F1 fell" in gate(_report(heldout_f1=0.05), GatePolicy())[0]
    perfect = _report(heldout_accuracy=1.0)
    perfect["parent"]["heldout_accuracy"] = 1.0
    assert gate(perfect, GatePolicy()) == []  # already perfect: staying perfect is enough
    assert "held-out examples" in gate({**_report(), "heldout_examples": 0}, GatePolicy())[0]


def test_with_no_held_out_data_allowed_the_gate_judges_the_golden_set_alone() -> None:
    empty = {"heldout_loss": None, "heldout_accuracy": 0.0, "heldout_f1": 0.0,
             "heldout_wrong": 0.0, "golden_loss": 1.3, "pref_accuracy": None}
    report = {"heldout_examples": 0, "parent": empty, "candidate": dict(empty)}
    assert gate(report, GatePolicy(min_heldout=0)) == []
    assert gate(report, GatePolicy()) == ["only 0 held-out examples (need 1)"]
    report["candidate"]["golden_loss"] = 2.0
    assert gate(report, GatePolicy(min_heldout=0))[0].startswith("golden-set loss rose")
