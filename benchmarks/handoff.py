"""Human hand-off: what the relay costs, and what the bot learns from the people who answer.

Relay (`--part relay`): a user in Telegram asks for a person, an agent takes over in the
agents' forum group, and --messages user messages are relayed into the topic and as many
agent messages back to the user, through the real aiogram client and the fake Bot API
(tests/fakes/telegram_api.py, SQLite). Added latency: from the platform update being queued
to the relayed message arriving at the other side, against the same-run baseline of a bot
answer's round trip (a scripted backend, no model); CPU per relayed message of the one
process that runs the gateway, the fake Bot API and SQLite (an upper bound for the gateway).

Learning (`--part learn`): the synthetic company set (feedback/data/company.json), the
first --intents intents. The bot's answers are the base model's greedy answers; an agent
answered --train questions of each intent with the company's answer after a hand-off (the
preference pair: chosen the agent's, rejected the bot's), the other questions are unseen.
The training worker (`python -m feedback.train`, the loop's defaults) runs on the loop's
files twice: SFT (+ KTO) only (no DPO step), and with the DPO step; both evaluated on
held-out pairs from the unseen questions (pairwise accuracy: the model prefers the agent's
answer; before = the base model) and token-F1 of the greedy answers to the unseen
questions. Then votes only: the bot gave the company's answer (👍) or its own (👎) to each
question, no corrections; the same worker and the gate (feedback.evaluate.gate) judged on
held-out votes, once with the votes as given and once with the labels shuffled.

    .venv/bin/python benchmarks/handoff.py [--part all|relay|learn] [--intents 6] [--train 3]
                                           [--anchors 48] [--augment 2] [--messages 100]
                                           [--dpo-sft-weight 1.0]

Prints tables and writes benchmarks/results/handoff.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import MODEL_DIR, median, pct, print_table, write_json  # noqa: E402
from feedback.evaluate import GatePolicy, gate, vote_gain  # noqa: E402
from feedback.examples import Example, write_jsonl  # noqa: E402
from feedback.job import TrainJob  # noqa: E402

COMPANY = json.loads((ROOT / "feedback/data/company.json").read_text())
SYSTEM = "You are the customer-service assistant of Bramblewood Outfitters. Answer briefly."


# ---- learning ----

def base_answers(questions: list[str], max_tokens: int = 48) -> dict[str, str]:
    """The bot's answers: the base model's greedy ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from feedback.candidate import greedy_batch

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
             for q in questions]
    return {q: a["text"] for q, a in zip(questions, greedy_batch(model, tok, chats, max_tokens),
                                         strict=True)}


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def train_run(work: Path, name: str, files: dict[str, list[Example]], **job: Any
              ) -> dict[str, Any]:
    """The training worker on the loop's files (sft, kto, dpo, heldout, heldout_votes)."""
    run = work / name
    run.mkdir(parents=True)
    for kind in ("sft", "kto", "dpo", "heldout", "heldout_votes"):
        write_jsonl([asdict(e) for e in files.get(kind, [])], run / f"{kind}.jsonl")
    spec = TrainJob(model_dir=str(MODEL_DIR), out_dir=str(work / f"adapter-{name}"),
                    work_dir=str(run), system_prompt=SYSTEM, **job)
    spec.save(run / "job.json")
    started = time.perf_counter()
    with (run / "train.log").open("wb") as log:
        subprocess.run([sys.executable, "-m", "feedback.train", str(run / "job.json")],
                       cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    report = dict(json.loads((Path(spec.out_dir) / "report.json").read_text()))
    report["wall_s"] = time.perf_counter() - started
    return report


def learn(args: argparse.Namespace) -> dict[str, Any]:
    intents = COMPANY["intents"][: args.intents]
    questions = [q for i in intents for q in i["questions"]]
    print(f"base answers to {len(questions)} questions ...", flush=True)
    bot = base_answers(questions)
    sft, kto, dpo, heldout = [], [], [], []
    n = 0
    for intent in intents:
        for k, q in enumerate(intent["questions"]):
            n += 1
            ex = Example(n, n, chat(q), intent["answer"], "correction", rejected=bot[q])
            if k < args.train:  # an agent's reply after a hand-off: the loop's examples
                sft.append(ex)
                dpo.append(replace(ex, source="handoff"))
                kto += [replace(ex, label=True, rejected=None),
                        Example(n, n, ex.prompt, bot[q], "correction", label=False)]
            else:
                heldout.append(replace(ex, source="handoff"))
    job = dict(seed=args.seed, dpo_epochs=args.dpo_epochs, dpo_learning_rate=args.dpo_lr,
               dpo_sft_weight=args.dpo_sft_weight, anchors=args.anchors, augment=args.augment)
    out: dict[str, Any] = {"intents": len(intents), "train_pairs": len(dpo),
                           "heldout_pairs": len(heldout), "job": job}
    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as tmp:
        work = Path(tmp)
        runs = {}
        for name, pairs in (("sft_only", []), ("sft_dpo", dpo)):
            print(f"training {name} ...", flush=True)
            runs[name] = train_run(work, name, {"sft": sft, "kto": kto, "dpo": pairs,
                                                "heldout": heldout}, **job)
        out["dpo"] = {name: {"pair_accuracy_before": r["parent"]["pair_accuracy"],
                             "pair_accuracy_after": r["candidate"]["pair_accuracy"],
                             "heldout_f1_before": r["parent"]["heldout_f1"],
                             "heldout_f1_after": r["candidate"]["heldout_f1"],
                             "golden_loss_before": r["parent"]["golden_loss"],
                             "golden_loss_after": r["candidate"]["golden_loss"],
                             "dpo_loss": r["train"].get("dpo_loss"),
                             "gate": gate(r, GatePolicy()), "train_s": r["wall_s"]}
                      for name, r in runs.items()}
        out["votes"] = votes_only(work, intents, bot, args, job)
    return out


def votes_only(work: Path, intents: list[dict[str, Any]], bot: dict[str, str],
               args: argparse.Namespace, job: dict[str, Any]) -> dict[str, Any]:
    """Votes alone: 👍 on the company's answer, 👎 on the bot's own, per question; the
    questions past --train are held out (their votes are the gate's)."""
    votes: list[tuple[bool, Example]] = []  # (held out?, vote)
    n = 0
    for intent in intents:
        for k, q in enumerate(intent["questions"]):
            for liked, answer in ((True, intent["answer"]), (False, bot[q])):
                n += 1
                votes.append((k >= args.train, Example(n, n, chat(q), answer, "vote",
                                                       label=liked)))
    labels = [e.label for _, e in votes]
    shuffled = labels[:]
    random.Random(args.seed).shuffle(shuffled)
    out = {}
    for name, given in (("consistent", labels), ("shuffled", shuffled)):
        data: dict[str, list[Example]] = {"sft": [], "kto": [], "heldout_votes": []}
        for (held, e), liked in zip(votes, given, strict=True):
            e = replace(e, label=liked)
            if held:
                data["heldout_votes"].append(e)
                continue
            data["kto"].append(e)
            if liked:  # the loop trains on liked answers too (include_liked)
                data["sft"].append(replace(e, source="liked", label=None))
        print(f"training votes {name} ...", flush=True)
        r = train_run(work, f"votes_{name}", data, **job)
        gain, z = vote_gain(r)
        out[name] = {"heldout_votes": r["heldout_votes"],
                     "margin_before": r["parent"]["vote_margin"],
                     "margin_after": r["candidate"]["vote_margin"], "gain": gain, "z": z,
                     "golden_loss_before": r["parent"]["golden_loss"],
                     "golden_loss_after": r["candidate"]["golden_loss"],
                     "gate": gate(r, GatePolicy()), "train_s": r["wall_s"]}
    return out


def learn_tables(r: dict[str, Any]) -> None:
    print_table(f"DPO on hand-off pairs ({r['intents']} intents, {r['train_pairs']} trained "
                f"pairs, {r['heldout_pairs']} held-out pairs)", [
        {"run": name, "pair acc before": d["pair_accuracy_before"],
         "pair acc after": d["pair_accuracy_after"],
         "unseen F1 before": d["heldout_f1_before"], "unseen F1 after": d["heldout_f1_after"],
         "golden loss": f"{d['golden_loss_before']:.3f} -> {d['golden_loss_after']:.3f}",
         "gate": "pass" if not d["gate"] else "reject", "train s": d["train_s"]}
        for name, d in r["dpo"].items()])
    print_table("Votes only, judged on held-out votes", [
        {"votes": name, "held-out votes": d["heldout_votes"],
         "margin before": d["margin_before"], "margin after": d["margin_after"],
         "gain": d["gain"], "z": d["z"],
         "golden loss": f"{d['golden_loss_before']:.3f} -> {d['golden_loss_after']:.3f}",
         "gate": "pass" if not d["gate"] else "reject", "train s": d["train_s"]}
        for name, d in r["votes"].items()])


# ---- relay ----

AGENTS = -1009000000001
AGENT = {"id": 77, "is_bot": False, "first_name": "Maya"}


async def relay(messages: int) -> dict[str, Any]:
    """Relay latency and gateway CPU through the fake Bot API (see the module docstring)."""
    from benchmarks._common import fresh_database

    async with fresh_database("sqlite", "bench_handoff") as url:
        return await _relay_on(url, messages)


async def _relay_on(url: str, messages: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bots.core import ConversationCore, CoreLimits
    from bots.core.handoff import HandoffPolicy
    from bots.telegram import TelegramChannel, TelegramOptions, make_bot
    from bots.telegram.outbound import RetryPolicy
    from inference.prompt import PromptFitter
    from storage.db import make_engine, session_factory
    from tests.fakes.inference import ScriptedBackend
    from tests.fakes.servers import serve_app
    from tests.fakes.telegram_api import TOKEN, FakeTelegram

    engine = make_engine(url)
    sessions = session_factory(engine)
    core = ConversationCore(
        sessions=sessions, backend=ScriptedBackend(answer=lambda r: "We open at nine."),
        fitter=PromptFitter(AutoTokenizer.from_pretrained(MODEL_DIR), context_tokens=2048,
                            max_tokens=64),
        system_prompt="Be brief.", limits=CoreLimits(max_tokens=64, rate_limit_per_minute=10**6),
        reviewers=frozenset({"telegram:77"}),
        handoff=HandoffPolicy(channels=frozenset({"telegram"})))
    fake = FakeTelegram()
    fake.group(AGENTS, forum=True)

    def sent_at(text: str, after: float) -> float | None:
        for call in reversed(fake.calls):
            if call.at < after:
                break
            if call.method.lower() == "sendmessage" and call.params.get("text") == text:
                return float(call.at)
        return None

    async def until(text: str, after: float, within: float = 30.0) -> float:
        deadline = time.perf_counter() + within
        while (at := sent_at(text, after)) is None:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{text!r} never arrived")
            await asyncio.sleep(0.001)
        return at

    async with serve_app(fake.app()) as base:
        channel = TelegramChannel(
            core=core, bot=make_bot(TOKEN, api_base=base),
            options=TelegramOptions(draft_interval_s=0.05, edit_interval_s=0.05,
                                    preview_after_s=10.0, poll_timeout_s=1, settle_s=0.0,
                                    drain_s=2.0, agents_chat=AGENTS, handoff_sweep_s=5.0),
            retry=RetryPolicy(backoff_s=0.05, max_backoff_s=0.2))
        await channel.start()
        try:
            chat = fake.private(42, "Ann")
            baseline = []
            for i in range(min(messages, 50)):  # same run: a bot answer's round trip
                start = time.perf_counter()
                fake.say(chat, f"question {i}")
                await until("We open at nine.", start)
                baseline.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            fake.say(chat, "/human")
            for _ in range(6000):  # the topic, with the conversation so far posted in it
                if fake.topics.get(AGENTS) and fake.sent(AGENTS, list(fake.topics[AGENTS])[0]):
                    break
                await asyncio.sleep(0.005)
            [thread] = list(fake.topics[AGENTS])
            fake.say(fake.chats[AGENTS], "Hello, I am here.", user=AGENT, thread=thread)
            await until("Maya: Hello, I am here.", start)
            inbound, outbound = [], []
            cpu = time.process_time()
            wall = time.perf_counter()
            for i in range(messages):
                start = time.perf_counter()
                fake.say(chat, f"user message {i}")
                inbound.append((await until(f"User: user message {i}", start) - start) * 1000)
                start = time.perf_counter()
                fake.say(fake.chats[AGENTS], f"agent message {i}", user=AGENT, thread=thread)
                outbound.append((await until(f"Maya: agent message {i}", start) - start)
                                * 1000)
            cpu = time.process_time() - cpu
            wall = time.perf_counter() - wall
        finally:
            await channel.stop()
            fake.release_pollers()
    await engine.dispose()
    both = inbound + outbound
    return {"messages_each_way": messages,
            "user_to_agents_ms": {"p50": median(inbound), "p99": pct(inbound, 99)},
            "agent_to_user_ms": {"p50": median(outbound), "p99": pct(outbound, 99)},
            "relay_ms": {"p50": median(both), "p99": pct(both, 99)},
            "baseline_bot_answer_ms": {"p50": median(baseline), "p99": pct(baseline, 99)},
            "cpu_ms_per_relayed_message": cpu * 1000 / len(both),
            "relayed_per_s": len(both) / wall}


def relay_table(r: dict[str, Any]) -> None:
    rows = [{"path": name, "p50 ms": r[key]["p50"], "p99 ms": r[key]["p99"]}
            for name, key in (("user -> agents' topic", "user_to_agents_ms"),
                              ("agent -> user", "agent_to_user_ms"),
                              ("relay, both ways", "relay_ms"),
                              ("baseline: bot answer (instant model)",
                               "baseline_bot_answer_ms"))]
    print_table(f"Hand-off relay through the fake Bot API ({r['messages_each_way']} messages "
                f"each way, one at a time)", rows)
    print(f"CPU per relayed message (gateway + fake + SQLite, one process): "
          f"{r['cpu_ms_per_relayed_message']:.2f} ms; {r['relayed_per_s']:.1f} relayed/s "
          f"sequentially")


# ---- entry ----

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["all", "relay", "learn"], default="all")
    ap.add_argument("--intents", type=int, default=6)
    ap.add_argument("--train", type=int, default=3, help="questions per intent trained on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dpo-epochs", type=float, default=TrainJob.dpo_epochs)
    ap.add_argument("--dpo-lr", type=float, default=TrainJob.dpo_learning_rate)
    ap.add_argument("--dpo-sft-weight", type=float, default=TrainJob.dpo_sft_weight,
                    help="weight of the agent's answer's NLL beside the DPO loss (0: DPO alone)")
    ap.add_argument("--anchors", type=int, default=TrainJob.anchors,
                    help="KL anchors (0: none; quicker on a loaded machine)")
    ap.add_argument("--augment", type=int, default=TrainJob.augment)
    ap.add_argument("--messages", type=int, default=100, help="relayed messages each way")
    args = ap.parse_args()
    result: dict[str, Any] = {}
    if args.part in ("all", "relay"):
        result["relay"] = asyncio.run(relay(args.messages))
        relay_table(result["relay"])
    if args.part in ("all", "learn"):
        result["learn"] = learn(args)
        learn_tables(result["learn"])
    write_json("handoff" if args.part == "all" else f"handoff_{args.part}", result)


if __name__ == "__main__":
    main()
