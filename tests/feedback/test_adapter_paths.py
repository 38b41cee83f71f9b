"""Adapter paths and names read from the database or the settings never reach outside the
adapters directory: not into the backend, not into training, not into `rmtree`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from chatloop.app import adapter_registry
from chatloop.settings import Settings
from feedback.loop import LoopConfig, run_cycle
from inference.adapters import inside
from inference.errors import AdapterRejected
from storage import adapters
from storage.models import AdapterStatus, RunStatus
from tests.fakes.inference import ScriptedBackend
from tests.feedback.conftest import REVIEWER, Asker, loop_config, make_core


def test_inside_accepts_only_paths_within_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    (root / "fb-v1").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path)
    assert inside(root / "fb-v1", root) == (root / "fb-v1").resolve()
    assert inside("fb-v2", root) == (root / "fb-v2").resolve()  # relative: from the directory
    for bad in (tmp_path / "elsewhere", root / ".." / "elsewhere", "../x", "/etc",
                root / "escape" / "x", root, "."):
        with pytest.raises(AdapterRejected):
            inside(bad, root)


@pytest.mark.parametrize("prefix", ["../x", "a/b", "", ".hidden", "x" * 33, "fb\x00"])
def test_the_adapter_name_prefix_is_one_safe_path_segment(prefix: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Settings.from_env_names(learn_adapter_prefix=prefix)
    with pytest.raises(ValueError):
        LoopConfig(model_dir="m", adapters_dir=tmp_path, runs_dir=tmp_path,
                   adapter_prefix=prefix)
    assert Settings.from_env_names(learn_adapter_prefix="team_a-fb").learn.adapter_prefix


async def _register(sessions, name: str, path: str, status: AdapterStatus) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        s.add(adapters.new_version(name=name, path=path, rank=8, parent_name=None, run_id=None,
                                   dataset_hash="h", metrics={}, status=status))
        await s.commit()


async def test_the_gateway_loads_no_adapter_from_outside_its_directory(  # type: ignore[no-untyped-def]
        sessions, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    await _register(sessions, "fb-v1", str(tmp_path / "planted"), AdapterStatus.ACTIVE)
    await _register(sessions, "fb-v2", str(root / ".." / "planted"), AdapterStatus.CANARY)
    backend = ScriptedBackend()
    settings = Settings.from_env_names(adapters_dir=str(root))
    registry = adapter_registry(settings, sessions, backend)
    report = await registry.sync()
    assert sorted(report.refused) == ["fb-v1", "fb-v2"] and report.loaded == []
    assert backend.adapters == set()  # the backend was never asked


async def test_training_never_continues_from_a_parent_outside_the_directory(  # type: ignore[no-untyped-def]
        sessions, tokenizer, tmp_path: Path, model_dir: Path) -> None:
    core = make_core(sessions, tokenizer)
    for question in ("How long does delivery take?", "When will my parcel come?"):
        answer = await Asker(core).ask(question)
        await core.correct(answer_id=answer, voter_id=REVIEWER, text="3 days.", source="test")
    await _register(sessions, "fb-v9", "/etc", AdapterStatus.ACTIVE)
    cfg = loop_config(tmp_path, model_dir, fake="pass 0")
    result = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="test")
    assert result.status == RunStatus.FAILED
    assert "outside the adapters directory" in result.reasons[0]
    assert not (tmp_path / "runs" / f"run-{result.run_id}" / "train.log").exists()
