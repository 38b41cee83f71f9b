"""identities: stored authors and voters become `channel:id` (telegram:111, slack:T0/U0ABC, web:...)

The channel of a user message's author is its conversation's. A voter's is the channel the
feedback came from (its `source`: telegram, slack, slack_thread, web), else the channel of
the answer's conversation: so a vote the web chat once accepted on a Telegram answer under
a typed-in id "111" becomes `web:111`, not the Telegram user's. Web feedback that was trusted
because its typed-in id was a reviewer's is made untrusted, and its approved corrections go
back to review: web identities are never reviewers.

Slack ids get their team, `slack:TEAM/USER`, where the database knows it: from inbound events
whose payload names the user with a team (`TEAM/USER`, or a `team`/`team_id` key), first of
that user, then of the conversation. An id too long for its column once prefixed (a web id
of over 124 characters) becomes `channel:sha256:<40 hex digits>` of it. Events recorded before this revision name no team, so a
Slack id from before usually becomes `slack:USER` (bare user id, no team): it does not match
a reviewer `slack:TEAM/USER` nor the same person's new rows. Ids that already start with
their channel's `channel:` are left alone, so running this again changes nothing.

Revision ID: 0005_identities
Revises: 0004_conversation_split
Create Date: 2026-12-01 11:00:00.000000
"""

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = '0005_identities'
down_revision: str | None = '0004_conversation_split'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SOURCE_CHANNELS = {"telegram": "telegram", "slack": "slack", "slack_thread": "slack",
                   "web": "web"}
BATCH = 1000
MAX_ID = 128  # message.author_id, feedback.voter_id

conversation = sa.table('conversation', sa.column('id', sa.Integer),
                        sa.column('channel', sa.String))
message = sa.table('message', sa.column('id', sa.Integer), sa.column('role', sa.String),
                   sa.column('conversation_id', sa.Integer), sa.column('author_id', sa.String))
feedback = sa.table('feedback', sa.column('id', sa.Integer), sa.column('answer_id', sa.Integer),
                    sa.column('voter_id', sa.String), sa.column('source', sa.String),
                    sa.column('trusted', sa.Boolean), sa.column('review_status', sa.String),
                    sa.column('updated_at', sa.DateTime(timezone=True)))
event = sa.table('inboundevent', sa.column('channel', sa.String),
                 sa.column('payload', sa.JSON), sa.column('message_id', sa.Integer))


def upgrade() -> None:
    conn = op.get_bind()
    teams = _SlackTeams(conn)
    authors = conn.execute(
        sa.select(message.c.id, conversation.c.channel, message.c.conversation_id,
                  message.c.author_id)
        .join(conversation, conversation.c.id == message.c.conversation_id)
        .where(message.c.role == 'user', message.c.author_id.is_not(None))).all()
    _update(conn, message, 'author_id', (
        (mid, new) for mid, channel, conv, old in authors
        if (new := _identity(channel, old, teams, conv)) != old))
    _convert_voters(conn, teams)


def _convert_voters(conn: sa.Connection, teams: '_SlackTeams') -> None:
    rows = conn.execute(
        sa.select(feedback.c.id, feedback.c.answer_id, feedback.c.voter_id, feedback.c.source,
                  feedback.c.updated_at, conversation.c.channel, message.c.conversation_id)
        .join(message, message.c.id == feedback.c.answer_id)
        .join(conversation, conversation.c.id == message.c.conversation_id)
        .order_by(feedback.c.updated_at.desc(), feedback.c.id.desc())).all()
    kept: set[tuple[int, str]] = set()
    changes, dropped = [], []
    for fid, answer, old, source, _, answer_channel, conv in rows:
        channel = SOURCE_CHANNELS.get(source, answer_channel)
        new = _identity(channel, old, teams, conv if channel == answer_channel else None)
        if (answer, new) in kept:  # two old ids of one person on one answer: the latest wins
            dropped.append(fid)
            continue
        kept.add((answer, new))
        if new != old:
            changes.append((fid, new))
    for i in range(0, len(dropped), BATCH):
        conn.execute(sa.delete(feedback).where(feedback.c.id.in_(dropped[i:i + BATCH])))
    _update(conn, feedback, 'voter_id', changes)
    # web ids were typed in by the browser: none of them was ever a reviewer
    conn.execute(sa.update(feedback).where(feedback.c.voter_id.like('web:%'),
                                           feedback.c.review_status == 'approved',
                                           feedback.c.trusted.is_(True))
                 .values(review_status='pending'))
    conn.execute(sa.update(feedback).where(feedback.c.voter_id.like('web:%'),
                                           feedback.c.trusted.is_(True))
                 .values(trusted=False))


