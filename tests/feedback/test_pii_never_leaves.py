"""Black box: personal data typed into chat never reaches a file the learning loop writes.

A planted corpus (each item as a user might type it: full-width digits, zero-width
characters, lower-case IBANs, keys pasted whole) goes through the conversation core
with an echoing scripted backend, so it sits in questions, earlier turns, answers,
corrections (trusted, and untrusted then approved) and voted answers. Then one real
loop cycle (stand-in trainer) writes its run directory and `chatloop feedback export`
writes the export; no file under them may hold any planted item, in its typed form,
its normalised form or its bare characters. SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from feedback import review
from feedback.loop import run_cycle
from feedback.redaction import normalise
from tests.conftest import ROOT
from tests.fakes.inference import ScriptedBackend
from tests.feedback.conftest import REVIEWER, Asker, loop_config, make_core

RSA_KEY = ("-----BEGIN RSA PRIVATE KEY-----\n"
           "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
           "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
           "-----END RSA PRIVATE KEY-----")

# as typed -> fragments that must not survive either (beyond the typed and normalised forms)
PLANTED: dict[str, list[str]] = {
    "jane.doe\u200b@example.com": ["jane.doe", "janedoe@", "doe@example.com"],
    "４１１１ １１１１ １１１１ １１１１": ["4111 1111", "4111111111111111"],
    "+44 20 7946 0958": ["7946 0958", "79460958"],
    "＋１ ４１５ ５５５ ２６７１": ["555 2671", "4155552671"],
    "de89 3704 0044 0532 0130 00": ["370400440532013000", "3704 0044"],
    "GB82\u00adWEST\u00ad1234\u00ad5698\u00ad7654\u00ad32": ["WEST12345698", "5698765432"],
    RSA_KEY: ["MIIEowIBAAKCAQEAu1SU1LfVLPHC", "VTLw7onLRnrq0"],
    "postgres://admin:Hunter2Secret@db.internal/app": ["Hunter2Secret", "admin:"],
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc": ["4eC39HqLyjWDarjtT1zdp7dc"],
    "203.0.113.77": ["203.0.113.77"],
    "078-05-1120": ["078-05-1120", "078051120"],
    "AKIAIOSFODNN7EXAMPLE": ["IOSFODNN7EXAMPLE"],
}
PLACEHOLDERS = {"[EMAIL]", "[CARD]", "[PHONE]", "[IBAN]", "[PRIVATE_KEY]", "[SECRET]", "[IP]",
                "[SSN]"}


def _squeeze(text: str) -> str:
    """Letters and digits only, lower case: separators cannot hide a planted item."""
    return re.sub(r"[\W_]+", "", normalise(text)).lower()


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _readable_text(path: Path) -> str:
    """A file's text, plus every string inside it if it is JSON or JSONL (escapes decoded)."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    decoded = []
    for chunk in [text, *text.splitlines()]:
        try:
            decoded += _strings(json.loads(chunk))
        except ValueError:
            continue
    return "\n".join([text, *decoded])


def _leaks(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        text = _readable_text(path)
        squeezed = _squeeze(text)
        for typed, fragments in PLANTED.items():
            for needle in {typed, normalise(typed), *fragments}:
                if needle in text or normalise(needle) in text:
                    found.append(f"{path.name}: {needle!r}")
                elif len(_squeeze(needle)) >= 8 and _squeeze(needle) in squeezed:
                    found.append(f"{path.name}: {needle!r} (without separators)")
    return found


async def _plant(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Every planted item in a question, an earlier turn, an echoed answer, a correction
    (trusted, or untrusted and approved) and in answers voted up and down by two users."""
    core = make_core(sessions, tokenizer, backend=ScriptedBackend())  # answers echo the question
    users = Asker(core)
    pending = []
    for i, item in enumerate(PLANTED):
        chat = f"pii{i}"
        await users.ask(f"Hello, my details: {item}", chat=chat, user="test:alice")
        answer = await users.ask(f"Is {item} right? Question {i}.", chat=chat, user="test:alice")
        if i % 2:
            await core.correct(answer_id=answer, voter_id="test:bob",
                               text=f"We have {item} on file, case {i}.", source="test")
            pending.append(f"We have {normalise(item)} on file, case {i}.")
        else:
            await core.correct(answer_id=answer, voter_id=REVIEWER,
                               text=f"Noted {item}; reply {i}.", source="test")
        voted = await users.ask(f"Please update {item}, request {i}.", user="test:carol")
        for voter in ("test:dave", "test:erin"):
            await core.vote(answer_id=voted, voter_id=voter, rating=1 if i % 3 else -1,
                            source="test")
    for i in range(4):  # clean corrections: the run trains (a placeholder is never a target)
        answer = await users.ask(f"When do you open? Question {i}.", chat=f"clean{i}",
                                 user="test:frank")
        await core.correct(answer_id=answer, voter_id=REVIEWER,
                           text=f"We open at nine, reply {i}.", source="test")
    async with sessions() as s:
        for p in await review.pending(s):
            await review.decide(s, feedback_id=p.feedback_id, approve=True)
        assert await review.pending(s) == []


async def test_planted_personal_data_never_reaches_the_runs_directory_or_an_export(
        sessions, db_url, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    await _plant(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir, fake="pass 0")
    result = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="manual")
    assert result.status == "succeeded", result.reasons
    export = tmp_path / "export" / "dataset.jsonl"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chatloop.cli", "feedback", "export", "--out", str(export)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CHATLOOP_DATABASE_URL": db_url})
    assert done.returncode == 0, done.stderr
    files = sorted(p for root in (cfg.runs_dir, cfg.adapters_dir, export.parent)
                   for p in root.rglob("*") if p.is_file())
    datasets = [p for p in files if p.suffix == ".jsonl"]
    assert {p.name for p in datasets} >= {"sft.jsonl", "kto.jsonl", "heldout.jsonl",
                                          "dataset.jsonl"}
    written = "\n".join(p.read_text(encoding="utf-8") for p in datasets)
    # the planted texts did reach the files, redacted: every kind left its placeholder
    assert {p for p in PLACEHOLDERS if p in written} == PLACEHOLDERS
    assert len(export.read_text().splitlines()) >= len(PLANTED)
    assert _leaks(files) == []
