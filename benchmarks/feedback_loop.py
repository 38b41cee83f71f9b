"""Does the learning loop make answers measurably better, and is no correction lost?

Simulated users ask the synthetic company's questions through the conversation core (real
bundled model, embedded engine), in two batches. Batch 1: the first --paraphrases - 1
paraphrases of each intent; the reviewer corrects wrong answers to all but the last of them,
users suggest the company's answer for the last (pending review). The scheduler notices the
threshold and runs a real cycle (TRL on the CPU, gate, parity, canary; promoted). Then the
suggestions are approved (late), batch 2 arrives (the next paraphrase, corrected by the
reviewer), and the threshold job runs cycle 2 from run 1's adapter.

Measured on each intent's last paraphrase, never asked nor trained on: token-F1 against the
company's answer for the base model, after run 1 and after run 2; corrections given vs
trained after the two runs (as the runs recorded them), and those run 2's gate holds out;
per run the gate's figures, golden-set loss change, threshold-to-serving time; training
tokens/s against a naive peft loop on run 2's data.

    .venv/bin/python benchmarks/feedback_loop.py [--intents 15] [--paraphrases 4]

Training hyper-parameters are the loop's defaults (feedback/job.py, TrainJob) unless
--rank/--lr/--epochs/--batch-size/--anchors/--neftune/--augment/--seed override them;
--no-settle ships the gated adapter (the figures before settling was on by default).
Prints a table and writes benchmarks/results/feedback_loop.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from benchmarks.training import naive_tokens_per_s  # noqa: E402
from bots.core import ConversationCore, CoreLimits, InboundMessage  # noqa: E402
from chatloop.app import adapter_source  # noqa: E402
from feedback import review  # noqa: E402
from feedback.dataset import DatasetPolicy  # noqa: E402
from feedback.evaluate import answer_scores, token_f1  # noqa: E402
from feedback.job import PRECISIONS, TrainJob  # noqa: E402
from feedback.loop import LoopConfig  # noqa: E402
from feedback.redaction import Redactor  # noqa: E402
from feedback.scheduler import LearningScheduler, ScheduleConfig  # noqa: E402
from inference.base import ChatMessage, GenerationRequest, TextDelta  # noqa: E402
from inference.embedded import EmbeddedBackend  # noqa: E402
from inference.prompt import PromptFitter  # noqa: E402
from inference.registry import AdapterRegistry  # noqa: E402
from storage import adapters  # noqa: E402
from storage.db import make_engine, session_factory  # noqa: E402
from storage.feedback import eligible_count  # noqa: E402
from storage.migrate import upgrade_async  # noqa: E402
from storage.models import Feedback, FeedbackRole, Message, ReviewStatus, RunFeedback  # noqa: E402

MODEL = ROOT / "var/models/SmolLM2-135M-Instruct"
COMPANY = json.loads((ROOT / "feedback/data/company.json").read_text())
SYSTEM = "You are the customer-service assistant of Bramblewood Outfitters. Answer briefly."
REVIEWER = "bench:agent-1"  # an identity (channel:id), like every voter
ALLOW = frozenset({"0800 414 7782", "@bramblewood.co.uk"})  # the company's own contacts


class Sink:
    async def begin(self) -> None: ...
    async def update(self, text: str) -> None: ...
    async def finish(self, text: str, answer_id: int) -> None: ...
    async def fail(self, text: str) -> None: ...
    async def notice(self, text: str) -> None: ...


async def answer(backend: Any, question: str, adapter: str | None, max_tokens: int) -> str:
    request = GenerationRequest([ChatMessage("system", SYSTEM), ChatMessage("user", question)],
                                max_tokens=max_tokens, adapter=adapter)
    return "".join([e.text async for e in backend.stream(request) if isinstance(e, TextDelta)])


async def unseen_scores(backend: Any, intents: list[dict[str, Any]], adapter: str | None,
                        max_tokens: int) -> dict[str, float]:
    """The answers to each intent's last paraphrase, scored as the gate scores its held-out
    questions: token-F1, share right, share another intent's answer."""
    answers = [await answer(backend, it["questions"][-1], adapter, max_tokens) for it in intents]
    references = [it["answer"] for it in intents]
    return answer_scores(answers, references, references)


