"""The SQL schema: conversations, messages, inbound events, feedback, adapters, training runs.

Schema changes only through alembic revisions (storage/migrations).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(**kw: Any) -> Any:
    return Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), **kw))


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


class AnswerStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"


class EventStatus(StrEnum):
    RECEIVED = "received"  # recorded, no answer yet (resumed after a crash: generated)
    ANSWERED = "answered"  # answer stored, delivery not confirmed (resumed: re-delivered)
    DONE = "done"
    FAILED = "failed"


class ReviewStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class AdapterStatus(StrEnum):
    CANDIDATE = "candidate"
    CANARY = "canary"
    ACTIVE = "active"
    RETIRED = "retired"
    REJECTED = "rejected"


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"
    FAILED = "failed"
    SKIPPED = "skipped"


class FeedbackRole(StrEnum):
    """What a run did with the revision of a feedback row it read (runfeedback.role)."""

    TRAINED = "trained"  # in the candidate's training data (a label or a correction)
    HELDOUT = "heldout"  # kept from training for the gate; trained on after a run passes
    UNUSED = "unused"  # read, no label from it (a lone vote, a pending correction, ...)
    QUARANTINED = "quarantined"  # set aside as brigading
    CAPPED = "capped"  # over the per-user cap: a later run takes it


class Conversation(SQLModel, table=True):
    """One chat (or thread) on one channel; a reset starts a new epoch."""

    __table_args__ = (
        UniqueConstraint("channel", "external_chat_id", "external_thread_id", "epoch"),
    )
    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(max_length=32, index=True)
    external_chat_id: str = Field(max_length=128)
    external_thread_id: str = Field(default="", max_length=128)
    epoch: int = 0
    created_at: datetime = _ts(nullable=False, index=True)  # the console lists by time
    # The learning loop's split, recorded the first time a dataset uses the conversation:
    # held out for the gate (True) or trained on (False); None until then.
    heldout: bool | None = None


class Message(SQLModel, table=True):
    """A user question or an assistant answer (with its generation metadata)."""

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversation.id", index=True)
    role: str = Field(max_length=16)
    text: str
    external_message_id: str | None = Field(default=None, max_length=128)
    author_id: str | None = Field(default=None, max_length=128, index=True)  # forget finds them
    reply_to_id: int | None = Field(default=None, foreign_key="message.id", index=True)
    created_at: datetime = _ts(nullable=False, index=True)  # the console's quality page
    # answers only
    model: str | None = Field(default=None, max_length=256)
    adapter: str | None = Field(default=None, max_length=128)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    finish_reason: str | None = Field(default=None, max_length=32)
    status: str | None = Field(default=None, max_length=16)
    error_kind: str | None = Field(default=None, max_length=64)
    # answer memory: the entry sent as it is, or the entries the prompt quoted (storage.memory)
    memory_entry_id: int | None = Field(default=None, index=True)
    memory_refs: list[int] | None = Field(default=None, sa_column=Column(JSON))



# the console's text search (lower(text) LIKE '%words%'): trigrams, PostgreSQL only (0008)
Index("ix_message_text_trgm", text("lower(text) gin_trgm_ops"), postgresql_using="gin",
      _table=Message.__table__).ddl_if(dialect="postgresql")  # type: ignore[attr-defined]
# the console's quality page: answers by time, covering on PostgreSQL (0008)
Index("ix_message_answer_created_at", Message.__table__.c.created_at,  # type: ignore[attr-defined]
      postgresql_include=["id", "conversation_id", "adapter", "status", "error_kind", "ttft_ms",
                          "latency_ms"],
      postgresql_where=text("role = 'assistant'"), sqlite_where=text("role = 'assistant'"))


class InboundEvent(SQLModel, table=True):
    """The idempotency record: one row per platform delivery, written with the turn it starts."""

    __table_args__ = (UniqueConstraint("channel", "external_event_id"),
                      Index("ix_inboundevent_channel_status", "channel", "status"))
    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(max_length=32)
    external_event_id: str = Field(max_length=128)
    status: str = Field(default=EventStatus.RECEIVED, max_length=16)
    payload: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    message_id: int | None = Field(default=None, foreign_key="message.id", index=True)
    received_at: datetime = _ts(nullable=False)
    # the gateway process working on the event, until when: another may resume it after that
    owner: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False,
                                                      server_default="0"))  # resumes so far
    # the platform message already showing the answer as it streams (a resumed turn edits it)
    shown_ref: str | None = Field(default=None, max_length=128)


class Feedback(SQLModel, table=True):
    """One voter's live vote and/or correction on one answer (changeable, never duplicated)."""

    __table_args__ = (UniqueConstraint("answer_id", "voter_id"),)
    id: int | None = Field(default=None, primary_key=True)
    answer_id: int = Field(foreign_key="message.id", index=True)
    voter_id: str = Field(max_length=128, index=True)
    rating: int | None = None  # +1 / -1
    reason: str | None = None
    correction: str | None = None
    source: str = Field(max_length=32)
    trusted: bool = False
    review_status: str | None = Field(default=None, max_length=16, index=True)  # the queue
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False, index=True)  # the quality roll-up's staleness
    # bumped by every change (vote, correction, review decision): runs consume revisions
    revision: int = Field(default=1, sa_column=Column(Integer, nullable=False,
                                                      server_default="1"))


