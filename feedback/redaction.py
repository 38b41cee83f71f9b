"""PII redaction applied to every text before it leaves the database for a dataset.

Offline and deterministic: regular expressions plus checksums (Luhn for cards,
mod 97 and the registry's lengths for IBANs), `phonenumbers` for phone numbers,
`ipaddress` for IPs. Each finding becomes a typed placeholder such as `[EMAIL]`.

Text is normalised first (`normalise`: NFKC, every decimal digit as ASCII, invisible
characters removed where they split what a pattern reads), and the redacted text is
the normalised one, so full-width digits or a zero-width space inside an address
neither hide it nor come back in the output.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import phonenumbers

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties): characters that render as
# nothing (zero-width space and joiners, soft hyphen, BOM, bidi controls, variation selectors).
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]+")
_VARIATION = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]+")
_OTHER_DIGIT = re.compile(r"(?![0-9])\d")

_PEM = re.compile(  # any algorithm; a key pasted without its END line is redacted to its end
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=:,\s-]*)", re.S)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^\s/?#]+(?=@)")  # scheme://user:pass@host
_KEY_VALUE = re.compile(  # password=..., "api_key": "...", PIN: 1234
    r"(?i)(?<![a-z0-9])((?:client[_-]?)?secret|pass(?:word|wd|code)|pwd|pin|api[_-]?key|"
    r"(?:access|auth|refresh)[_-]?token|token)(\"?\s*([:=])\s*)(\"[^\"\n]*\"|'[^'\n]*'|\S+)")
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,}\b")
_SECRETS = [
    re.compile(r"\bxox[abposre]-[A-Za-z0-9-]{10,}"),  # Slack bot / user / app tokens
    re.compile(r"\bxapp-\d-[A-Za-z0-9-]{10,}"),  # Slack app-level tokens
    re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{35}\b"),  # Telegram bot tokens
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),  # OpenAI / Anthropic style keys
    # Stripe-style keys (sk_live_, rk_test_, whsec_...); publishable pk_ keys too: public by
    # design, but a customer's account identifier that no answer needs to repeat
    re.compile(r"\b[a-z]{2,8}_(?:live|test|prod|sandbox)_(?=[A-Za-z]*[0-9])[A-Za-z0-9]{10,}"),
    re.compile(r"\bwhsec_[A-Za-z0-9]{20,}"),
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,}"),  # GitHub fine-grained tokens
    re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),  # GitLab tokens
    re.compile(r"\b(?:hf|npm)_[A-Za-z0-9]{30,}\b"),  # Hugging Face, npm tokens
    re.compile(r"\bSG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}"),  # SendGrid keys
    re.compile(r"\bAIza[A-Za-z0-9_-]{35}\b"),  # Google API keys
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWTs
    re.compile(r"(?<=\bBearer )[A-Za-z0-9._~+/-]{16,}=*"),  # HTTP bearer tokens
]
_IBAN = re.compile(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b", re.I)
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")  # US social security
_NINO = re.compile(  # UK National Insurance number: capitals, or lower case without spaces
    r"\b(?!BG|GB|KN|NK|NT|TN|ZZ|bg|gb|kn|nk|nt|tn|zz)"
    r"(?:[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]"
    r"|[a-ceghj-pr-tw-z][a-ceghj-npr-tw-z]\d{6}[a-d])\b")
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")

# IBAN length per country (SWIFT IBAN registry)
IBAN_LENGTHS = {
    "NO": 15, "BE": 16, "DK": 18, "FI": 18, "FK": 18, "FO": 18, "GL": 18, "NL": 18, "SD": 18,
    "MK": 19, "SI": 19, "AT": 20, "BA": 20, "EE": 20, "KZ": 20, "LT": 20, "LU": 20, "MN": 20,
    "XK": 20, "CH": 21, "HR": 21, "LI": 21, "LV": 21, "BG": 22, "BH": 22, "CR": 22, "DE": 22,
    "GB": 22, "GE": 22, "IE": 22, "ME": 22, "RS": 22, "VA": 22, "AE": 23, "GI": 23, "IL": 23,
    "IQ": 23, "OM": 23, "SO": 23, "TL": 23, "AD": 24, "CZ": 24, "ES": 24, "MD": 24, "PK": 24,
    "RO": 24, "SA": 24, "SE": 24, "SK": 24, "TN": 24, "VG": 24, "LY": 25, "PT": 25, "ST": 25,
    "IS": 26, "TR": 26, "BI": 27, "DJ": 27, "FR": 27, "GR": 27, "IT": 27, "MC": 27, "MR": 27,
    "SM": 27, "AL": 28, "AZ": 28, "BY": 28, "CY": 28, "DO": 28, "GT": 28, "HN": 28, "HU": 28,
    "LB": 28, "NI": 28, "PL": 28, "SV": 28, "BR": 29, "EG": 29, "PS": 29, "QA": 29, "UA": 29,
    "JO": 30, "KW": 30, "MU": 30, "YE": 30, "MT": 31, "SC": 31, "LC": 32, "RU": 33,
}


def normalise(text: str) -> str:
    """NFKC with every decimal digit as ASCII, minus invisible characters that split what a
    pattern reads: a run of them is kept only between two characters no pattern reads
    (neither ASCII nor a digit), as the joiners inside emoji and Indic or Persian words."""
    folded = unicodedata.normalize("NFKC", text)
    folded = _OTHER_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group(0))), folded)

    def strip(m: re.Match[str]) -> str:
        before, after = folded[m.start() - 1 : m.start()], folded[m.end() : m.end() + 1]
        if _VARIATION.fullmatch(m.group(0)) and before and not _readable(before):
            return m.group(0)  # an emoji's presentation selector (❤️) splits nothing
        keep = before and after and not (_readable(before) or _readable(after))
        return m.group(0) if keep else ""

    return unicodedata.normalize("NFKC", _INVISIBLE.sub(strip, folded))


def _readable(ch: str) -> bool:
    return ch.isascii() or ch.isdigit()


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a card number (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    """A valid IBAN (any case, spaces allowed): a registry country, its length, mod 97 == 1,
    and an account part at least half digits (so four-letter words never pass)."""
    s = candidate.replace(" ", "").upper()
    if IBAN_LENGTHS.get(s[:2]) != len(s) or not s.isalnum() or not s.isascii():
        return False
    if not s[2:4].isdigit() or 2 * sum(c.isdigit() for c in s[4:]) < len(s) - 4:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _iban_end(candidate: str) -> int | None:
    """The length of `candidate`'s prefix that is a valid IBAN (the pattern is greedy and may
    have taken a following word), or None."""
    length, seen = IBAN_LENGTHS.get(candidate[:2].upper()), 0
    for i, ch in enumerate(candidate):
        seen += ch != " "
        if seen == length:
            return i + 1 if iban_ok(candidate[: i + 1]) else None
    return None


def _ip_ok(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _phone_keys(entries: Iterable[str], regions: Sequence[str]) -> frozenset[str]:
    """E.164 forms of the entries that are valid phone numbers in one of `regions`."""
    keys = set()
    for entry in entries:
        for region in regions:
            try:
                number = phonenumbers.parse(entry, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(number):
                keys.add(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
    return frozenset(keys)


@dataclass(frozen=True)
class Redactor:
    """Replaces personal data and secrets; `allow` lists strings (or `@domain`s) to keep.

    An allowed phone number is kept in any format ("0800 414 7782" also allows
    "+44 800 414 7782"). `patterns` are extra regular expressions (a name -> pattern
    map) from configuration; they see the normalised text.
    """

    regions: Sequence[str] = ("GB", "US", "DE", "FR")
    patterns: dict[str, str] = field(default_factory=dict)
    allow: frozenset[str] = frozenset()
    _allowed_phones: frozenset[str] = field(init=False, repr=False, compare=False,
                                            default=frozenset())

    def __post_init__(self) -> None:
        allow = frozenset(normalise(a).lower() if a.startswith("@") else normalise(a)
                          for a in self.allow)
        object.__setattr__(self, "allow", allow)
        object.__setattr__(self, "_allowed_phones", _phone_keys(allow, self.regions))

    def __call__(self, text: str) -> str:
        """The normalised text with every finding replaced by its placeholder."""
        text = normalise(text)
        for finder in self._finders():
            text = finder(text)
        return text

    def _finders(self) -> Iterable[Callable[[str], str]]:
        # Order matters: keys and credentials before e-mail (user:pass@host reads as one),
        # IBANs and ID numbers before cards and phones (their digits read as either).
        yield lambda t: self._sub(_PEM, t, "PRIVATE_KEY")
        yield lambda t: self._sub(_URL_CREDENTIALS, t, "SECRET")
        yield self._key_values
        yield lambda t: self._sub(_EMAIL, t, "EMAIL", self._email_allowed)
        for rx in _SECRETS:
            yield lambda t, rx=rx: self._sub(rx, t, "SECRET")
        yield self._ibans
        yield lambda t: self._sub(_SSN, t, "SSN")
        yield lambda t: self._sub(_NINO, t, "NINO")
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

    def _key_values(self, text: str) -> str:
        """`password=...` and quoted values always; after a colon, only a value that looks like
        a secret (four characters or more, a digit or a symbol in them), so "Password: use
        the reset link" and "Passcode: 6 digits" stay."""
        def repl(m: re.Match[str]) -> str:
            key, sep, colon, value = m.group(1), m.group(2), m.group(3) == ":", m.group(4)
            plain = colon and value[0] not in "\"'"
            if (plain and (value.isalpha() or len(value) < 4)) or value.startswith("[") \
                    or value in self.allow:
                return m.group(0)
            quote = value[0] if value[0] in "\"'" else ""
            return f"{key}{sep}{quote}[SECRET]{quote}"

        return _KEY_VALUE.sub(repl, text)

    def _ibans(self, text: str) -> str:
        def repl(m: re.Match[str]) -> str:
            found = m.group(0)
            end = _iban_end(found)
            if end is None or found[:end] in self.allow:
                return found
            return "[IBAN]" + found[end:]

        return _IBAN.sub(repl, text)

    def _phones(self, text: str) -> str:
        spans: list[tuple[int, int]] = []
        for region in self.regions:
            for m in phonenumbers.PhoneNumberMatcher(text, region):
                if not self._phone_allowed(m):
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

    def _phone_allowed(self, m: phonenumbers.PhoneNumberMatch) -> bool:
        e164 = phonenumbers.format_number(m.number, phonenumbers.PhoneNumberFormat.E164)
        return m.raw_string in self.allow or e164 in self._allowed_phones