class Bench:
    """The company's users, its reviewer, and the loop, on one database."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp, self.n = args, tmp, 0
        self.url = f"sqlite+aiosqlite:///{tmp / 'db.sqlite'}"
        self.intents = COMPANY["intents"][: args.intents]

    async def start(self) -> None:
        await upgrade_async(self.url)
        self.engine = make_engine(self.url)
        self.sessions = session_factory(self.engine)
        self.router = AdapterRegistry(EmbeddedBackend(str(MODEL)),
                                      source=adapter_source(self.sessions),
                                      canary_percent=50, refresh_s=0)
        self.backend = self.router.backend
        self.core = ConversationCore(
            sessions=self.sessions, backend=self.backend, system_prompt=SYSTEM,
            router=self.router, reviewers=frozenset({REVIEWER}),
            fitter=PromptFitter(self.backend.inner.tokenizer, context_tokens=2048,
                                max_tokens=48),
            limits=CoreLimits(max_tokens=self.args.max_tokens, rate_limit_per_minute=10**6))

    async def ask(self, question: str, user: str) -> Any:
        self.n += 1
        msg = InboundMessage(channel="bench", event_id=f"e{self.n}", chat_id=f"c{self.n}",
                             user_id=user, text=question)
        result = await self.core.handle(msg, Sink())  # type: ignore[arg-type]
        assert result.answer_id is not None, result
        return result

    async def batch(self, paraphrase: int, *, by_reviewer: bool) -> int:
        """Users ask each intent's paraphrase; a wrong answer gets its asker's 👎 and the
        company's answer: from the reviewer (trusted), or suggested by the asker (pending)."""
        given = 0
        for it in self.intents:
            user = f"user{self.n + 1}"
            result = await self.ask(it["questions"][paraphrase], user)
            if token_f1(result.text, it["answer"]) < 0.5:
                await self.core.vote(answer_id=result.answer_id, voter_id=f"bench:{user}",
                                     rating=-1, source="bench")
                await self.core.correct(answer_id=result.answer_id, source="bench",
                                        voter_id=REVIEWER if by_reviewer else f"bench:{user}",
                                        text=it["answer"])
                given += 1
        return given

    async def approve_pending(self) -> int:
        async with self.sessions() as s:
            pending = await review.pending(s, limit=10**6)
            for p in pending:
                await review.decide(s, feedback_id=p.feedback_id, approve=True,
                                    actor=REVIEWER)
        return len(pending)

    def loop_config(self, threshold: int) -> LoopConfig:
        a = self.args
        overrides: dict[str, Any] = {k: v for k, v in (
            ("rank", a.rank), ("alpha", a.rank and 2 * a.rank), ("epochs", a.epochs),
            ("batch_size", a.batch_size), ("learning_rate", a.lr), ("anchors", a.anchors),
            ("anchor_batch_size", a.anchor_batch), ("padding_free", a.padding_free or None),
            ("neftune_alpha", a.neftune), ("augment", a.augment), ("precision", a.precision),
            ("seed", a.seed)) if v is not None}
        return LoopConfig(
            model_dir=str(MODEL), adapters_dir=self.tmp / "adapters", runs_dir=self.tmp / "runs",
            min_new_feedback=threshold, min_interval=timedelta(0),
            dataset=DatasetPolicy(heldout_percent=a.heldout_percent, system_prompt=SYSTEM),
            redactor=Redactor(allow=ALLOW),
            train=TrainJob(model_dir=str(MODEL), out_dir="", work_dir="", max_length=128,
                           kto_min_examples=a.kto_min, **overrides),
            settle=a.settle, heartbeat_s=5)

    async def cycle(self, deadline: float) -> dict[str, Any]:
        """Wait for the scheduler's threshold job to run a cycle on what is new now; promote
        the adapter once it has answered a user from the canary slice."""
        async with self.sessions() as s:
            new = await eligible_count(s)
        cfg = self.loop_config(new)  # the threshold is reached now
        reached = time.perf_counter()
        sched = LearningScheduler(
            engine=self.engine, sessions=self.sessions, backend=self.backend,
            adapters=self.router, loop=cfg, database_url=self.url,
            schedule=ScheduleConfig(check_every=timedelta(seconds=2), cron=None,
                                    canary_every=timedelta(hours=1)))
        stop = asyncio.Event()
        runner = asyncio.create_task(sched.run(stop))
        for _ in range(int(deadline - time.monotonic())):
            if sched.results:
                break
            await asyncio.sleep(1)
        stop.set()
        await runner
        if not sched.results:
            raise SystemExit("the run did not finish within --max-minutes")
        c = sched.results[0]
        out: dict[str, Any] = {"new_eligible": new, "run_id": c.run_id, "status": c.status,
                               "adapter": c.adapter, "trained_at_s": time.perf_counter() - reached,
                               "reasons": list(c.reasons), "report": c.metrics or {}}
        if c.status == "succeeded":
            for k in range(1000):  # a new user whose conversation falls in the canary slice
                result = await self.ask(self.intents[0]["questions"][0], f"newcomer{k}")
                async with self.sessions() as s:
                    served = await s.get(Message, result.answer_id)
                if served is not None and served.adapter == c.adapter:
                    break
            out["threshold_to_serving_s"] = time.perf_counter() - reached
            async with self.sessions() as s:
                await adapters.promote(s, name=c.adapter)  # the canary earns it (see tests)
        return out

    async def corrections(self, run_ids: list[int]) -> dict[str, int]:
        """Approved corrections, and what the runs recorded they did with them."""
        async with self.sessions() as s:
            approved = set((await s.execute(select(Feedback.id).where(
                Feedback.review_status == ReviewStatus.APPROVED,
                Feedback.correction.is_not(None)))).scalars())
            roles = (await s.execute(select(RunFeedback.run_id, RunFeedback.feedback_id,
                                            RunFeedback.role))).all()
        trained = {f for r, f, role in roles if role == FeedbackRole.TRAINED and r in run_ids}
        last = {f for r, f, role in roles if role == FeedbackRole.HELDOUT and r == run_ids[-1]}
        return {"approved": len(approved), "trained": len(approved & trained),
                "heldout_by_last_run": len(approved & last - trained),
                "lost": len(approved - trained - last)}

    async def close(self) -> None:
        await self.router.aclose()  # its background refresh uses both below
        await self.backend.aclose()
        await self.engine.dispose()


