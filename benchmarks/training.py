"""Training throughput: the product's training run against a naive peft loop, same data.

The synthetic company's first --intents intents make the run's data, as a team's feedback
would: one reviewer correction each (the intent's first phrasing, answered with the
company's answer) for SFT, two votes each for KTO (its second and third phrasings: a 👍 on
the company's answer, a 👎 on another intent's), its fourth phrasing held out for the gate.
The training worker runs on it as the loop runs it (`python -m feedback.train job.json`,
the loop's defaults: noisy copies, KL anchors, KTO), --runs times; with --baseline DIR, a
checkout of older code runs the same job alternately (old, new, old, new...). The naive
loop (rank 16 on q/v, fp32, padded batches of 8, loss on the whole sequence) trains on the
same SFT rows in this process between runs.

tokens/s is the worker's `train.tokens_per_s`: tokens that went through a forward and a
backward pass (SFT batches, KL anchor batches, KTO's trained completions) over the whole
training time, anchors and KTO included. Older code counted SFT tokens only, so old and new
are compared by training seconds on the same job. The gate's figures are reported per run.

    .venv/bin/python benchmarks/training.py [--intents 30] [--runs 3] [--baseline DIR]

The anchors are generated once before the runs (the loop caches them per base model and
system prompt). Prints a table and writes benchmarks/results/training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import MODEL_DIR, median, print_table, write_json  # noqa: E402
from feedback.examples import Example, write_jsonl  # noqa: E402
from feedback.job import TrainJob  # noqa: E402

COMPANY = json.loads((ROOT / "feedback/data/company.json").read_text())
SYSTEM = "You are the customer-service assistant of Bramblewood Outfitters. Answer briefly."


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def write_data(work: Path, intents: list[dict[str, Any]]) -> None:
    sft, kto, heldout = [], [], []
    for i, it in enumerate(intents):
        other = intents[(i + 1) % len(intents)]["answer"]
        sft.append(Example(i, 4 * i, _chat(it["questions"][0]), it["answer"], "correction"))
        kto.append(Example(i, 4 * i + 1, _chat(it["questions"][1]), it["answer"], "vote",
                           label=True))
        kto.append(Example(i, 4 * i + 2, _chat(it["questions"][2]), other, "vote",
                           label=False))
        heldout.append(Example(i, 4 * i + 3, _chat(it["questions"][3]), it["answer"],
                               "correction"))
    for name, rows in (("sft", sft), ("kto", kto), ("heldout", heldout)):
        write_jsonl([asdict(e) for e in rows], work / f"{name}.jsonl")


def warm_anchors(job: TrainJob) -> None:
    """Generate the KL anchors into the runs' shared cache, as an earlier run would have."""
    from feedback.anchors import anchor_examples
    from feedback.train import _model

    model, tokenizer = _model(job)  # the worker's own model: a fresh LoRA on the base
    anchor_examples(model, tokenizer, job)


def run_worker(code: Path, job: TrainJob, run: Path) -> dict[str, Any]:
    """One training run of the worker in `code` (a checkout) on the job's data."""
    run.mkdir(parents=True)
    for name in ("sft", "kto", "heldout"):
        (run / f"{name}.jsonl").write_bytes((run.parent / "data" / f"{name}.jsonl").read_bytes())
    job = replace(job, work_dir=str(run), out_dir=str(run / "adapter"))
    job.save(run / "job.json")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    started = time.perf_counter()
    with (run / "train.log").open("wb") as log:
        rc = subprocess.run([sys.executable, "-m", "feedback.train", str(run / "job.json")],
                            cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"the worker in {code} exited with {rc}: "
                           f"{(run / 'train.log').read_text()[-2000:]}")
    report = json.loads((run / "adapter/report.json").read_text())
    cand, parent = report["candidate"], report["parent"]
    return {"wall_s": time.perf_counter() - started, "train": report["train"],
            "gate": {"f1_before": parent["heldout_f1"], "f1_after": cand["heldout_f1"],
                     "accuracy_after": cand["heldout_accuracy"],
                     "wrong_after": cand["heldout_wrong"],
                     "golden_loss_change": cand["golden_loss"] / parent["golden_loss"] - 1}}


