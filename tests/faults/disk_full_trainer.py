"""A stand-in trainer that writes its adapter through `feedback.train`'s atomic writer with
the file size limited (RLIMIT_FSIZE), as on a full disk: the write fails with EFBIG.

`python -m tests.faults.disk_full_trainer LIMIT_BYTES WEIGHTS_BYTES JOB.json`
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

from feedback.job import TrainJob
from feedback.train import _write_atomically


class _Model:
    """What `save_pretrained` of a peft model does, minus the tensors: a config and weights."""

    def __init__(self, weights: int) -> None:
        self.weights = weights

    def save_pretrained(self, path: Path, selected_adapters: list[str]) -> None:
        path.mkdir(parents=True)
        (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
        with (path / "adapter_model.safetensors").open("wb") as f:
            for _ in range(self.weights // 65536 + 1):
                f.write(b"\0" * 65536)


def main(argv: list[str]) -> int:
    limit, weights, job_path = int(argv[1]), int(argv[2]), Path(argv[3])
    job = TrainJob.load(job_path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: EFBIG
    report: dict[str, Any] = {"train": {"sft_examples": 1}}
    _write_atomically(_Model(weights), report, Path(job.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