def run_figures(run: dict[str, Any]) -> dict[str, Any]:
    """A run's gate and training figures from its report."""
    r, data = run["report"], run["report"].get("dataset", {})
    out = {k: run.get(k) for k in ("run_id", "status", "adapter", "reasons", "new_eligible",
                                   "trained_at_s", "threshold_to_serving_s")}
    out.update({k: data.get(k) for k in ("corrections_trained", "corrections_heldout",
                                         "corrections_carried_over", "replay")})
    if "candidate" in r:
        cand, parent, train = r["candidate"], r["parent"], r["train"]
        out.update(
            golden_loss_change=cand["golden_loss"] / parent["golden_loss"] - 1,
            gate_accuracy_before=parent["heldout_accuracy"],
            gate_accuracy_after=cand["heldout_accuracy"], gate_wrong_after=cand["heldout_wrong"],
            gate_f1_before=parent["heldout_f1"], gate_f1_after=cand["heldout_f1"],
            train_seconds=train["train_seconds"], train_examples=train["sft_examples"],
            train_precision=train.get("precision", "fp32"),
            loop_tokens_per_s=train["tokens_per_s"], gate_parity=r.get("parity", {}).get("score"))
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.max_minutes * 60
    if args.paraphrases < 3:
        raise SystemExit("--paraphrases must be at least 3 (two batches, one approved late)")
    bench = Bench(args, Path(tempfile.mkdtemp(prefix="feedback-loop-")))
    if any(len(it["questions"]) <= args.paraphrases for it in bench.intents):
        raise SystemExit("--paraphrases must leave each intent's last paraphrase unasked")
    await bench.start()
    out: dict[str, Any] = {"intents": len(bench.intents),
                           "train_paraphrases_per_intent": args.paraphrases}
    t = time.perf_counter()
    before = await unseen_scores(bench.backend, bench.intents, None, args.max_tokens)
    out.update(f1_before=before["f1"], unseen_accuracy_before=before["accuracy"],
               eval_seconds=time.perf_counter() - t)
    print(f"[{out['eval_seconds']:.0f}s] F1 before: {out['f1_before']:.3f}", file=sys.stderr)

    given = {"batch1_reviewer": 0, "batch1_approved_late": 0, "batch2": 0}
    for p in range(args.paraphrases - 2):
        given["batch1_reviewer"] += await bench.batch(p, by_reviewer=True)
    given["batch1_approved_late"] = await bench.batch(args.paraphrases - 2, by_reviewer=False)
    runs = [await bench.cycle(deadline)]
    print(f"run 1: {runs[0]['status']}", file=sys.stderr)
    out["corrections_after_run1"] = await bench.corrections([runs[0]["run_id"]])
    assert await bench.approve_pending() == given["batch1_approved_late"]
    given["batch2"] = await bench.batch(args.paraphrases - 1, by_reviewer=True)
    runs.append(await bench.cycle(deadline))
    print(f"run 2: {runs[1]['status']}", file=sys.stderr)
    out["corrections_given"] = given
    out["corrections_after_run2"] = await bench.corrections([r["run_id"] for r in runs])
    out["runs"] = [run_figures(r) for r in runs]
    for i, run in enumerate(runs, 1):
        if run["status"] == "succeeded":
            after = await unseen_scores(bench.backend, bench.intents, run["adapter"],
                                        args.max_tokens)
            out.update({f"{k}_after_run{i}": after[k] for k in ("f1", "accuracy", "wrong")})
    last = runs[-1]["run_id"]
    sft_rows = [json.loads(line) for line in
                (bench.tmp / f"runs/run-{last}/sft.jsonl").read_text().splitlines()]
    if sft_rows:
        out["naive_tokens_per_s"] = await asyncio.to_thread(naive_tokens_per_s, sft_rows,
                                                            steps=args.naive_steps)
    await bench.close()
    return out


