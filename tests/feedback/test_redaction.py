"""PII redaction on a corpus: each kind of personal data or secret, and what must stay.

Each corpus case is the text, the exact expected output and, for what used to slip
through, the fragments (`absent`) that must not survive in any form.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feedback.redaction import Redactor, iban_ok, luhn_ok, normalise

CORPUS = json.loads((Path(__file__).parent / "redaction_corpus.json").read_text())
REDACT = Redactor(patterns={"order": r"\bBW-\d{6}\b"},
                  allow=frozenset({"0800 414 7782", "@bramblewood.co.uk"}))


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_corpus(case: dict[str, object]) -> None:
    out = REDACT(str(case["text"]))
    assert out == case["expect"]
    for fragment in case.get("absent", []):  # type: ignore[attr-defined]
        assert fragment not in out and normalise(fragment) not in out


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
    assert iban_ok("de89 3704 0044 0532 0130 00") and iban_ok("DE89370400440532013000")
    assert not iban_ok("DE89 3704 0044 0532 0130 0")  # Germany's IBANs have 22 characters
    assert not iban_ok("XX89 3704 0044 0532 0130 00")  # no such country


def test_normalise_folds_what_hides_digits_and_letters() -> None:
    assert normalise("４１１１\u3000１１１１") == "4111 1111"
    assert normalise("jo\u200bh\u200c\u200dn\u2060@exa\u00admple.com\ufeff") == "john@example.com"
    assert normalise("\u0664\u0661\u0661\u0661 \u096a\u0967") == "4111 41"  # Arabic, Devanagari
    assert normalise("ｂｏｂ＠ｘ．ｏｒｇ") == "bob@x.org"
    text = ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # Persian, a non-joiner
            " \U0001F469\u200d\U0001F4BB \u2764\ufe0f")  # emoji: a joiner, a selector
    assert normalise(text) == text  # joiners and presentation selectors inside words and emoji


def test_the_allow_list_is_normalised() -> None:
    redact = Redactor(allow=frozenset({"０８００ ４１４ ７７８２", "@BrambleWood.co.uk"}))
    kept = "0800 414 7782, care@bramblewood.co.uk"
    assert redact(kept) == kept
    assert redact("+44 20 7946 0958, x@example.com") == "[PHONE], [EMAIL]"


def test_redaction_is_idempotent() -> None:
    once = REDACT(" ".join(str(c["text"]) for c in CORPUS))
    assert REDACT(once) == once


def test_a_planted_text_leaves_nothing_whatever_the_separators() -> None:
    """The same personal data, with each kind of hiding character between its characters."""
    planted = {"jane.doe@example.com": "[EMAIL]", "4111111111111111": "[CARD]",
               "+442079460958": "[PHONE]", "DE89370400440532013000": "[IBAN]"}
    for value, placeholder in planted.items():
        for sep in ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"):
            hidden = sep.join(value)
            assert REDACT(f"see {hidden} now") == f"see {placeholder} now", repr(hidden)
        wide = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in value)
        assert REDACT(f"see {wide} now") == f"see {placeholder} now", wide
