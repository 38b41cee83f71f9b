"""The trainer's metrics: runs by outcome, each failed gate check named, canary votes."""

from __future__ import annotations

from typing import Any

from chatloop.telemetry import hooks, metrics
from feedback.canary import CanaryOutcome, Decision, Votes
from feedback.evaluate import GatePolicy, gate
from feedback.loop import CycleResult


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_gate_reason_names_its_check() -> None:
    worse = {"heldout_loss": 2.0, "heldout_accuracy": 0.1, "heldout_wrong": 0.5,
             "heldout_f1": 0.1, "golden_loss": 9.0, "pref_accuracy": 0.1}
    better = {"heldout_loss": 1.0, "heldout_accuracy": 0.5, "heldout_wrong": 0.0,
              "heldout_f1": 0.5, "golden_loss": 1.0, "pref_accuracy": 0.9}
    reasons = gate({"candidate": worse, "parent": better, "heldout_examples": 5}, GatePolicy())
    checks = [hooks.gate_check(r) for r in reasons]
    assert sorted(checks) == sorted(["heldout_loss", "heldout_accuracy", "wrong_answers",
                                     "heldout_f1", "golden_loss", "preference_accuracy"])
    few = gate({"candidate": better, "parent": better, "heldout_examples": 0},
               GatePolicy(min_heldout=3))
    assert [hooks.gate_check(r) for r in few] == ["heldout_size"]


async def test_runs_gate_failures_and_canary_votes_are_recorded(spans: Any) -> None:
    @hooks.training_run
    async def rejected(**_: Any) -> CycleResult:
        return CycleResult(7, "rejected", "fb-v2", ("golden-set loss rose from 1 to 2",))

    @hooks.canary_evaluated
    async def waiting(**_: Any) -> CanaryOutcome:
        return CanaryOutcome(Decision.WAIT, "fb-v2", Votes(10, 3), Votes(40, 8))

    runs, golden = value("chatloop_training_runs_total", outcome="rejected"), \
        value("chatloop_gate_failures_total", check="golden_loss")
    await rejected(trigger="threshold")
    await waiting()
    assert value("chatloop_training_runs_total", outcome="rejected") == runs + 1
    assert value("chatloop_gate_failures_total", check="golden_loss") == golden + 1
    votes = {(arm, rating): value("chatloop_canary_votes", adapter="fb-v2", arm=arm,
                                  rating=rating)
             for arm in ("canary", "control") for rating in ("up", "down")}
    assert votes == {("canary", "up"): 7, ("canary", "down"): 3, ("control", "up"): 32,
                     ("control", "down"): 8}