class AdapterVersion(SQLModel, table=True):
    """A LoRA adapter with a unique, versioned name and its lineage."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True)
    status: str = Field(default=AdapterStatus.CANDIDATE, max_length=16, index=True)
    path: str
    rank: int
    parent_name: str | None = Field(default=None, max_length=128)
    run_id: int | None = Field(default=None, foreign_key="trainingrun.id")
    dataset_hash: str | None = Field(default=None, max_length=64)
    metrics: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)
    # when it was found to be trained on data since forgotten (its run's, or its parent's)
    tainted_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class TrainingRun(SQLModel, table=True):
    """One cycle of the learning loop: dataset -> training -> evaluation -> registration."""

    __table_args__ = (  # at most one running row: the run lease (RELIABILITY.md section 1)
        Index("ux_trainingrun_one_running", "status", unique=True,
              sqlite_where=text("status = 'running'"),
              postgresql_where=text("status = 'running'")),
    )
    id: int | None = Field(default=None, primary_key=True)
    status: str = Field(default=RunStatus.RUNNING, max_length=16, index=True)
    trigger: str = Field(default="manual", max_length=32)
    dataset_hash: str | None = Field(default=None, max_length=64)
    adapter_name: str | None = Field(default=None, max_length=128)
    metrics: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    log_path: str | None = None
    error: str | None = None
    started_at: datetime = _ts(nullable=False)
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    heartbeat_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    # when data it used was forgotten (set even while it runs: its adapter is then tainted)
    tainted_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class RunFeedback(SQLModel, table=True):
    """A feedback row's revision that a run read, and what it did with it: a later change
    (a new revision) is new to later runs (feedback.dataset)."""

    __table_args__ = (Index("ix_runfeedback_feedback", "feedback_id", "revision"),)
    run_id: int = Field(foreign_key="trainingrun.id", primary_key=True)
    # no foreign key: forgetting a person deletes their feedback, not the runs' records
    feedback_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    revision: int
    role: str = Field(max_length=16)


class Lease(SQLModel, table=True):
    """A named, expiring lease (e.g. the scheduler's leadership) that works on SQLite too."""

    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(max_length=128)
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class RunIdentity(SQLModel, table=True):
    """A person whose data a training run used: the salted hash of their identity
    (storage.privacy), recorded when the run builds its dataset."""

    run_id: int = Field(foreign_key="trainingrun.id", primary_key=True)
    identity_hash: str = Field(max_length=64, primary_key=True, index=True)


class ForgottenIdentity(SQLModel, table=True):
    """A forgotten person: only the salted hash of their identity is kept, so that later
    datasets and exports leave out whatever they write again."""

    identity_hash: str = Field(primary_key=True, max_length=64)
    forgotten_at: datetime = _ts(nullable=False)


class InstallationSecret(SQLModel, table=True):
    """Per-installation random values (the identity-hash salt), made by the migration."""

    name: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=256)


class AuditLog(SQLModel, table=True):
    """Who approved, rejected, promoted, rolled back, forgot or deleted what, and when."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _ts(nullable=False)
    actor: str = Field(max_length=160)  # a reviewer's identity, cli:<os user>, system:<job>
    action: str = Field(max_length=32, index=True)
    target: str = Field(max_length=256)
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class OperatorRole(StrEnum):
    """What a console operator may do: reviewers review and correct; admins also promote,
    roll back, forget people and manage operators."""

    REVIEWER = "reviewer"
    ADMIN = "admin"


class Operator(SQLModel, table=True):
    """A person who signs in to the operator console (storage.operators)."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    role: str = Field(max_length=16)
    password_hash: str | None = Field(default=None, max_length=256)  # argon2id
    created_at: datetime = _ts(nullable=False)
    disabled_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    last_login_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class QualityDay(SQLModel, table=True):
    """The console's quality roll-up of one closed UTC day (storage.console): its answers and
    votes counted per channel, adapter, status and failure kind; a cache, recomputed when
    stale."""

    day: date = Field(primary_key=True)
    computed_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # [[channel, adapter, status, failure kind, answers, up, down], ...]
    counts: list[Any] = Field(sa_column=Column(JSON, nullable=False))


