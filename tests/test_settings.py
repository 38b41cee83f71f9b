"""Configuration: the product's defaults are the ones the benchmarks measured."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from chatloop.app import loop_config
from chatloop.settings import Settings
from feedback.train import TrainJob, trains_in_bf16


def test_the_learning_loop_trains_with_the_training_jobs_defaults() -> None:
    job = loop_config(Settings(_env_file=None)).train  # type: ignore[call-arg]
    default = TrainJob(model_dir=job.model_dir, out_dir="", work_dir="")
    assert dataclasses.asdict(job) == dataclasses.asdict(default)


def test_neftune_is_off_by_default_and_configurable() -> None:
    assert loop_config(Settings(_env_file=None)).train.neftune_alpha is None  # type: ignore[call-arg]
    on = Settings(_env_file=None, learn_neftune_alpha=5)  # type: ignore[call-arg]
    assert loop_config(on).train.neftune_alpha == 5.0
    with pytest.raises(ValidationError):
        Settings(_env_file=None, learn_neftune_alpha=-1)  # type: ignore[call-arg]


def test_question_augmentation_is_configurable_and_checked() -> None:
    off = Settings(_env_file=None, learn_augment=0)  # type: ignore[call-arg]
    assert loop_config(off).train.augment == 0
    with pytest.raises(ValidationError):
        Settings(_env_file=None, learn_augment=-1)  # type: ignore[call-arg]


def test_training_precision_is_configurable_and_checked() -> None:
    assert loop_config(Settings(_env_file=None)).train.precision == "auto"  # type: ignore[call-arg]
    fp32 = Settings(_env_file=None, learn_precision="fp32")  # type: ignore[call-arg]
    assert loop_config(fp32).train.precision == "fp32"
    with pytest.raises(ValidationError):
        Settings(_env_file=None, learn_precision="fp16")  # type: ignore[call-arg]


def test_a_forced_training_precision_is_used_and_an_unknown_one_refused() -> None:
    def job(precision: str) -> TrainJob:
        return TrainJob(model_dir="", out_dir="", work_dir="", precision=precision)

    assert (trains_in_bf16(job("bf16")), trains_in_bf16(job("fp32"))) == (True, False)
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        trains_in_bf16(job("fp16"))


def test_the_training_worker_command_is_configurable_and_checked() -> None:
    default = loop_config(Settings(_env_file=None)).train_command  # type: ignore[call-arg]
    assert default[1:] == ["-m", "feedback.train"]
    accelerate = str(Path(sys.executable).parent / "accelerate")  # installed with TRL
    cfg = loop_config(Settings(_env_file=None,  # type: ignore[call-arg]
                               learn_train_command=f"{accelerate} launch --num_processes 1 "
                                                   "-m feedback.train"))
    assert cfg.train_command == [accelerate, "launch", "--num_processes", "1", "-m",
                                 "feedback.train"]
    with pytest.raises(ValidationError, match="not an executable on PATH"):
        Settings(_env_file=None, learn_train_command="no-such-launcher -m feedback.train")  # type: ignore[call-arg]
