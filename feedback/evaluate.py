"""The evaluation gate: a candidate adapter must beat the serving one and not regress.

The metrics (computed with peft in the training process) are losses on the
completion tokens of held-out corrections and of the shipped golden regression
set, preference accuracy (mean log-prob of the correction above the answer it
replaced), and two measured on the model's own greedy answers to the held-out
questions: token-F1 against the corrected answer, answer accuracy (the answer
is nearer to its own reference than to any other answer the run knows), and
the share of wrong answers (another question's answer, reproduced).
Teacher-forced loss alone cannot tell a model that learned the right answers
from one that learned the company's answers attached to the wrong questions
(once the first tokens of any memorised answer are given, the rest is cheap);
the greedy answers can. `gate` decides from the stored report alone; `parity`
compares the inference backend's greedy output with peft's.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class GatePolicy:
    min_heldout: int = 1  # no held-out evidence, no promotion
    min_improvement: float = 0.0  # relative held-out loss improvement required (> this)
    golden_margin: float = 0.05  # golden-set loss may rise by at most 5 %
    pref_tolerance: float = 0.0  # preference accuracy may drop by at most this
    f1_tolerance: float = 0.0  # held-out answer token-F1 may drop by at most this
    parity_min: float = 0.9  # mean prefix agreement between backend and peft outputs
    # with fewer held-out corrections than `min_heldout` (every answer corrected once), judge
    # on rephrasings of the trained questions (feedback.examples.rephrasings); else skip
    rephrasings: bool = True
    # no held-out correction at all (a deployment without reviewers): judge on held-out votes
    # when there are this many, both liked and disliked; the log-probability margin of liked
    # over disliked answers must rise by more than `vote_margin_min` (nats per token), by
    # `vote_z` standard errors (one-sided 95 %: shuffled votes do not pass by chance)
    min_heldout_votes: int = 4
    vote_margin_min: float = 0.0
    vote_z: float = 1.645


def golden_set() -> list[dict[str, str]]:
    text = resources.files("feedback.data").joinpath("golden.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def gate(report: dict[str, Any], policy: GatePolicy) -> list[str]:
    """The reasons to reject the candidate described by `report`; empty means it passes."""
    cand, base = report["candidate"], report["parent"]
    reasons = []
    by_votes = (report["heldout_examples"] < policy.min_heldout
                and report.get("heldout_votes", 0) >= policy.min_heldout_votes)
    if by_votes:  # votes only: the liked answers must gain on the disliked ones
        gain, z = vote_gain(report)
        if not (gain > policy.vote_margin_min and z >= policy.vote_z):
            reasons.append(f"held-out vote margin {cand['vote_margin']:.4f} against "
                           f"{base['vote_margin']:.4f}: a gain of {gain:.4f} (z {z:.2f}; "
                           f"needs > {policy.vote_margin_min} and z >= {policy.vote_z})")
    elif report["heldout_examples"] < policy.min_heldout:
        reasons.append(f"only {report['heldout_examples']} held-out examples "
                       f"(need {policy.min_heldout})")
    elif report["heldout_examples"]:  # none allowed (min_heldout 0): the golden set alone
        if not cand["heldout_loss"] < base["heldout_loss"] * (1 - policy.min_improvement):
            reasons.append(f"held-out loss {cand['heldout_loss']:.4f} does not beat "
                           f"{base['heldout_loss']:.4f}")
        # Accuracy must rise (or stay perfect): an adapter that answers unseen paraphrases with
        # the wrong company answer scores below a base model that answers vaguely.
        if not (cand["heldout_accuracy"] > base["heldout_accuracy"]
                or cand["heldout_accuracy"] == base["heldout_accuracy"] == 1.0):
            reasons.append(f"held-out answer accuracy {cand['heldout_accuracy']:.3f} does not "
                           f"beat {base['heldout_accuracy']:.3f}")
        if cand["heldout_wrong"] and cand["heldout_wrong"] >= cand["heldout_accuracy"]:
            reasons.append(f"{cand['heldout_wrong']:.0%} of held-out questions get another "
                           f"question's answer, {cand['heldout_accuracy']:.0%} their own")
        if cand["heldout_f1"] < base["heldout_f1"] - policy.f1_tolerance:
            reasons.append(f"held-out answer token-F1 fell from {base['heldout_f1']:.3f} to "
                           f"{cand['heldout_f1']:.3f}")
    if cand["golden_loss"] > base["golden_loss"] * (1 + policy.golden_margin):
        reasons.append(f"golden-set loss rose from {base['golden_loss']:.4f} to "
                       f"{cand['golden_loss']:.4f} (margin {policy.golden_margin:.0%})")
    if cand.get("pair_accuracy") is not None and base.get("pair_accuracy") is not None and not (
            cand["pair_accuracy"] > base["pair_accuracy"]
            or cand["pair_accuracy"] == base["pair_accuracy"] == 1.0):
        reasons.append(f"held-out hand-off pairs: the candidate prefers the agent's answer "
                       f"{cand['pair_accuracy']:.3f} of the time, the serving model "
                       f"{base['pair_accuracy']:.3f}")
    if cand.get("pref_accuracy") is not None and base.get("pref_accuracy") is not None:
        if cand["pref_accuracy"] < base["pref_accuracy"] - policy.pref_tolerance:
            reasons.append(f"preference accuracy fell from {base['pref_accuracy']:.3f} to "
                           f"{cand['pref_accuracy']:.3f}")
    return reasons


def _tokens(text: str) -> list[str]:
    return re.sub(r"\b(a|an|the)\b", " ", re.sub(r"[^\w\s]", " ", text.lower())).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 (lower-cased, punctuation and articles removed)."""
    p, r = _tokens(prediction), _tokens(reference)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def answer_scores(answers: Sequence[str], references: Sequence[str],
                  known: Sequence[str]) -> dict[str, float]:
    """How the greedy answers to held-out questions compare with their references.

    `f1`: mean token-F1 against the reference. `accuracy`: share nearer to their own reference
    than to any other answer the run knows (`known` plus the references). `wrong`: share that
    reproduce another question's answer (token-F1 >= 0.5 with it, and nearer to it than to
    their own): confidently wrong, unlike a vague answer.
    """
    if not answers:
        return {"f1": 0.0, "accuracy": 0.0, "wrong": 0.0}
    others = sorted(set(known) | set(references))
    f1s, right, wrong = [], 0, 0
    for answer, reference in zip(answers, references, strict=True):
        own = token_f1(answer, reference)
        best_other = max((token_f1(answer, o) for o in others if o != reference), default=0.0)
        f1s.append(own)
        right += own > 0 and best_other < own
        wrong += best_other >= 0.5 and best_other > own
    n = len(answers)
    return {"f1": sum(f1s) / n, "accuracy": right / n, "wrong": wrong / n}


