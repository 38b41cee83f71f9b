"""The Slack adapter's pure converters: payloads in, text and blocks out (no network)."""

from __future__ import annotations

from bots.slack import convert, render
from tests.slack.conftest import payload


def test_mention_becomes_a_message_in_the_mention_thread() -> None:
    found = convert.inbound(payload("app_mention"), bot_user_id="U0BOT")
    assert found is not None and found.kind == convert.Kind.MENTION
    msg = found.message
    assert (msg.channel, msg.event_id, msg.chat_id, msg.user_id, msg.text) == \
        ("slack", "Ev0001", "C111", "T111/U222", "summarize this")
    assert msg.author == "slack:T111/U222"  # user ids are unique per workspace only
    assert msg.thread_id == msg.message_id == "1735689600.000100" and found.team_id == "T111"


def test_mention_inside_a_thread_keeps_that_thread() -> None:
    body = payload("app_mention", thread_ts="1735689000.000050")
    found = convert.inbound(body, bot_user_id="U0BOT")
    assert found is not None and found.message.thread_id == "1735689000.000050"


def test_messages_not_to_answer_are_dropped() -> None:
    dropped = [
        payload("bot_message"),
        payload("dm", subtype="bot_message", bot_id="B999", user=None),
        payload("dm", subtype="message_changed", hidden=True),
        payload("dm", subtype="message_deleted"),
        payload("dm", subtype="channel_join"),
        payload("thread_reply", thread_ts=None),  # a plain channel message
        payload("thread_reply", text="<@U0BOT> hi"),  # its app_mention twin answers it
    ]
    assert [convert.inbound(b, bot_user_id="U0BOT") for b in dropped] == [None] * len(dropped)


def test_direct_and_thread_messages_are_kept() -> None:
    direct = convert.inbound(payload("dm"), bot_user_id="U0BOT")
    thread = convert.inbound(payload("thread_reply"), bot_user_id="U0BOT")
    assert direct is not None and direct.kind == convert.Kind.DIRECT
    assert direct.message.thread_id == "1735689601.000200"
    assert thread is not None and thread.kind == convert.Kind.THREAD
    assert thread.message.thread_id == "1735689600.000100"


def test_safe_text_defuses_pings_and_links() -> None:
    assert render.safe_text("<!here> @channel & <@U1> <http://x|y>") == \
        "&lt;!here&gt; @\u200bchannel &amp; &lt;@U1&gt; &lt;http://x|y&gt;"
    assert render.safe_text("mail me@hereford.example") == "mail me@hereford.example"


def test_streamed_prefixes_are_never_taken_back() -> None:
    text = "Ping @everyone & <!here> now, then @here again."
    shown = ""
    for end in range(len(text) + 1):
        now = render.safe_text(render.stable_prefix(text[:end]))
        assert now.startswith(shown)
        shown = now
    assert render.safe_text(text).startswith(shown)


def test_split_text_is_bounded_lossless_and_stable() -> None:
    text = "\n".join(" ".join(f"w{i}-{j}" for j in range(30)) for i in range(40))
    parts = render.split_text(text, 500)
    assert "".join(parts) == text and all(len(p) <= 500 for p in parts) and len(parts) > 5
    for end in range(0, len(text), 97):  # every part of a prefix but the last is final
        assert render.split_text(text[:end], 500)[:-1] == parts[: len(
            render.split_text(text[:end], 500)) - 1]
    assert render.split_text("x" * 1200, 500) == ["x" * 500, "x" * 500, "x" * 200]


def test_feedback_buttons_carry_the_answer_and_the_vote() -> None:
    block = render.feedback_block(42, chosen=-1)
    assert [(e["action_id"], e["value"], e.get("style")) for e in block["elements"]] == [
        ("vote_up", "42", None), ("vote_down", "42", "primary"), ("suggest", "42", None)]
    message = {"text": "streamed answer", "blocks": [render.feedback_block(42)]}
    assert render.revote_blocks(message, 42, 1) == [
        render.text_block("streamed answer"), render.feedback_block(42, 1)]


def test_interactivity_payloads_are_read() -> None:
    click = convert.click(payload("block_actions"))
    assert click is not None
    assert (click.answer_id, click.voter_id, click.channel_id, click.message_ts) == \
        (2, "slack:T111/U222", "C111", "1735689602.000300")
    suggestion = convert.suggestion(payload("view_submission"))
    assert suggestion == convert.Suggestion(2, "slack:T111/U222", "We open at 9.")
    foreign = payload("view_submission")
    foreign["view"]["private_metadata"] = "C111"
    assert convert.suggestion(foreign) is None


def test_the_identity_carries_the_users_team_wherever_the_payload_says_it() -> None:
    shared = payload("app_mention", team="T111", user_team="T999")  # a shared channel
    found = convert.inbound(shared, bot_user_id="U0BOT")
    assert found is not None and found.message.author == "slack:T999/U222"
    bare = payload("dm")
    del bare["event"]["team"], bare["team_id"]  # only the authorizations name the team
    found = convert.inbound(bare, bot_user_id="U0BOT")
    assert found is not None and found.message.author == "slack:T111/U222"
    click = payload("block_actions")
    del click["user"]["team_id"]  # the workspace of the action instead
    click["team"]["id"] = "T222"
    assert convert.click(click).voter_id == "slack:T222/U222"  # type: ignore[union-attr]
    other = payload("view_submission")
    other["user"]["team_id"] = "T333"  # an Enterprise Grid user of another workspace
    assert convert.suggestion(other).voter_id == "slack:T333/U222"  # type: ignore[union-attr]
    assert convert.split_user("T111/U222") == ("T111", "U222")
    assert convert.split_user("U222") == (None, "U222")  # recorded before identities
