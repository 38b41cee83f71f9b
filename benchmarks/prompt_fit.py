"""Prompt fitting per turn on conversations of growing length, against counting as before.

    .venv/bin/python benchmarks/prompt_fit.py [--turns 200] [--runs 3]

One conversation at a time grows by an exchange per turn (a question of about 80 bytes, an
answer of about 600: a support answer), and each turn's prompt is fitted with the product's
settings (context 2048 tokens, 256 kept for the answer, the last 20 messages of history, the
bundled SmolLM2 tokenizer) by:

- `PromptFitter`: the byte bound, else one rendering counted in cached pieces between the
  tokenizer's added tokens;
- `before`: the byte bound, else `apply_chat_template(tokenize=True)` on the whole prompt,
  rendered again for the count (the fitter before 2026-12-03), the baseline.

Both must keep the same messages (checked on every turn). Reports the CPU µs a fit takes
(p50, p99) per turn number band, medians over --runs runs alternating the two, and the ratio.
Writes JSON to benchmarks/results/prompt_fit.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import MODEL_DIR, median, pct, print_table, write_json  # noqa: E402
from inference.base import ChatMessage  # noqa: E402
from inference.prompt import PromptFitter  # noqa: E402

ANSWER = ("You can change the delivery address in your account under Orders > Details as long "
          "as the parcel has not left our warehouse; after that, ask the carrier to redirect it "
          "with the tracking number from your confirmation e-mail. Redirecting is free within "
          "the country and costs 4.90 EUR abroad. If the parcel is already on its way and the "
          "carrier cannot redirect it, refuse the delivery: it comes back to us and we refund "
          "the order within five working days, shipping included. ")
BANDS = ((1, 2), (3, 5), (6, 10), (11, 10**9))  # turn numbers: bytes bound holds at first


class Before(PromptFitter):
    """The fitter as it was: a prompt over the byte bound counted by transformers' own
    `apply_chat_template(tokenize=True)` (a second rendering, the whole text tokenized)."""

    def count(self, messages: Sequence[ChatMessage]) -> int:
        return self._template_tokens(messages)

    def fits(self, messages: Sequence[ChatMessage]) -> bool:
        if self.bytes_bound_tokens and len(self.render(messages).encode()) <= self.budget:
            return True
        return self.count(messages) <= self.budget


def conversation(fitter: PromptFitter, turns: int, seed: int) -> list[float]:
    """CPU µs of each turn's fit, one conversation growing by an exchange a turn."""
    history: list[ChatMessage] = []
    times = []
    for turn in range(turns):
        question = f"Conversation {seed}, turn {turn}: and what if I moved again last week?"
        started = time.thread_time()
        fitter.fit("You are the support assistant of Example Ltd. Answer briefly.",
                   history[-20:], question)
        times.append((time.thread_time() - started) * 1e6)
        history += [ChatMessage("user", question),
                    ChatMessage("assistant", f"{ANSWER} (reference {seed}-{turn})")]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    kinds = {"PromptFitter": PromptFitter, "before": Before}
    runs: dict[str, list[list[float]]] = {k: [] for k in kinds}
    for kind in kinds.values():  # warm-up: the template's compilation, the tokenizer's caches
        conversation(kind(tokenizer, context_tokens=2048, max_tokens=256), 12, seed=-1)
    for run in range(args.runs):
        for name in list(kinds) if run % 2 == 0 else list(kinds)[::-1]:
            fitter = kinds[name](tokenizer, context_tokens=2048, max_tokens=256)
            runs[name].append(conversation(fitter, args.turns, seed=run))
    check_new = PromptFitter(tokenizer, context_tokens=2048, max_tokens=256)
    check_old = Before(tokenizer, context_tokens=2048, max_tokens=256)
    history: list[ChatMessage] = []
    for turn in range(40):  # both keep the same messages
        q = f"turn {turn}?"
        assert check_new.fit("Be brief.", history[-20:], q) == check_old.fit(
            "Be brief.", history[-20:], q)
        history += [ChatMessage("user", q), ChatMessage("assistant", f"{ANSWER} {turn}")]

    rows: list[dict[str, Any]] = []
    for lo, hi in BANDS:
        band = f"turns {lo}-{hi}" if hi < 10**9 else f"turns {lo}+"
        out: dict[str, Any] = {"turns": band}
        for name in kinds:
            p50s = [median(r[lo - 1:hi]) for r in runs[name]]
            p99s = [pct(r[lo - 1:hi], 99) for r in runs[name]]
            out[f"{name} p50 µs"] = round(median(p50s))
            out[f"{name} p99 µs"] = round(median(p99s))
        out["before / now (p50)"] = round(out["before p50 µs"] / out["PromptFitter p50 µs"], 1)
        rows.append(out)
    print_table(f"prompt fitting, CPU µs per turn (median of {args.runs} runs, "
                f"{args.turns} turns each)", rows)
    write_json("prompt_fit", {"turns": args.turns, "runs": args.runs, "rows": rows})


if __name__ == "__main__":
    main()
