"""Splitting long answers and rendering model Markdown as Telegram HTML (pure functions)."""

from __future__ import annotations

import pytest

from bots.telegram.render import is_plain, split_text, to_html, utf16_len
from tests.fakes.telegram_api import ApiError, parse_html


def test_a_5000_character_answer_splits_at_a_paragraph() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 150 for i in range(7)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    assert 5000 < len(text) < 8192
    parts = split_text(text)
    assert len(parts) == 2 and "".join(parts) == text
    assert all(utf16_len(p) <= 4096 for p in parts)
    assert parts[0].endswith(".\n\n") or parts[0].endswith("word\n\n")
    assert parts[1].startswith("Paragraph ")


def test_without_paragraphs_it_splits_after_a_sentence() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(300))
    parts = split_text(text, limit=1000)
    assert "".join(parts) == text
    assert all(len(p) <= 1000 and p.endswith(". ") for p in parts[:-1])


def test_lengths_are_counted_in_utf16_units() -> None:
    text = "😀" * 3000  # 6000 UTF-16 units
    parts = split_text(text)
    assert "".join(parts) == text
    assert [utf16_len(p) for p in parts] == [4096, 6000 - 4096]


def test_short_text_is_one_part() -> None:
    assert split_text("hi") == ["hi"]


def test_model_markdown_becomes_html_that_telegram_accepts() -> None:
    text = "Use **x < y && y > z** or `a<b>` here:\n```python\nif a < b:\n    print('&')\n```"
    html = to_html(text)
    shown, entities = parse_html(html)
    assert shown == "Use x < y && y > z or a<b> here:\nif a < b:\n    print('&')\n"
    assert [e["type"] for e in entities] == ["bold", "code", "pre"]


@pytest.mark.parametrize("text", [
    "a <b>bold</b> tag written by the model", "unbalanced **bold", "stray ` tick", "x & y; <<>>",
    '<a href="https://evil.example">click</a>', "**`code in bold`**",
])
def test_any_model_text_renders_to_valid_html(text: str) -> None:
    shown, entities = parse_html(to_html(text))
    assert all(e["type"] != "text_link" for e in entities)  # the model cannot make links
    assert shown.replace("*", "").replace("`", "") == text.replace("*", "").replace("`", "")


def test_plain_text_needs_no_parse_mode() -> None:
    assert is_plain("Nothing special: 3 < 4 & 5 > 2.")
    assert not is_plain("Some **bold** words")


def test_the_fake_rejects_html_telegram_rejects() -> None:
    for bad in ("<b>unclosed", "<foo>x</foo>", "1 < 2"):
        with pytest.raises(ApiError, match="can't parse entities"):
            parse_html(bad)