# ---- the company's voice: a trusted reviewer's answer ----

PLACEHOLDER = re.compile(r"\[[A-Z][A-Z_]{1,20}\]")
# never kept, whoever wrote them: keys and credentials are nobody's voice
_ALWAYS = frozenset({"[PRIVATE_KEY]", "[SECRET]"})


def has_placeholder(text: str) -> bool:
    """Whether a text holds a redaction placeholder (`[PHONE]`, ...): never a training
    target, or the model learns to say it."""
    return PLACEHOLDER.search(text) is not None


def _key(text: str) -> str:
    return re.sub(r"\W+", "", normalise(text)).lower()


def company_voice(redactor: Redactor, text: str, customer: Iterable[str],
                  company: Iterable[str] = ()) -> str:
    """A trusted reviewer's answer, redacted only where it repeats what the customer's side
    (`customer`: the question, the answer corrected, ...) holds and the company's approved
    answers (`company`: those the answer corrected was shown, in the company's voice) do
    not: the company's own support number, address, e-mail and documented IP ranges stay as
    written, a customer's details echoed back do not; keys and credentials never stay."""
    plain, redacted = normalise(text), redactor(text)
    if not has_placeholder(redacted):
        return redacted
    theirs, ours = _key(" ".join(customer)), _key(" ".join(company))
    literals = PLACEHOLDER.split(redacted)
    placed = PLACEHOLDER.findall(redacted)
    # the original of each placeholder: the text between the literal parts around it
    pattern = "(.+?)".join(re.escape(part) for part in literals)
    match = re.fullmatch(pattern, plain, re.DOTALL)
    if match is None:  # not aligned (cannot happen with the finders above): keep redacted
        return redacted
    out = [literals[0]]
    for n, (label, found) in enumerate(zip(placed, match.groups(), strict=True)):
        key = _key(found)
        keep = label not in _ALWAYS and not (key and key in theirs and key not in ours)
        out += [found if keep else label, literals[n + 1]]
    return "".join(out)


class MemoryEntry(Protocol):
    """An answer-memory entry as its voice reads it (storage.memory's rows)."""

    @property
    def question(self) -> str: ...
    @property
    def answer(self) -> str: ...
    @property
    def context(self) -> str | None: ...


def entry_voice(redactor: Redactor, entry: MemoryEntry) -> str:
    """An answer-memory entry's answer in the company's voice, its question and context the
    customer's side."""
    return company_voice(redactor, entry.answer, (entry.question, entry.context or ""))


def served(redactor: Redactor, entry: MemoryEntry) -> str | None:
    """An answer-memory entry's answer as the gateway may send it to anyone: in the company's
    voice; None where that leaves a placeholder (a customer's number the reviewer echoed back,
    a key), since an answer with a hole in it is no approved answer."""
    out = entry_voice(redactor, entry)
    return None if has_placeholder(out) else out
