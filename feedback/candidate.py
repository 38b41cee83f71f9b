"""The candidate's evaluation, in the training process: its report for the gate.

Candidate (the trained adapter) vs parent (the serving adapter, or the base model) on the
held-out corrections and the golden set (`feedback.evaluate` has the metrics and the gate),
and the greedy outputs the serving backend must reproduce (parity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from feedback.evaluate import answer_scores, golden_set, greedy, mean_loss, pref_accuracy
from feedback.examples import Example, read_examples
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


def evaluate(model: Any, tokenizer: Any, job: TrainJob) -> dict[str, Any]:
    """Candidate (the trained adapter) vs parent (the serving adapter, or the base model)."""
    model.eval()
    heldout = read_examples(Path(job.work_dir) / "heldout.jsonl")[: job.eval_max_examples]
    system = [{"role": "system", "content": job.system_prompt}] if job.system_prompt else []
    golden = [(system + [{"role": "user", "content": g["question"]}], g["answer"])
              for g in golden_set()]
    known = [e.completion for e in read_examples(Path(job.work_dir) / "sft.jsonl")]

    # Greedy answers stop 16 tokens past the longest reference: room for a right answer, and
    # the base model, which rambles to the limit, spent a third of the evaluation at 96.
    longest = max((len(tokenizer(e.completion)["input_ids"]) for e in heldout), default=0)
    max_tokens = min(job.eval_max_tokens, longest + 16)

    def metrics() -> dict[str, Any]:
        return _metrics(model, tokenizer, heldout, golden, known, max_tokens)

    report: dict[str, Any] = {"heldout_examples": len(heldout), "candidate": metrics()}
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
    report["parity_outputs"] = [
        greedy(model, tokenizer, system + [{"role": "user", "content": p}], job.parity_max_tokens)
        for p in job.parity_prompts]
    return report


def _metrics(model: Any, tokenizer: Any, heldout: list[Example],
             golden: list[tuple[list[dict[str, str]], str]], known: list[str],
             max_tokens: int) -> dict[str, Any]:
    pairs = [(e.prompt, e.completion, e.rejected) for e in heldout if e.rejected]
    answers = [a["text"] for a in greedy_batch(model, tokenizer, [e.prompt for e in heldout],
                                               max_tokens)]
    scores = answer_scores(answers, [e.completion for e in heldout], known)
    return {"heldout_loss": mean_loss(model, tokenizer, [(e.prompt, e.completion)
                                                         for e in heldout]),
            "heldout_f1": scores["f1"], "heldout_accuracy": scores["accuracy"],
            "heldout_wrong": scores["wrong"],
            "heldout_answers": answers[:8],
            "golden_loss": mean_loss(model, tokenizer, golden),
            "pref_accuracy": pref_accuracy(model, tokenizer, pairs)}