class OperatorSession(SQLModel, table=True):
    """A signed-in console session: the SHA-256 of the random token its cookie carries."""

    id: str = Field(primary_key=True, max_length=64)
    operator_id: int = Field(foreign_key="operator.id", index=True)
    created_at: datetime = _ts(nullable=False)
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class MemoryStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"  # by an operator, or by trusted votes (disabled_by says which)
    ERASED = "erased"  # its person was forgotten: texts emptied, the row kept as a tombstone


class MemoryEntry(SQLModel, table=True):
    """An approved answer the gateway may answer from (storage.memory): an approved correction
    or an imported question and answer. Every change bumps `updated_at`, which replicas poll."""

    id: int | None = Field(default=None, primary_key=True)
    question: str
    context: str | None = None  # the exchange before the question, for follow-ups
    answer: str
    source: str = Field(max_length=16)  # "correction" | "import"
    feedback_id: int | None = Field(default=None, unique=True)  # the approved correction
    asked_by: str | None = Field(default=None, max_length=128, index=True)
    approved_by: str | None = Field(default=None, max_length=160, index=True)
    status: str = Field(default=MemoryStatus.ACTIVE, max_length=16)
    disabled_by: str | None = Field(default=None, max_length=160)
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False, index=True)
    embedder: str | None = Field(default=None, max_length=128)  # what made `embedding`
    embedding: bytes | None = Field(default=None, sa_column=Column(LargeBinary))


class HandoffStatus(StrEnum):
    WAITING = "waiting"  # a person was asked for; the bot no longer answers
    HELD = "held"  # an agent took the conversation over
    CLOSED = "closed"  # handed back to the bot


class Handoff(SQLModel, table=True):
    """A conversation handed to a person (storage.handoff): while it is open (waiting or
    held) no replica's bot answers in it. At most one open hand-off per conversation."""

    __table_args__ = (
        Index("ux_handoff_open", "conversation_id", unique=True,
              sqlite_where=text("status != 'closed'"),
              postgresql_where=text("status != 'closed'")),
        Index("ix_handoff_agent_ref", "agent_chat", "agent_ref"),
        Index("ix_handoff_status", "status"),
    )
    id: int | None = Field(default=None, primary_key=True)
    # no foreign key: forgetting a conversation must not be blocked by its hand-offs
    conversation_id: int = Field(index=True)
    channel: str = Field(max_length=32)
    chat_id: str = Field(max_length=128)  # where the user is (for relays)
    thread_id: str = Field(default="", max_length=128)
    user_id: str = Field(max_length=128)  # the asker's identity
    status: str = Field(default=HandoffStatus.WAITING, max_length=16)
    reason: str = Field(max_length=32)  # button, command, phrase, downvotes
    answer_id: int | None = None  # the bot's last answer before it (the pair's rejected side)
    adapter: str | None = Field(default=None, max_length=128)  # what served that answer
    feedback_id: int | None = None  # the preference pair stored from the agent's reply
    pair_open: bool = True  # agent messages still count as the answer to that question
    agent_chat: str | None = Field(default=None, max_length=128)  # where agents work
    agent_ref: str | None = Field(default=None, max_length=128)  # topic id / escalation ts
    agent_id: str | None = Field(default=None, max_length=128)
    agent_name: str | None = Field(default=None, max_length=128)
    requested_at: datetime = _ts(nullable=False)
    taken_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    last_agent_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    apologised_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    closed_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    closed_by: str | None = Field(default=None, max_length=160)
    error: str | None = Field(default=None, max_length=64)  # the last relay failure's kind


class HandoffMessage(SQLModel, table=True):
    """A message relayed during a hand-off: stored before it is relayed, marked when it is."""

    id: int | None = Field(default=None, primary_key=True)
    handoff_id: int = Field(foreign_key="handoff.id", index=True)
    direction: str = Field(max_length=8)  # "in" (user -> agents), "out" (agent -> user)
    author_id: str = Field(max_length=128, index=True)
    text: str
    created_at: datetime = _ts(nullable=False)
    delivered_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    error: str | None = Field(default=None, max_length=64)