def table(r: dict[str, Any]) -> str:
    def f(value: Any, fmt: str = "{:.3f}") -> str:
        return fmt.format(value) if isinstance(value, int | float) else str(value or "-")

    runs = r.get("runs", [{}, {}])
    given, c1, c2 = (r.get("corrections_given", {}), r.get("corrections_after_run1", {}),
                     r.get("corrections_after_run2", {}))

    def both(key: str, fmt: str = "{:.3f}") -> str:
        return " / ".join(f(run.get(key), fmt) for run in runs)

    rows = [
        ("runs 1 / 2 (gate)", " / ".join(f"{x.get('status')} {x.get('adapter')}" for x in runs),
         "; ".join(x for run in runs for x in run.get("reasons") or [])),
        ("token-F1 on unseen paraphrases: base model", f(r.get("f1_before")), ""),
        ("token-F1 on unseen paraphrases: after run 1", f(r.get("f1_after_run1")), ""),
        ("token-F1 on unseen paraphrases: after run 2", f(r.get("f1_after_run2")),
         "goal >= after run 1"),
        ("unseen right after run 1 / 2", f"{f(r.get('accuracy_after_run1'), '{:.2f}')}"
         f" / {f(r.get('accuracy_after_run2'), '{:.2f}')}", ""),
        ("corrections given: batch 1 at once + approved late + batch 2",
         f"{given.get('batch1_reviewer')} + {given.get('batch1_approved_late')} + "
         f"{given.get('batch2')}", ""),
        ("corrections trained after run 1 / after run 2",
         f"{c1.get('trained')} / {c2.get('trained')}", f"of {c2.get('approved')} approved"),
        ("  held out by run 2's gate (trained by run 3)", f(c2.get("heldout_by_last_run"), "{}"),
         "drawn only from what is new"),
        ("  neither trained nor held out (lost)", f(c2.get("lost"), "{}"), "goal 0"),
        ("corrections trained / held out / carried over per run",
         " / ".join(f"{run.get('corrections_trained')}-{run.get('corrections_heldout')}-"
                    f"{run.get('corrections_carried_over')}" for run in runs), ""),
        ("new eligible feedback at each threshold", both("new_eligible", "{}"), ""),
        ("golden-set loss change", both("golden_loss_change", "{:+.1%}"), "goal <= +5%"),
        ("gate: held-out accuracy after", both("gate_accuracy_after", "{:.2f}"), "must rise"),
        ("gate: held-out token-F1 before -> after", " / ".join(
            f"{f(x.get('gate_f1_before'), '{:.2f}')}->{f(x.get('gate_f1_after'), '{:.2f}')}"
            for x in runs), "may not fall"),
        ("threshold -> adapter serving a user (s)", both("threshold_to_serving_s", "{:.0f}"),
         "goal < 600"),
        ("training time (s) / SFT examples", " / ".join(
            f"{f(x.get('train_seconds'), '{:.0f}')}s {f(x.get('train_examples'), '{}')}"
            for x in runs), ""),
        ("loop / naive peft loop training tokens/s",
         f"{f(runs[-1].get('loop_tokens_per_s'), '{:.0f}')} / "
         f"{f(r.get('naive_tokens_per_s'), '{:.0f}')}", ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a:<{width}}  {b:>20}  {c}" for a, b, c in rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--intents", type=int, default=15)
    p.add_argument("--paraphrases", type=int, default=4,
                   help="paraphrases per intent that users ask (the last one is never asked)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--anchors", type=int, default=None,
                   help="self-distillation anchor examples per run (loop default if omitted)")
    p.add_argument("--anchor-batch", type=int, default=None,
                   help="KL anchor examples per training step (loop default if omitted)")
    p.add_argument("--padding-free", action="store_true",
                   help="SFT batches as one unpadded sequence (TRL padding_free)")
    p.add_argument("--neftune", type=float, default=None,
                   help="NEFTune noise on the input embeddings while training (alpha)")
    p.add_argument("--augment", type=int, default=None,
                   help="noisy copies of each trained question (word dropout or swap)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16 autocast while training (loop default: auto, where native)")
    p.add_argument("--seed", type=int, default=None, help="training seed (loop default: 0)")
    p.add_argument("--no-settle", dest="settle", action="store_false",
                   help="a passed run ships the gated adapter (its held-out corrections wait "
                        "for the next run), as before settling was on by default")
    p.add_argument("--heldout-percent", type=int, default=20,
                   help="share of conversations held out for the gate (at least one per answer)")
    p.add_argument("--kto-min", type=int, default=10**6, help="KTO only with this many labels")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--naive-steps", type=int, default=4)
    p.add_argument("--max-minutes", type=float, default=60)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/feedback_loop.json")
    args = p.parse_args()
    started = time.perf_counter()
    result = asyncio.run(main(args))
    result["wall_seconds"] = time.perf_counter() - started
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"written to {args.out}")
