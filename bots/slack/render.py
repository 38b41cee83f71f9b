"""Pure converters from answers to Slack text, blocks and views (no network)."""

from __future__ import annotations

import json
import re
from typing import Any

FEEDBACK_BLOCK = "feedback"
VOTE_UP, VOTE_DOWN, SUGGEST = "vote_up", "vote_down", "suggest"
HUMAN = "handoff_request"  # "Talk to a person" (bots.slack.handoff)
CORRECTION_VIEW = "correction"
CORRECTION_BLOCK, CORRECTION_INPUT = "correction_block", "correction_input"
MESSAGE_CHARS = 3000  # per message: under the 4,000 Slack recommends and a section's 3,000
PLACEHOLDER = "_Thinking…_"
MAX_CORRECTION_CHARS = 3000

_BROADCAST = re.compile(r"@(everyone|here|channel)\b", re.IGNORECASE)
_LINK_SYNTAX = re.compile(r"\]([(\[:])")  # a link's `](url)`, `][ref]`, a definition's `]:`
_ZWSP = "\u200b"


def safe_text(text: str) -> str:
    """Model output made inert for mrkdwn and markdown: no pings, links or unfurls it injects.

    Slack's three control characters are escaped (so `<!channel>`, `<!here>`, `<@U…>` and
    `<url|label>` are shown, not acted on); Markdown's link syntax (`[label](url)`,
    `![alt](url)`, `[label][ref]`, `[ref]: url`) gets a zero-width space after its `]`, so
    the target shows as the text it is; `@everyone` / `@here` / `@channel` get one after the
    `@`. Every change is within a word: streamed prefixes are never taken back.
    """
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _LINK_SYNTAX.sub(lambda m: "]" + _ZWSP + m.group(1), text)
    return _BROADCAST.sub(lambda m: "@" + _ZWSP + m.group(1), text)


def stable_prefix(text: str) -> str:
    """The longest prefix that ends at whitespace: what may be streamed without taking back.

    `safe_text` works word by word, so safe_text(stable_prefix(t)) is a prefix of
    safe_text(t + anything); streamed text is append-only.
    """
    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
    return text[: cut + 1]


def split_text(text: str, limit: int = MESSAGE_CHARS) -> list[str]:
    """Split a long answer into messages of at most `limit` characters, at line or word ends.

    Stable under growth: the parts of a prefix, but its last, are parts of the whole text.
    """
    parts: list[str] = []
    while len(text) > limit:
        head = text[:limit]
        cut = head.rfind("\n")
        if cut < limit // 2:
            cut = head.rfind(" ")
        cut = cut + 1 if cut >= limit // 2 else limit
        parts.append(text[:cut])
        text = text[cut:]
    parts.append(text)
    return parts


def text_block(text: str) -> dict[str, Any]:
    return {"type": "markdown", "text": text}


def feedback_block(answer_id: int, chosen: int | None = None, *,
                   human: bool = False) -> dict[str, Any]:
    """👍 / 👎 / suggest buttons; the recorded vote is shown as the highlighted button.
    `human`: also "Talk to a person" (hand-off)."""

    def button(action: str, label: str, rating: int | None) -> dict[str, Any]:
        b: dict[str, Any] = {"type": "button", "action_id": action, "value": str(answer_id),
                             "text": {"type": "plain_text", "text": label, "emoji": True}}
        if rating is not None and rating == chosen:
            b["style"] = "primary"
        return b

    elements = [button(VOTE_UP, "👍", 1), button(VOTE_DOWN, "👎", -1),
                button(SUGGEST, "Suggest a better answer", None)]
    if human:
        elements.append(button(HUMAN, "Talk to a person", None))
    return {"type": "actions", "block_id": FEEDBACK_BLOCK, "elements": elements}


def revote_blocks(message: dict[str, Any], answer_id: int, rating: int) -> list[dict[str, Any]]:
    """The blocks of an answer message (as Slack sent it back) with the vote shown."""
    blocks = message.get("blocks") or []
    content = [b for b in blocks if b.get("block_id") != FEEDBACK_BLOCK]
    if not content:  # a streamed message keeps its text outside blocks: keep it visible
        content = [text_block(message.get("text") or "")]
    human = any(e.get("action_id") == HUMAN for b in blocks if b.get("block_id") == FEEDBACK_BLOCK
                for e in b.get("elements") or [])
    return [*content, feedback_block(answer_id, rating, human=human)]


def correction_modal(answer_id: int, answer_text: str) -> dict[str, Any]:
    """The "Suggest a better answer" modal; the answer id travels in private_metadata."""
    return {
        "type": "modal", "callback_id": CORRECTION_VIEW,
        "private_metadata": json.dumps({"answer_id": answer_id}),
        "title": {"type": "plain_text", "text": "Suggest an answer"},
        "submit": {"type": "plain_text", "text": "Save"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": "*Answer given:* " + answer_text[:2900]}]},
            {"type": "input", "block_id": CORRECTION_BLOCK,
             "label": {"type": "plain_text", "text": "The answer it should have given"},
             "element": {"type": "plain_text_input", "action_id": CORRECTION_INPUT,
                         "multiline": True, "max_length": MAX_CORRECTION_CHARS}},
        ],
    }