def prefix_agreement(a: str, b: str) -> float:
    """How much of two greedy outputs agree, from the start (1.0 = identical)."""
    a, b = a.strip(), b.strip()
    if not a and not b:
        return 1.0
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b))


def parity(backend_outputs: Sequence[str], peft_outputs: Sequence[str]) -> float:
    scores = [prefix_agreement(a, b) for a, b in zip(backend_outputs, peft_outputs, strict=True)]
    return sum(scores) / len(scores) if scores else 1.0


# ---- metrics with a loaded model (training process only: imports torch) ----

Chat = list[dict[str, str]]


def completion_batches(tokenizer: Any, items: Sequence[tuple[Chat, str]],
                       size: int) -> list[dict[str, Any]]:
    """(prompt, completion) pairs as right-padded batches of at most `size`, as even as the
    count allows (17 in fives: 4, 4, 4, 5, never a lone one), rows of similar length together
    to pad little. `mask` marks the positions that predict the completion's tokens as the
    chat template renders them (TRL's completion mask: the answer, the end of turn and the
    template's newline); `rows` gives each row's index in `items`."""
    import torch

    rows = []
    for index, (prompt, completion) in enumerate(items):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": completion}], tokenize=True,
            return_dict=True)["input_ids"]
        rows.append((list(full), len(prompt_ids), index))
    rows.sort(key=lambda row: len(row[0]))
    if not rows:  # nothing to score (a votes-only run has no held-out corrections)
        return []
    count = -(-len(rows) // size)
    bounds = [len(rows) * i // count for i in range(count + 1)]
    batches = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        chunk = rows[lo:hi]
        width = max(len(ids) for ids, _, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for j, (row, start, _) in enumerate(chunk):
            ids[j, :len(row)] = torch.tensor(row)
            attn[j, :len(row)] = 1
            mask[j, start - 1:len(row) - 1] = True
        batches.append({"input_ids": ids, "attention_mask": attn, "mask": mask,
                        "rows": [index for _, _, index in chunk]})
    return batches


def answer_logprobs(model: Any, batch: dict[str, Any]) -> Any:
    """Log-probabilities over the vocabulary at the positions `batch["mask"]` marks, in
    order. The LM head runs on those positions only: on a small model it is a fifth of a
    token's compute, and much of a batch is prompt or padding."""
    import torch

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
    logits = causal_lm.get_output_embeddings()(hidden[batch["mask"]])
    return torch.log_softmax(logits.float(), dim=-1)


def completion_logps(model: Any, tokenizer: Any, items: Sequence[tuple[Chat, str]],
                     batch_size: int = 8) -> list[tuple[float, int]]:
    """For each (prompt, completion): the sum of its completion tokens' log-probs, and their
    count."""
    import torch

    out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    for batch in completion_batches(tokenizer, items, batch_size):
        with torch.inference_mode():
            logps = answer_logprobs(model, batch)
        targets = batch["input_ids"].roll(-1, dims=1)[batch["mask"]]  # what each position predicts
        token_logps = logps.gather(1, targets[:, None])[:, 0]
        per_row = torch.split(token_logps, batch["mask"].sum(1).tolist())
        for index, row in zip(batch["rows"], per_row, strict=True):
            out[index] = (float(row.sum()), int(row.numel()))
    return out


def mean_loss(model: Any, tokenizer: Any, items: Sequence[tuple[Chat, str]]) -> float | None:
    """Token-weighted mean NLL of completions given prompts; None for no items."""
    scores = completion_logps(model, tokenizer, items)
    count = sum(n for _, n in scores)
    return -sum(lp for lp, _ in scores) / count if count else None


def pref_wins(model: Any, tokenizer: Any, pairs: Sequence[tuple[Chat, str, str]]) -> list[bool]:
    """Per (prompt, chosen, rejected): whether chosen has the higher mean token log-prob."""
    scores = completion_logps(model, tokenizer, [(p, c) for p, c, _ in pairs]
                              + [(p, r) for p, _, r in pairs])
    chosen, rejected = scores[:len(pairs)], scores[len(pairs):]
    return [c / max(nc, 1) > r / max(nr, 1)
            for (c, nc), (r, nr) in zip(chosen, rejected, strict=True)]


def share(wins: Sequence[bool]) -> float | None:
    """The share of wins (None: nothing to judge)."""
    return sum(wins) / len(wins) if wins else None



def answer_logps(model: Any, tokenizer: Any, items: Sequence[tuple[Chat, str]]) -> list[float]:
    """Each (prompt, answer)'s mean token log-prob."""
    return [lp / max(n, 1) for lp, n in completion_logps(model, tokenizer, items)]


def vote_margin(logps: Sequence[float], liked: Sequence[bool]) -> float | None:
    """Mean log-prob of the liked answers minus that of the disliked ones; None without both."""
    up = [lp for lp, v in zip(logps, liked, strict=True) if v]
    down = [lp for lp, v in zip(logps, liked, strict=True) if not v]
    return sum(up) / len(up) - sum(down) / len(down) if up and down else None


def vote_gain(report: dict[str, Any]) -> tuple[float, float]:
    """How much the candidate raised the held-out liked answers over the disliked ones: the
    change of the vote margin from the parent's, and its Welch z (per answer, the change of
    its log-prob; liked against disliked), so a rise by chance (shuffled votes) is no rise."""
    liked = report["heldout_vote_labels"]
    delta = [c - p for c, p in zip(report["candidate"]["vote_logps"],
                                   report["parent"]["vote_logps"], strict=True)]
    up = [d for d, v in zip(delta, liked, strict=True) if v]
    down = [d for d, v in zip(delta, liked, strict=True) if not v]
    if not up or not down:
        return 0.0, 0.0
    gain = sum(up) / len(up) - sum(down) / len(down)

    def var(xs: list[float]) -> float:
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)

    se = (var(up) / len(up) + var(down) / len(down)) ** 0.5
    return gain, gain / se if se > 0 else (float("inf") if gain > 0 else 0.0)


def greedy(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_tokens: int) -> str:
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_tokens, do_sample=False, top_p=None, top_k=None,
                             temperature=None, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
