"""A stand-in for `python -m feedback.train` where the test is about the loop, not the weights.

`python -m tests.feedback.fake_trainer MODE [SECONDS] JOB.json`: after SECONDS it
writes a minimal adapter and a report that passes the gate (`pass`) or fails it
(`regress`: golden-set loss up 50 %), or exits non-zero without output (`crash`).
A passing one settles as the worker does (`job.settle_gate`): its report says it trained
on the held-out corrections too.
Parity outputs mimic tests/fakes/inference.ScriptedBackend ("Echo: <prompt>").
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from feedback.train import TrainJob, settleable


def main(argv: list[str]) -> int:
    mode, seconds, job_path = argv[1], float(argv[2]), Path(argv[3])
    job = TrainJob.load(job_path)
    print(f"fake training {mode} for {seconds}s", flush=True)
    time.sleep(seconds)
    if mode == "crash":
        return 3
    golden = 1.5 if mode == "regress" else 1.0
    report = {"train": {"sft_examples": 1}, "heldout_examples": 1,
              "candidate": {"heldout_loss": 1.0, "heldout_accuracy": 1.0, "heldout_f1": 0.8,
                            "heldout_wrong": 0.0,
                            "golden_loss": golden, "pref_accuracy": 1.0},
              "parent": {"heldout_loss": 2.0, "heldout_accuracy": 0.0, "heldout_f1": 0.1,
                         "heldout_wrong": 0.0,
                         "golden_loss": 1.0, "pref_accuracy": 0.5},
              "parity_prompts": job.parity_prompts,
              "parity_outputs": [f"Echo: {p}" for p in job.parity_prompts]}
    heldout = settleable(Path(job.work_dir))
    if mode == "pass" and job.settle_gate is not None and heldout:
        report["settle"] = {"kept": True, "examples": len(heldout),
                            "answer_ids": [e.answer_id for e in heldout]}
    memory = Path(job.work_dir) / "memory.jsonl"  # the answer memory the loop hands over
    report["memory_entries"] = (len(memory.read_text().splitlines()) if memory.exists()
                                else None)
    tmp = Path(job.out_dir).parent / f".{Path(job.out_dir).name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    (tmp / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (tmp / "report.json").write_text(json.dumps(report))
    tmp.rename(job.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
