"""Disk full while the trainer writes its adapter: the run fails cleanly, nothing partial is
left where the registry looks, and serving is untouched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from feedback.job import TrainJob
from feedback.loop import run_cycle
from storage import adapters
from tests.fakes.inference import ScriptedBackend
from tests.faults.conftest import Tally
from tests.feedback.conftest import loop_config
from tests.feedback.conftest import tokenizer as tokenizer  # noqa: F401  (the fixture)
from tests.feedback.test_loop import corrected, runs

pytestmark = [pytest.mark.faults]

LIMIT = 256 * 1024  # bytes a file may have; the adapter's weights need 1 MiB


async def test_a_full_disk_while_writing_the_adapter_fails_the_run_cleanly(  # type: ignore[no-untyped-def]
        sessions, tokenizer, tmp_path, model_dir, tally: Tally) -> None:
    await corrected(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir)
    cfg.train_command = [sys.executable, "-m", "tests.faults.disk_full_trainer", str(LIMIT),
                         str(1024 * 1024)]
    backend = ScriptedBackend(adapters={"fb-live"})  # what is being served
    tally.inject(f"the trainer's files limited to {LIMIT} bytes (EFBIG, as on a full disk)")
    result = await run_cycle(sessions, backend, cfg, trigger="manual")
    [run] = await runs(sessions)
    async with sessions() as s:
        versions = await adapters.all_versions(s)
    left = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    tally.count(status=result.status, versions=len(versions), adapters_dir=left,
                served=sorted(backend.adapters))
    assert result.status == "failed" and run.status == "failed"
    assert "File too large" in (run.error or "")
    assert versions == [] and left == []  # no partial adapter, no temporary copy
    assert backend.adapters == {"fb-live"}


@pytest.mark.parametrize("limit", [LIMIT, 64 * 1024 * 1024])
def test_the_trainer_removes_its_partial_adapter_itself(tmp_path, limit: int) -> None:  # type: ignore[no-untyped-def]
    """Without the loop's clean-up: a failed write leaves nothing; one that fits is whole."""
    out = tmp_path / "adapters" / "fb-v9"
    out.parent.mkdir()
    job = TrainJob(model_dir="unused", out_dir=str(out), work_dir=str(tmp_path)).save(
        tmp_path / "job.json")
    done = subprocess.run([sys.executable, "-m", "tests.faults.disk_full_trainer", str(limit),
                           str(1024 * 1024), str(job)], capture_output=True, text=True,
                          timeout=120)
    left = sorted(p.name for p in out.parent.iterdir())
    print(f"\n[fault] file size limit {limit}: exit {done.returncode}, adapters dir {left}")
    if limit == LIMIT:
        assert done.returncode != 0 and "File too large" in done.stderr and left == []
    else:
        assert done.returncode == 0 and left == ["fb-v9"]
        assert sorted(p.name for p in out.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "report.json"]
