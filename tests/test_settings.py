"""Configuration: the product's defaults are the ones the benchmarks measured."""

from __future__ import annotations

import dataclasses

from chatloop.app import loop_config
from chatloop.settings import Settings
from feedback.train import TrainJob


def test_the_learning_loop_trains_with_the_training_jobs_defaults() -> None:
    job = loop_config(Settings(_env_file=None)).train  # type: ignore[call-arg]
    default = TrainJob(model_dir=job.model_dir, out_dir="", work_dir="")
    assert dataclasses.asdict(job) == dataclasses.asdict(default)
