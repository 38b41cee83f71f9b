"""The answer memory as the turn path sees it: the database's entries in an in-process index.

Every process keeps its own `HybridIndex` (inference.memory) and brings it up to date from
the database when a turn finds it older than `refresh_s` (one indexed query; an approval in
any replica is used within about that long). A turn asks `recall`: above `answer_at` the best
entry's answer is sent as it is; from `refer_at` the best entries go into the prompt as
reference answers; below, the model answers alone. A failing memory never fails a turn.

An entry's answer is served as `voice` gives it (the gateway's: feedback.redaction.served):
a reviewer's answer keeps the company's own number and address, but one that repeats a
customer's details from the entry's question or context is not served to anyone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from inference.memory import Doc, HybridIndex, Recall, from_bytes, to_bytes
from storage import memory as store
from storage.memory import EntryRow
from storage.models import MemoryStatus

log = logging.getLogger(__name__)

# rows committed out of order (a slow transaction, clocks of replicas apart) are still seen:
# each refresh re-reads the ids changed within this window before the newest change seen
OVERLAP = timedelta(seconds=5)

# an entry -> its answer as it may be served, or None where it may not be served at all
Voice = Callable[[EntryRow], str | None]


@dataclass
class _State:
    seen: dict[int, datetime] = field(default_factory=dict)  # entry id -> updated_at indexed
    newest: datetime | None = None


class AnswerMemory:
    """Approved answers by similarity to a question; see the module docstring."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], index: HybridIndex, *,
                 answer_at: float, refer_at: float, max_references: int = 3,
                 refresh_s: float = 1.0, voice: Voice | None = None) -> None:
        if refer_at > answer_at:
            raise ValueError(f"refer_at ({refer_at}) must not exceed answer_at ({answer_at})")
        self._sessions, self.index = sessions, index
        self.answer_at, self.refer_at = answer_at, refer_at
        self.max_references, self.refresh_s = max_references, refresh_s
        self._voice = voice
        self._state = _State()
        self._refreshed = -float("inf")
        self._lock = asyncio.Lock()

    @property
    def embedder(self) -> str:
        return self.index.embedder.name

    def __len__(self) -> int:
        return len(self.index)

    async def recall(self, question: str, *, previous: str | None = None) -> Recall:
        """What the memory offers for a question (`previous`: the conversation's last
        question, tried with it when the question alone matches nothing well: a follow-up)."""
        try:
            await self.refresh_if_stale()
            recall = partial(self.index.recall, question, answer_at=self.answer_at,
                             refer_at=self.refer_at, k=self.max_references, previous=previous)
            if self.index.embedder.inline:
                return recall()
            return await asyncio.to_thread(recall)  # a model's forward pass: not on the loop
        except Exception:  # the model answers alone: memory is an aid, never a failure
            log.exception("answer memory unavailable for this turn")
            return Recall()

    async def refresh_if_stale(self) -> None:
        if time.monotonic() - self._refreshed < self.refresh_s:
            return
        if self._lock.locked():  # another turn is refreshing: use the index as it is
            return
        await self.refresh()

    async def refresh(self) -> int:
        """Bring the index up to date with the database; how many entries changed."""
        async with self._lock:
            started = time.monotonic()
            st = self._state
            since = None if st.newest is None else st.newest - OVERLAP
            async with self._sessions() as s:
                changed = await _changed(s, since, st.seen)
            if changed:
                await self._apply(changed)
            self._refreshed = started
            return len(changed)

    async def _apply(self, rows: list[EntryRow]) -> None:
        st = self._state
        served = {r.id: self._served(r) for r in rows if r.status == MemoryStatus.ACTIVE}
        gone = [r.id for r in rows if not served.get(r.id)]
        live = [r for r in rows if served.get(r.id)]
        docs = [Doc(r.id, r.question, served[r.id]) for r in live]
        vectors, fresh = self._stored_vectors(live)
        # in a worker thread: a segment merge with many entries takes a while, and searches
        # (on the event loop) never wait for the index's writer
        await asyncio.to_thread(self._index, gone, docs, vectors, fresh)
        for r in rows:
            st.seen[r.id] = r.updated_at
            st.newest = r.updated_at if st.newest is None else max(st.newest, r.updated_at)
        made = [(r, to_bytes(vectors[i])) for i, r in enumerate(live) if fresh[i]]
        if made:  # cache them for the other replicas and restarts (best effort)
            try:
                async with self._sessions() as s:
                    await store.store_embeddings(s, embedder=self.embedder, vectors=made)
            except Exception as exc:
                log.warning("could not store %d memory embeddings: %s", len(made), exc)

    def _served(self, r: EntryRow) -> str:
        """The entry's answer as it may be sent ("": not at all)."""
        if self._voice is None or not r.answer:
            return r.answer
        answer = self._voice(r)
        if answer is None:
            log.warning("memory entry %d is not served: its answer repeats details of the "
                        "customer who asked", r.id)
            return ""
        return answer

    def _stored_vectors(self, rows: Sequence[EntryRow]) -> tuple[np.ndarray, list[bool]]:
        """Stored vectors where this embedder made them; zeros (to compute) elsewhere."""
        out = np.zeros((len(rows), self.index.embedder.dim), np.float32)
        fresh = []
        for i, r in enumerate(rows):
            v = from_bytes(r.embedding, out.shape[1]) if (
                r.embedding and r.embedder == self.embedder) else None
            if v is not None:
                out[i] = v
            fresh.append(v is None)
        return out, fresh

    def _index(self, gone: list[int], docs: list[Doc], vectors: np.ndarray,
               fresh: list[bool]) -> None:
        todo = [i for i, f in enumerate(fresh) if f]
        if todo:
            vectors[todo] = self.index.vectors([docs[i] for i in todo])
        self.index.remove(gone)
        self.index.upsert(docs, vectors)


async def _changed(session: AsyncSession, since: datetime | None,
                   seen: dict[int, datetime]) -> list[EntryRow]:
    """Entries changed at or after `since` that the index has not seen in this version."""
    versions = await store.versions_since(session, since=since)
    return await store.rows(session, ids=[i for i, at in versions if seen.get(i) != at])
