"""The conversation core with a scripted backend, on real SQLite and PostgreSQL storage."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from sqlalchemy import select
from transformers import AutoTokenizer

from bots.core import (
    Accepted,
    ConversationCore,
    CoreLimits,
    InboundMessage,
    Outcome,
    Resumed,
    StaticRouter,
    UnknownAnswer,
    channel_of,
    identity,
)
from inference.errors import BackendUnavailable
from inference.prompt import PromptFitter
from storage.models import InboundEvent, Message
from tests.fakes.inference import ScriptedBackend
from tests.fakes.sinks import RecordingSink


@pytest.fixture(scope="module")
def tokenizer(model_dir):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_dir)


def make_core(sessions, tokenizer, backend=None, adapter=None, owner=None,  # type: ignore[no-untyped-def]
              reviewers=frozenset(), **limits):
    backend = backend or ScriptedBackend()
    return ConversationCore(
        sessions=sessions, backend=backend,
        fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=128),
        system_prompt="Be brief.", limits=CoreLimits(max_tokens=128, **limits),
        router=StaticRouter(adapter), owner=owner, reviewers=reviewers,
    )


def msg(text: str, event: str, chat: str = "c1", user: str = "u1") -> InboundMessage:
    return InboundMessage(channel="test", event_id=event, chat_id=chat, user_id=user, text=text)


async def test_answer_streams_and_is_stored(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    sink = RecordingSink()
    result = await core.handle(msg("What are your hours?", "e1"), sink)
    assert result.outcome == Outcome.ANSWERED
    assert sink.final == "Echo: What are your hours?" and sink.updates[-1] == sink.final
    assert len(sink.updates) > 1  # streamed in pieces
    async with sessions() as s:
        answer = await s.get(Message, result.answer_id)
    assert answer.status == "ok" and answer.text == sink.final
    assert answer.external_message_id == f"ext-{result.answer_id}"
    assert answer.model == "scripted" and answer.ttft_ms is not None


async def test_history_and_system_prompt_reach_the_model(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend()
    core = make_core(sessions, tokenizer, backend)
    await core.handle(msg("first", "e1"), RecordingSink())
    await core.handle(msg("second", "e2"), RecordingSink())
    roles = [(m.role, m.content) for m in backend.requests[-1].messages]
    assert roles == [("system", "Be brief."), ("user", "first"), ("assistant", "Echo: first"),
                     ("user", "second")]


async def test_duplicate_delivery_is_answered_once(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend(delay=0.01)
    core = make_core(sessions, tokenizer, backend)
    sinks = [RecordingSink() for _ in range(3)]
    results = await asyncio.gather(*(core.handle(msg("hi", "same"), s) for s in sinks))
    assert sorted(r.outcome for r in results) == ["answered", "duplicate", "duplicate"]
    assert len(backend.requests) == 1


async def test_reset_and_help_commands(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend()
    core = make_core(sessions, tokenizer, backend)
    await core.handle(msg("first", "e1"), RecordingSink())
    sink = RecordingSink()
    assert (await core.handle(msg("/reset", "e2"), sink)).outcome == Outcome.COMMAND
    assert "new conversation" in sink.notices[0]
    await core.handle(msg("second", "e3"), RecordingSink())
    assert [m.content for m in backend.requests[-1].messages] == ["Be brief.", "second"]
    help_sink = RecordingSink()
    await core.handle(msg("/help", "e4"), help_sink)
    assert "/reset" in help_sink.notices[0]


async def test_unknown_command_empty_and_oversized_are_refused(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend()
    core = make_core(sessions, tokenizer, backend, max_input_chars=50)
    for text, expect in (("/frobnicate", "Unknown command"), ("   ", "as text"),
                         ("x" * 51, "too long")):
        sink = RecordingSink()
        assert (await core.handle(msg(text, f"e-{len(text)}"), sink)).outcome == "rejected"
        assert expect in sink.notices[0]
    assert backend.requests == []


async def test_rate_limit_is_per_user(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer, rate_limit_per_minute=2)
    outcomes = [(await core.handle(msg("q", f"e{i}"), RecordingSink())).outcome for i in range(3)]
    other = await core.handle(msg("q", "o1", user="u2"), RecordingSink())
    assert outcomes == ["answered", "answered", "rejected"] and other.outcome == "answered"


async def test_backend_failure_mid_stream_stores_a_failed_turn(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend(fail_after=2, error=BackendUnavailable("gone"))
    core = make_core(sessions, tokenizer, backend)
    sink = RecordingSink()
    result = await core.handle(msg("hello there friend", "e1"), sink)
    assert result.outcome == Outcome.FAILED and result.error_kind == "unavailable"
    assert "unavailable" in sink.failed and sink.final is None
    async with sessions() as s:
        answer = await s.get(Message, result.answer_id)
        event = (await s.execute(select(InboundEvent))).scalar_one()
    assert (answer.status, answer.error_kind, event.status) == ("failed", "unavailable", "failed")
    assert answer.text == "Echo: hello ther" == sink.updates[-1]  # the partial answer is kept


async def test_unknown_adapter_falls_back_to_base_model(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend()
    core = make_core(sessions, tokenizer, backend, adapter="fb-v404")
    result = await core.handle(msg("hi", "e1"), RecordingSink())
    assert result.outcome == Outcome.ANSWERED
    assert [r.adapter for r in backend.requests] == ["fb-v404", None]
    async with sessions() as s:
        assert (await s.get(Message, result.answer_id)).adapter is None


async def test_concurrency_bound_holds(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    live = peak = 0
    two = asyncio.Event()  # a loaded machine may not overlap turns by itself: make them

    class Counting(ScriptedBackend):
        async def stream(self, request):  # type: ignore[no-untyped-def]
            nonlocal live, peak
            live += 1
            peak = max(peak, live)
            if live >= 2:
                two.set()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(two.wait(), 30)
                async for ev in super().stream(request):
                    yield ev
            finally:
                live -= 1

    core = make_core(sessions, tokenizer, Counting(delay=0.01), max_concurrent_generations=2)
    await asyncio.gather(*(core.handle(msg("q", f"e{i}", chat=f"c{i}", user=f"u{i}"),
                                       RecordingSink()) for i in range(6)))
    assert peak == 2


def collecting_sinks() -> tuple[list[RecordingSink], Any]:
    sinks: list[RecordingSink] = []

    async def sink_for(_: InboundMessage, __: Resumed) -> RecordingSink:
        sinks.append(RecordingSink())
        return sinks[-1]

    return sinks, sink_for


async def test_a_turn_cancelled_mid_answer_is_answered_by_resume(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend(delay=0.05)
    core = make_core(sessions, tokenizer, backend)
    task = asyncio.create_task(core.handle(msg("slow question", "e1"), RecordingSink()))
    while not backend.requests:  # noqa: ASYNC110  (poll a plain list the backend appends to)
        await asyncio.sleep(0.01)
    task.cancel()  # a shutdown that could not wait for the answer
    with pytest.raises(asyncio.CancelledError):
        await task
    async with sessions() as s:  # nothing stored for the cancelled answer: the event stays open
        assert (await s.execute(select(InboundEvent.status))).scalar_one() == "received"
        assert (await s.execute(select(Message.role))).scalars().all() == ["user"]
    assert (await core.handle(msg("slow question", "e1"), RecordingSink())).outcome == (
        Outcome.DUPLICATE)  # a redelivery is still not answered twice
    await core.aclose()  # the shutdown gives up the event's lease: the next start takes it
    sinks, sink_for = collecting_sinks()
    assert await make_core(sessions, tokenizer, ScriptedBackend()).resume("test", sink_for) == 1
    assert sinks[0].final == "Echo: slow question"
    assert await core.resume("test", sink_for) == 0


async def test_an_answer_stored_but_not_delivered_is_delivered_by_resume(
    sessions, tokenizer  # type: ignore[no-untyped-def]
) -> None:
    class DyingSink(RecordingSink):
        async def finish(self, text: str, answer_id: int) -> str | None:
            raise asyncio.CancelledError  # the process dies while sending the final message

    backend = ScriptedBackend()
    core = make_core(sessions, tokenizer, backend)
    with pytest.raises(asyncio.CancelledError):
        await core.handle(msg("question", "e1"), DyingSink())
    sinks, sink_for = collecting_sinks()
    assert await core.resume("test", sink_for) == 0  # still held: this process is alive
    await core.aclose()
    assert await core.resume("test", sink_for) == 1
    assert len(backend.requests) == 1  # re-delivered as stored, not generated again
    async with sessions() as s:
        answer = (await s.execute(select(Message).where(Message.role == "assistant"))).scalar_one()
        event = (await s.execute(select(InboundEvent))).scalar_one()
    assert (sinks[0].final, sinks[0].answer_id) == ("Echo: question", answer.id)
    assert (answer.external_message_id, event.status) == (f"ext-{answer.id}", "done")
    assert await core.resume("test", sink_for) == 0


async def test_replicas_never_resume_a_live_turn_and_take_a_given_up_one_once(
    sessions, tokenizer  # type: ignore[no-untyped-def]
) -> None:
    slow = ScriptedBackend(delay=0.6)  # about 2 s: two lease periods
    a = make_core(sessions, tokenizer, slow, owner="replica-a", event_lease_s=1.0)
    b = make_core(sessions, tokenizer, owner="replica-b", event_lease_s=1.0)
    c = make_core(sessions, tokenizer, owner="replica-c", event_lease_s=1.0)
    answering = asyncio.create_task(a.handle(msg("a slow question", "e1"), RecordingSink()))
    sinks, sink_for = collecting_sinks()
    for _ in range(4):  # across more than one lease period: a renews while it answers
        assert await b.resume("test", sink_for) == 0
        await asyncio.sleep(0.4)
    assert (await answering).outcome == Outcome.ANSWERED and not sinks
    accepted = await a.accept(msg("left open", "e2"), RecordingSink())
    assert isinstance(accepted, Accepted)
    assert await b.resume("test", sink_for) == 0
    await a.aclose()  # a stops before answering it: it gives the event up
    results = await asyncio.gather(b.resume("test", sink_for), c.resume("test", sink_for))
    assert sorted(results) == [0, 1] and [s.final for s in sinks] == ["Echo: left open"]
    async with sessions() as s:
        event = (await s.execute(select(InboundEvent).where(
            InboundEvent.external_event_id == "e2"))).scalar_one()
    assert event.status == "done" and event.owner in ("replica-b", "replica-c")


async def test_a_turn_that_keeps_failing_is_given_up_after_bounded_resumes(
    sessions, tokenizer  # type: ignore[no-untyped-def]
) -> None:
    from bots.core import MAX_RESUMES

    class BrokenSink(RecordingSink):
        async def finish(self, text: str, answer_id: int) -> str | None:
            raise RuntimeError("a bug in the channel")

    async def broken(_: InboundMessage, __: Resumed) -> BrokenSink:
        return BrokenSink()

    core = make_core(sessions, tokenizer, event_lease_s=0.05)
    with pytest.raises(RuntimeError):
        await core.handle(msg("question", "e1"), BrokenSink())
    for _ in range(MAX_RESUMES):  # each lease period another try, each failing
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError):
            await core.resume("test", broken)
    await asyncio.sleep(0.1)
    assert await core.resume("test", broken) == 0  # not tried again: closed as failed
    async with sessions() as s:
        event = (await s.execute(select(InboundEvent))).scalar_one()
    assert (event.status, event.attempts) == ("done", MAX_RESUMES + 1)
    assert await core.resume("test", broken) == 0


async def test_concurrent_messages_in_one_chat_are_answered_in_order_with_history(
    sessions, tokenizer  # type: ignore[no-untyped-def]
) -> None:
    backend = ScriptedBackend(delay=0.02)
    core = make_core(sessions, tokenizer, backend)
    first = asyncio.create_task(core.handle(msg("first question", "e1"), RecordingSink()))
    while not backend.requests:  # noqa: ASYNC110  (the first is being answered)
        await asyncio.sleep(0.005)
    second = await core.handle(msg("second question", "e2"), RecordingSink())
    assert (await first).outcome == second.outcome == Outcome.ANSWERED
    contents = [m.content for m in backend.requests[1].messages]
    assert contents[1:] == ["first question", "Echo: first question", "second question"]


async def test_an_event_stored_in_the_old_payload_shape_still_resumes(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from storage import conversations

    old = {"channel": "test", "event_id": "e-old", "chat_id": "c9", "user_id": "u9",
           "text": "an old question", "thread_id": "", "message_id": None}  # asdict(msg), no "v"
    async with sessions() as s:
        conv = await conversations.current_conversation(s, channel="test", chat_id="c9")
        turn = await conversations.begin_turn(s, channel="test", event_id="e-old",
                                              conversation_id=conv, text="an old question",
                                              author_id="u9", payload=old)
    seen: list[InboundMessage] = []
    sink = RecordingSink()

    async def sink_for(m: InboundMessage, _: Resumed) -> RecordingSink:
        seen.append(m)
        return sink

    core = make_core(sessions, tokenizer)
    assert await core.resume("test", sink_for) == 1
    assert seen == [InboundMessage(channel="test", event_id="e-old", chat_id="c9", user_id="u9",
                                   text="an old question")]
    assert sink.final == "Echo: an old question"
    async with sessions() as s:
        assert (await s.get(InboundEvent, turn.event_id)).status == "done"


def test_the_stored_payload_is_versioned_and_round_trips() -> None:
    from bots.core import payload

    m = InboundMessage(channel="slack", event_id="Ev1", chat_id="C1", user_id="U1", text="hi",
                       thread_id="1.2", message_id="1.3")
    stored = payload.dump(m)
    assert stored["v"] == payload.VERSION and payload.load(stored) == m
    with pytest.raises(payload.UnreadablePayload, match="newer"):
        payload.load({**stored, "v": payload.VERSION + 1})


async def test_a_vote_with_its_delivery_is_acted_on_once(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    answered = await core.handle(msg("q", "e1"), RecordingSink())
    assert answered.answer_id is not None
    votes = [await core.vote(answer_id=answered.answer_id, voter_id="test:u1", rating=-1,
                             source="test", event_id="cb-1") for _ in range(2)]
    assert [v.first_delivery for v in votes] == [True, False]
    assert (votes[1].rating, votes[1].trusted) == (-1, False)
    assert not await core.record_delivery("test", "cb-1")  # the vote's delivery is recorded


def test_a_person_is_their_channel_and_their_id_there() -> None:
    assert identity("telegram", "111") == "telegram:111"
    assert identity("slack", "T0/U0ABC") == "slack:T0/U0ABC"
    assert channel_of("web:abc") == "web" and msg("q", "e").author == "test:u1"
    for channel, user in (("", "1"), ("a:b", "1"), ("web", "")):
        with pytest.raises(ValueError):
            identity(channel, user)
    for bad in ("111", ":1", "web:"):
        with pytest.raises(ValueError, match="not an identity"):
            channel_of(bad)


def _on(channel: str, user: str, event: str) -> InboundMessage:
    return InboundMessage(channel=channel, event_id=event, chat_id=f"{user}/c", user_id=user,
                          text="When do you open?")


async def test_authors_and_rate_limits_are_identities(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer, rate_limit_per_minute=1)
    here = await core.handle(_on("test", "u1", "e1"), RecordingSink())
    elsewhere = await core.handle(_on("other", "u1", "e1"), RecordingSink())
    again = await core.handle(_on("test", "u1", "e2"), RecordingSink())
    assert (here.outcome, elsewhere.outcome, again.outcome) == ("answered", "answered",
                                                                "rejected")
    async with sessions() as s:
        authors = (await s.execute(select(Message.author_id).where(Message.role == "user")
                                   .order_by(Message.id))).scalars().all()
    assert authors == ["test:u1", "other:u1"]  # the same id on two channels: two people


async def test_feedback_is_taken_only_where_it_belongs(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer, reviewers=frozenset({"telegram:111"}))
    tg = (await core.handle(_on("telegram", "42", "t1"), RecordingSink())).answer_id
    web = (await core.handle(_on("web", "a", "w1"), RecordingSink())).answer_id
    assert tg is not None and web is not None
    for answer, voter in ((tg, "web:a"),  # another channel's answer
                          (web, "telegram:111"),  # a reviewer, of another channel
                          (web, "web:b")):  # another browser's conversation
        with pytest.raises(UnknownAnswer, match=f"no answer with id {answer}$"):
            await core.vote(answer_id=answer, voter_id=voter, rating=1, source="t")
        with pytest.raises(UnknownAnswer, match=f"no answer with id {answer}$"):
            await core.correct(answer_id=answer, voter_id=voter, text="Nine.", source="t")
    with pytest.raises(ValueError, match="not an identity"):  # a bare id is nobody
        await core.vote(answer_id=tg, voter_id="111", rating=1, source="t")
    reviewer = await core.correct(answer_id=tg, voter_id="telegram:111", text="Nine.",
                                  source="t")
    group_member = await core.vote(answer_id=tg, voter_id="telegram:43", rating=1, source="t")
    asker = await core.correct(answer_id=web, voter_id="web:a", text="Nine.", source="t")
    assert (reviewer.trusted, reviewer.review_status) == (True, "approved")
    assert (group_member.trusted, asker.trusted, asker.review_status) == (False, False,
                                                                          "pending")
    operator = await core.correct(answer_id=web, voter_id="web:a", text="Ten.", source="t",
                                  operator=True)  # the channel vouches for its operator
    assert (operator.trusted, operator.review_status) == (True, "approved")


def test_web_identities_are_never_reviewers(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="never reviewers"):
        make_core(sessions, tokenizer, reviewers=frozenset({"telegram:111", "web:abc"}))
    with pytest.raises(ValueError, match="not an identity"):
        make_core(sessions, tokenizer, reviewers=frozenset({"111"}))