def _identity(channel: str, old: str, teams: '_SlackTeams', conversation_id: int | None) -> str:
    if old.startswith(f"{channel}:"):
        return old
    if channel == 'slack' and '/' not in old:
        team = teams.team(old, conversation_id)
        new = f"slack:{team}/{old}" if team else f"slack:{old}"
    else:
        new = f"{channel}:{old}"
    if len(new) > MAX_ID:  # a long id typed into the web chat: still one person, hashed
        new = f"{channel}:sha256:{hashlib.sha256(old.encode()).hexdigest()[:40]}"
    return new


class _SlackTeams:
    """The team of Slack users and conversations, as recorded events' payloads name it."""

    def __init__(self, conn: sa.Connection) -> None:
        self.by_user: dict[str, str] = {}
        self.by_conversation: dict[int, str] = {}
        rows = conn.execute(
            sa.select(event.c.payload, message.c.conversation_id)
            .outerjoin(message, message.c.id == event.c.message_id)
            .where(event.c.channel == 'slack', event.c.payload.is_not(None)))
        for payload, conv in rows:
            user, team = _payload_team(payload)
            if user and team:
                self.by_user.setdefault(user, team)
                if conv is not None:
                    self.by_conversation.setdefault(conv, team)

    def team(self, user: str, conversation_id: int | None) -> str | None:
        return self.by_user.get(user) or (
            None if conversation_id is None else self.by_conversation.get(conversation_id))


def _payload_team(payload: Any) -> tuple[str | None, str | None]:
    if not isinstance(payload, dict) or not isinstance(payload.get('user_id'), str):
        return None, None
    team, sep, user = payload['user_id'].partition('/')
    if sep:
        return user, team
    team = payload.get('team') or payload.get('team_id')
    return payload['user_id'], team if isinstance(team, str) else None


def _update(conn: sa.Connection, table: sa.TableClause, column: str,
            changes: Iterable[tuple[int, str]]) -> None:
    stmt = (sa.update(table).where(table.c.id == sa.bindparam('row_id'))
            .values({column: sa.bindparam('new_value')}))
    for batch in _batches(changes):
        conn.execute(stmt, [{'row_id': i, 'new_value': v} for i, v in batch])


def _batches(items: Iterable[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def downgrade() -> None:
    """Back to bare platform ids: the prefix of the row's own channel (the conversation's)
    and a Slack team are removed; feedback from another channel (web votes on a Telegram
    answer) keeps its prefix, and the trust taken from web feedback is not given back."""
    conn = op.get_bind()
    authors = conn.execute(
        sa.select(message.c.id, conversation.c.channel, message.c.author_id)
        .join(conversation, conversation.c.id == message.c.conversation_id)
        .where(message.c.author_id.is_not(None))).all()
    _update(conn, message, 'author_id', ((i, _bare(c, v)) for i, c, v in authors
                                         if _bare(c, v) != v))
    voters = conn.execute(
        sa.select(feedback.c.id, conversation.c.channel, feedback.c.voter_id)
        .join(message, message.c.id == feedback.c.answer_id)
        .join(conversation, conversation.c.id == message.c.conversation_id)).all()
    _update(conn, feedback, 'voter_id', ((i, _bare(c, v)) for i, c, v in voters
                                         if _bare(c, v) != v))


def _bare(channel: str, who: str) -> str:
    if not who.startswith(f"{channel}:"):
        return who
    user = who[len(channel) + 1:]
    return user.partition('/')[2] or user if channel == 'slack' else user
