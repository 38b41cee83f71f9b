"""PII redaction applied to every text before it leaves the database for a dataset.

Offline and deterministic: regular expressions plus checksums (Luhn for cards,
mod 97 for IBANs), `phonenumbers` for phone numbers, `ipaddress` for IPs.
Each finding becomes a typed placeholder such as `[EMAIL]`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import phonenumbers

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_SECRETS = [
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),  # Slack bot / user / app tokens
    re.compile(r"\bxapp-\d-[A-Za-z0-9-]{10,}"),  # Slack app-level tokens
    re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{35}\b"),  # Telegram bot tokens
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),  # OpenAI / Anthropic style keys
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),  # GitHub tokens
    re.compile(r"\bAIza[A-Za-z0-9_-]{35}\b"),  # Google API keys
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWTs
]
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ip_ok(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Redactor:
    """Replaces personal data and secrets; `allow` lists strings (or `@domain`s) to keep.

    `patterns` are extra regular expressions (a name -> pattern map) from configuration.
    """

    regions: Sequence[str] = ("GB", "US", "DE", "FR")
    patterns: dict[str, str] = field(default_factory=dict)
    allow: frozenset[str] = frozenset()

    def __call__(self, text: str) -> str:
        for finder in self._finders():
            text = finder(text)
        return text

    def _finders(self) -> Iterable[Callable[[str], str]]:
        yield lambda t: self._sub(_EMAIL, t, "EMAIL", self._email_allowed)
        for rx in _SECRETS:
            yield lambda t, rx=rx: self._sub(rx, t, "SECRET")
        yield lambda t: self._sub(_IBAN, t, "IBAN", lambda m: not iban_ok(m))
        yield lambda t: self._sub(_CARD, t, "CARD", lambda m: not luhn_ok(re.sub(r"\D", "", m)))
        yield lambda t: self._sub(_IPV4, t, "IP", lambda m: not _ip_ok(m))
        yield lambda t: self._sub(_IPV6, t, "IP", lambda m: not _ip_ok(m))
        yield self._phones
        for name, pattern in self.patterns.items():
            label = name.upper()
            yield lambda t, rx=re.compile(pattern), n=label: self._sub(rx, t, n)

    def _sub(self, rx: re.Pattern[str], text: str, label: str,
             keep: Callable[[str], bool] = lambda _: False) -> str:
        def repl(m: re.Match[str]) -> str:
            found = m.group(0)
            return found if found in self.allow or keep(found) else f"[{label}]"

        return rx.sub(repl, text)

    def _email_allowed(self, email: str) -> bool:
        return "@" + email.rsplit("@", 1)[1].lower() in self.allow

    def _phones(self, text: str) -> str:
        spans: list[tuple[int, int]] = []
        for region in self.regions:
            for m in phonenumbers.PhoneNumberMatcher(text, region):
                if m.raw_string not in self.allow:
                    spans.append((m.start, m.end))
        merged: list[list[int]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in reversed(merged):
            text = text[:start] + "[PHONE]" + text[end:]
        return text