def naive_tokens_per_s(rows: list[dict[str, Any]], *, steps: int) -> float:
    """A plain peft loop (rank 16 on q/v, fp32, loss on the whole sequence, padded batches
    of 8) on the same rows: the baseline the training run is measured against, after one
    warm-up step (the training run's own warm-up counts against it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    texts = [tok.apply_chat_template([*r["prompt"], {"role": "assistant",
                                                     "content": r["completion"]}], tokenize=False)
             for r in rows]
    tokens, started = 0, time.perf_counter()
    for step in range(steps + 1):  # the first step warms up (oneDNN's kernels): not counted
        batch = [texts[(step * 8 + i) % len(texts)] for i in range(8)]
        enc = tok(batch, return_tensors="pt", padding=True)
        loss = model(**enc, labels=enc["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(enc["attention_mask"].sum())
        if step == 0:
            tokens, started = 0, time.perf_counter()
    return tokens / (time.perf_counter() - started)


def main(args: argparse.Namespace) -> dict[str, Any]:
    intents = COMPANY["intents"][: args.intents]
    sides = {"new": ROOT} | ({"old": args.baseline.resolve()} if args.baseline else {})
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    naive: list[float] = []
    with tempfile.TemporaryDirectory(prefix="chatloop-training-") as tmp:
        root = Path(tmp)
        write_data(root / "data", intents)
        job = TrainJob(model_dir=str(MODEL_DIR), out_dir="", work_dir=str(root / "data"),
                       system_prompt=SYSTEM, max_length=128, kto_min_examples=16)
        warm_anchors(job)
        sft_rows = [json.loads(line) for line in (root / "data/sft.jsonl").read_text().splitlines()]
        for i in range(args.runs):
            for side in (list(sides) if i % 2 else list(sides)[::-1]):
                r = run_worker(sides[side], job, root / f"{side}-{i}")
                results[side].append(r)
                t = r["train"]
                print(f"run {i + 1} {side}: {t['train_seconds']:.0f} s training, "
                      f"{t['tokens_per_s']:.0f} tokens/s, gate F1 {r['gate']['f1_before']:.2f}"
                      f" -> {r['gate']['f1_after']:.2f}", file=sys.stderr, flush=True)
            naive.append(naive_tokens_per_s(sft_rows, steps=args.naive_steps))
            print(f"run {i + 1} naive: {naive[-1]:.0f} tokens/s", file=sys.stderr, flush=True)
    summary = {side: summarise(rs) for side, rs in results.items()}
    return {"intents": len(intents), "naive_tokens_per_s": naive,
            "naive_median": median(naive), "summary": summary, "runs": results}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str, part: str = "train") -> float:
        return median([float(r[part].get(key, float("nan"))) for r in runs])

    return {"train_seconds": med("train_seconds"), "tokens_per_s": med("tokens_per_s"),
            "trained_tokens": med("trained_tokens"), "sft_tokens": med("sft_tokens"),
            "gate_f1_after": med("f1_after", "gate"),
            "gate_accuracy": med("accuracy_after", "gate"),
            "golden_loss_change": med("golden_loss_change", "gate")}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--intents", type=int, default=30)
    p.add_argument("--runs", type=int, default=3, help="training runs per code version")
    p.add_argument("--baseline", type=Path, default=None,
                   help="a checkout of older code whose worker runs the same job alternately")
    p.add_argument("--naive-steps", type=int, default=8)
    args = p.parse_args()
    out = main(args)
    rows = [{"code": side, "training s": s["train_seconds"], "tokens/s": s["tokens_per_s"],
             "/ naive": s["tokens_per_s"] / out["naive_median"],
             "gate F1 after": s["gate_f1_after"], "gate right": s["gate_accuracy"],
             "golden loss": f"{s['golden_loss_change']:+.1%}"}
            for side, s in out["summary"].items()]
    rows.append({"code": "naive loop", "training s": float("nan"),
                 "tokens/s": out["naive_median"], "/ naive": 1.0, "gate F1 after": float("nan"),
                 "gate right": float("nan"), "golden loss": "-"})
    print_table(f"training, {out['intents']} corrections + {2 * out['intents']} votes, "
                f"medians of {args.runs} runs", rows)
    write_json("training", out)
