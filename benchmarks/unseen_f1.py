"""Token-F1 of trained adapters on the answer-memory benchmark's unseen phrasings, by how many
of each intent's phrasings the run trained on (0, 1 or 2: the others were held out for the
gate, or dropped).

benchmarks/answer_memory.py keeps its training run's directory (`train.run_dir` in its
JSON); this asks the same 90 unseen phrasings of that run's adapter, or of one trained again
from a copy of the directory with another recipe (`python -m feedback.train JOB.json`),
without the memory, by batched greedy `generate` (fp32, 48 new tokens, the benchmark's
system prompt):

    .venv/bin/python benchmarks/unseen_f1.py RUN_DIR ADAPTER_DIR [RUN_DIR ADAPTER_DIR ...]

Each adapter's "phrasings trained" count its run directory's sft.jsonl corrections and the
held-out ones it was trained on after its gate passed (its report's `settle`). Prints a
table, writes benchmarks/results/unseen_f1.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import MODEL_DIR, RESULTS  # noqa: E402
from benchmarks.answer_memory import COMPANY, SYSTEM  # noqa: E402
from feedback.candidate import greedy_batch  # noqa: E402
from feedback.evaluate import token_f1  # noqa: E402
from feedback.loop import settled_answers  # noqa: E402

INTENTS = COMPANY["intents"][:30]  # the benchmark's default --intents


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def trained_counts(run: Path, adapter: Path) -> collections.Counter[str]:
    """Answer -> how many of its corrections the adapter was trained on: the run's SFT
    corrections and the held-out ones it settled (its report's `settle`)."""
    report = adapter / "report.json"
    settled = settled_answers(json.loads(report.read_text()) if report.exists() else {})
    return collections.Counter(
        [r["completion"] for r in _rows(run / "sft.jsonl") if r["source"] == "correction"]
        + [r["completion"] for r in _rows(run / "heldout.jsonl") if r["answer_id"] in settled])


def answers(adapter: Path, questions: list[str]) -> list[str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
             for q in questions]
    return [r["text"] for r in greedy_batch(model, tok, chats, max_tokens=48)]


def measure(run: Path, adapter: Path) -> dict[str, Any]:
    trained = trained_counts(run, adapter)
    asked = [(it, q) for it in INTENTS for q in it["questions"][2:]]
    scores = [(trained[it["answer"]], token_f1(a, it["answer"]))
              for (it, _), a in zip(asked, answers(adapter, [q for _, q in asked]), strict=True)]
    groups = collections.defaultdict(list)
    for n, f1 in scores:
        groups[n].append(f1)
    return {"adapter": str(adapter), "f1": round(statistics.mean(f for _, f in scores), 3),
            "n": len(scores), "corrections_trained": sum(trained.values()),
            "by_phrasings_trained": {n: {"f1": round(statistics.mean(v), 3), "n": len(v)}
                                     for n, v in sorted(groups.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", type=Path, nargs="+", metavar="RUN_DIR ADAPTER_DIR",
                    help="a training run's directory (its sft.jsonl), then its adapter")
    ap.add_argument("--out", type=Path, default=RESULTS / "unseen_f1.json")
    a = ap.parse_args()
    if len(a.pairs) % 2:
        ap.error("give a run directory and an adapter directory for each adapter")
    runs, adapters = a.pairs[::2], a.pairs[1::2]
    for path in [*(r / "sft.jsonl" for r in runs), *(d / "adapter_config.json" for d in adapters)]:
        if not path.exists():
            ap.error(f"{path} does not exist")
    results = [measure(run, adapter) for run, adapter in zip(runs, adapters, strict=True)]
    print("| adapter | corrections trained | token-F1 (90) | by phrasings trained: F1 (n) |")
    print("|---|---|---|---|")
    for r in results:
        groups = ", ".join(f"{n}: {g['f1']} ({g['n']})"
                           for n, g in r["by_phrasings_trained"].items())
        print(f"| {r['adapter']} | {r['corrections_trained']} | {r['f1']} | {groups} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
