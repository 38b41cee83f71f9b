"""The candidate's evaluation, in the training process: its report for the gate.

Candidate (the trained adapter) vs parent (the serving adapter, or the base model) on the
held-out corrections and the golden set (`feedback.evaluate` has the metrics and the gate),
and the greedy outputs the serving backend must reproduce (parity). Held-out answers are
also scored with the answer memory (`_memory_metrics`): what the adapter adds on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from feedback.evaluate import (
    answer_logps,
    answer_scores,
    golden_set,
    greedy,
    mean_loss,
    pref_wins,
    share,
    vote_margin,
)
from feedback.examples import Example, read_examples, referenced
from feedback.job import TrainJob


def greedy_batch(model: Any, tokenizer: Any, chats: list[list[dict[str, str]]],
                 max_tokens: int, batch: int = 16) -> list[dict[str, Any]]:
    """Greedy answers, left-padded batches; `finished` says whether the model stopped itself."""
    import torch

    out: list[dict[str, Any]] = []
    eos = tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    training = model.training
    model.eval()
    try:
        for i in range(0, len(chats), batch):
            texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                     for c in chats[i:i + batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                     top_p=None, top_k=None, temperature=None,
                                     pad_token_id=eos)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                finished = eos in row
                row = row[:row.index(eos)] if finished else row
                out.append({"text": tokenizer.decode(row, skip_special_tokens=True).strip(),
                            "finished": finished})
    finally:
        tokenizer.padding_side = side
        model.train(training)
    return out


def evaluate(model: Any, tokenizer: Any, job: TrainJob,
             memory: tuple[Any, float, float] | None = None) -> dict[str, Any]:
    """Candidate (the trained adapter) vs parent (the serving adapter, or the base model);
    `memory`: the run's `memory_index` if the caller has it."""
    model.eval()
    heldout = read_examples(Path(job.work_dir) / "heldout.jsonl")[: job.eval_max_examples]
    golden = golden_items(job)
    known = [e.completion for e in read_examples(Path(job.work_dir) / "sft.jsonl")]

    # Greedy answers stop 16 tokens past the longest reference: room for a right answer, and
    # the base model, which rambles to the limit, spent a third of the evaluation at 96.
    longest = max((len(tokenizer(e.completion)["input_ids"]) for e in heldout), default=0)
    max_tokens = min(job.eval_max_tokens, longest + 16)

    # held-out votes (held-out hand-off pairs, the agent's reply over the bot's: _metrics)
    votes = read_examples(Path(job.work_dir) / "heldout_votes.jsonl")[: job.eval_max_examples]
    liked = [bool(e.label) for e in votes]
    recall = _memory(job, heldout, memory)

    def metrics() -> dict[str, Any]:
        logps = answer_logps(model, tokenizer, [(e.prompt, e.completion) for e in votes])
        return {**_metrics(model, tokenizer, heldout, golden, known, max_tokens),
                **_memory_metrics(model, tokenizer, heldout, known, max_tokens, recall),
                "vote_logps": logps, "vote_margin": vote_margin(logps, liked)}

    report: dict[str, Any] = {"heldout_examples": len(heldout), "candidate": metrics(),
                              "heldout_pairs": sum(e.source == "handoff" and bool(e.rejected)
                                                   for e in heldout),
                              "heldout_vote_labels": liked,
                              "heldout_votes": len(votes) if len(set(liked)) == 2 else 0}
    if job.parent_path:
        model.load_adapter(job.parent_path, adapter_name="parent")
        model.set_adapter("parent")
        report["parent"] = metrics()
        model.set_adapter("default")
        model.delete_adapter("parent")
    else:
        with model.disable_adapter():
            report["parent"] = metrics()
    report["parity_prompts"] = job.parity_prompts
    report["parity_outputs"] = parity_outputs(model, tokenizer, job)
    return report


def golden_items(job: TrainJob) -> list[tuple[list[dict[str, str]], str]]:
    """The golden set as (chat, answer) pairs under the job's system prompt."""
    system = [{"role": "system", "content": job.system_prompt}] if job.system_prompt else []
    return [(system + [{"role": "user", "content": g["question"]}], g["answer"])
            for g in golden_set()]


def parity_outputs(model: Any, tokenizer: Any, job: TrainJob) -> list[str]:
    """Greedy answers to the parity prompts, which the serving backend must reproduce."""
    system = [{"role": "system", "content": job.system_prompt}] if job.system_prompt else []
    return [greedy(model, tokenizer, system + [{"role": "user", "content": p}],
                   job.parity_max_tokens) for p in job.parity_prompts]


