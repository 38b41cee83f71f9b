"""PII redaction on a corpus: each kind of personal data or secret, and what must stay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feedback.redaction import Redactor, iban_ok, luhn_ok

CORPUS = json.loads((Path(__file__).parent / "redaction_corpus.json").read_text())
REDACT = Redactor(patterns={"order": r"\bBW-\d{6}\b"},
                  allow=frozenset({"0800 414 7782", "@bramblewood.co.uk"}))


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_corpus(case: dict[str, str]) -> None:
    assert REDACT(case["text"]) == case["expect"]


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")


def test_redaction_is_idempotent() -> None:
    once = REDACT(" ".join(c["text"] for c in CORPUS))
    assert REDACT(once) == once
