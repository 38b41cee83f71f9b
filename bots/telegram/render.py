"""Model output -> Telegram text: split at natural boundaries, render Markdown to safe HTML.

Pure functions. Lengths are counted in UTF-16 code units, as Telegram counts them.
"""

from __future__ import annotations

import html
import re

MAX_CHARS = 4096
_SEPARATORS = ("\n\n", "\n", ". ", "! ", "? ", "; ", ", ", " ")
_FENCE = re.compile(r"```[\w+-]*\n?(.*?)```", re.DOTALL)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(?=\S)([^*\n]+?)(?<=\S)\*\*")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def split_text(text: str, limit: int = MAX_CHARS) -> list[str]:
    """Cut `text` into pieces of at most `limit` units whose concatenation is exactly `text`.

    A cut goes after a paragraph break if one lies in the second half of the window, else
    after a line break, a sentence end, a clause, a space, and only then mid-word.
    """
    parts: list[str] = []
    rest = text
    while utf16_len(rest) > limit:
        window = _fit(rest, limit)
        cut = _cut_point(rest[:window])
        parts.append(rest[:cut])
        rest = rest[cut:]
    parts.append(rest)
    return parts


def _fit(text: str, limit: int) -> int:
    """The longest prefix length (in code points) that fits in `limit` UTF-16 units."""
    k = min(len(text), limit)
    while (excess := utf16_len(text[:k]) - limit) > 0:
        k -= max(1, excess // 2)
    return k


def _cut_point(window: str) -> int:
    floor = len(window) // 2
    for sep in _SEPARATORS:
        at = window.rfind(sep, floor)
        if at != -1:
            return at + len(sep)
    return len(window)


def to_html(text: str) -> str:
    """Telegram HTML for model Markdown: code fences, `code` and **bold**; all else escaped."""
    out: list[str] = []
    pos = 0
    for block in _FENCE.finditer(text):
        out.append(_inline(text[pos:block.start()]))
        out.append(f"<pre>{_escape(block.group(1))}</pre>")
        pos = block.end()
    out.append(_inline(text[pos:]))
    return "".join(out)


def is_plain(text: str) -> bool:
    """True when rendering adds no formatting, so the plain text shows exactly the same."""
    return to_html(text) == _escape(text)


def _inline(text: str) -> str:
    out: list[str] = []
    pos = 0
    for code in _INLINE_CODE.finditer(text):
        out.append(_BOLD.sub(r"<b>\1</b>", _escape(text[pos:code.start()])))
        out.append(f"<code>{_escape(code.group(1))}</code>")
        pos = code.end()
    out.append(_BOLD.sub(r"<b>\1</b>", _escape(text[pos:])))
    return "".join(out)


def _escape(text: str) -> str:
    return html.escape(text, quote=False)