def _metrics(model: Any, tokenizer: Any, heldout: list[Example],
             golden: list[tuple[list[dict[str, str]], str]], known: list[str],
             max_tokens: int) -> dict[str, Any]:
    with_rejected = [e for e in heldout if e.rejected]
    wins = pref_wins(model, tokenizer, [(e.prompt, e.completion, e.rejected)
                                        for e in with_rejected]) if with_rejected else []
    answers = [a["text"] for a in greedy_batch(model, tokenizer, [e.prompt for e in heldout],
                                               max_tokens)]
    scores = answer_scores(answers, [e.completion for e in heldout], known)
    return {"heldout_loss": mean_loss(model, tokenizer, [(e.prompt, e.completion)
                                                         for e in heldout]),
            "heldout_f1": scores["f1"], "heldout_accuracy": scores["accuracy"],
            "heldout_wrong": scores["wrong"],
            "heldout_answers": answers[:8],
            "golden_loss": mean_loss(model, tokenizer, golden),
            "pref_accuracy": share(wins),
            # hand-off pairs alone (the agent's reply over the bot's)
            "pair_accuracy": share([w for w, e in zip(wins, with_rejected, strict=True)
                                    if e.source == "handoff"])}



def _memory(job: TrainJob, heldout: list[Example],
            found: tuple[Any, float, float] | None = None) -> Any:
    """The answer memory as it stood for this run, without the held-out corrections (they are
    what it must answer), searched with the gateway's thresholds: its `recall`, or None
    (`memory_index`; `found`: one already built without them)."""
    from functools import partial

    if not heldout:
        return None
    found = found or memory_index(job, leave_out={_question(e.prompt) for e in heldout})
    if found is None:
        return None
    index, answer_at, refer_at = found
    return partial(index.recall, answer_at=answer_at, refer_at=refer_at)


def run_memory(job: TrainJob, *, copies: bool) -> tuple[Any, float, float] | None:
    """The run's answer memory without its held-out questions (`memory_index`), for the
    gate's with-memory figures and, with `copies`, the training copies' quotes; None when
    neither needs it (no held-out corrections, no copies): nothing is embedded then."""
    heldout = read_examples(Path(job.work_dir) / "heldout.jsonl")
    if not heldout and not copies:
        return None
    return memory_index(job, leave_out={_question(e.prompt) for e in heldout})


def memory_index(job: TrainJob, *, leave_out: set[str]) -> tuple[Any, float, float] | None:
    """The answer memory of this run (`_memory_docs`) less the entries whose question is in
    `leave_out`, indexed with the gateway's embedder (`job.memory_embedder`), with its
    (answer, reference) thresholds. None if there is none or no embedder."""
    from inference.memory import HybridIndex, load_embedder, thresholds

    if not job.memory_embedder:
        return None
    docs = [d for d in _memory_docs(job) if d.question not in leave_out]
    if not docs:
        return None
    try:
        index = HybridIndex(load_embedder(job.memory_embedder))
        index.upsert(docs)
        answer_at, refer_at = thresholds(job.memory_embedder, job.memory_answer_at,
                                         job.memory_refer_at)
    except Exception as exc:  # a report without the memory figures, never a failed run
        print(f"no answer-memory figures: {exc}", flush=True)
        return None
    return index, answer_at, refer_at


def whole_memory(job: TrainJob, memory: tuple[Any, float, float] | None
                 ) -> tuple[Any, float, float] | None:
    """The run's whole answer memory: `memory` (the gate's, without the held-out questions;
    `run_memory`) with the entries it left out added in place (the gate's figures are taken
    by then), so that only those are embedded again; built anew when there is none."""
    if memory is None:
        return memory_index(job, leave_out=set())
    index = memory[0]
    index.upsert([d for d in _memory_docs(job) if d.id not in index])
    return memory


def _memory_docs(job: TrainJob) -> list[Any]:
    """The run's memory entries: `memory.jsonl` in the run's directory (question and answer),
    if the loop wrote one, else the trained corrections; an entry's id is its line."""
    import json

    from inference.memory import Doc

    work = Path(job.work_dir)
    path = work / "memory.jsonl"
    if path.exists():
        pairs = [(r["question"], r["answer"]) for r in
                 map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r]
    else:
        pairs = [(_question(e.prompt), e.completion)
                 for e in read_examples(work / "sft.jsonl") if e.source == "correction"]
    return [Doc(i, q, a) for i, (q, a) in enumerate(pairs) if q and a]


def _question(prompt: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _memory_metrics(model: Any, tokenizer: Any, heldout: list[Example], known: list[str],
                    max_tokens: int, memory: Any) -> dict[str, Any]:
    """Held-out answers as the turn path gives them with the memory: an entry's answer as it
    is above the answer threshold, else the model with the entries it quotes in the prompt."""
    if memory is None:
        return {}
    picks = [memory(_question(e.prompt)) for e in heldout]
    answers = [r.verbatim.answer if r.verbatim else "" for r in picks]
    todo = [i for i, r in enumerate(picks) if r.verbatim is None]
    chats = [referenced(heldout[i].prompt, [(r.question, r.answer) for r in picks[i].references])
             for i in todo]
    for i, a in zip(todo, greedy_batch(model, tokenizer, chats, max_tokens), strict=True):
        answers[i] = a["text"]
    scores = answer_scores(answers, [e.completion for e in heldout], known)
    return {"heldout_f1_memory": scores["f1"], "heldout_accuracy_memory": scores["accuracy"],
            "heldout_memory_verbatim": len(heldout) - len(todo)}
