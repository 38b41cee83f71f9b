"""`chatloop memory import FILE...|list|disable ID|enable ID|export`: the answer memory.

Files to import: JSON Lines (`.jsonl`, objects with `question` and `answer`), CSV (`.csv`,
a header with `question` and `answer` columns) and Markdown (`.md`: each heading and the
text under it are a question and its answer). Every file is read before anything is
stored: a malformed line names its file and line, and nothing is imported.
Registered on the `chatloop` app by chatloop/cli/__init__.py.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Annotated

import typer

from chatloop.cli.common import database, die, load_settings, run

memory_app = typer.Typer(no_args_is_help=True, help="the answer memory (approved answers)")


class BadFile(ValueError):
    """A file to import is malformed; the message names the file and line."""


def parse(path: Path) -> list[tuple[str, str]]:
    """The (question, answer) pairs of one file; BadFile if any line is malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFile(f"{path}: cannot read: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        pairs = _jsonl(path, text)
    elif suffix == ".csv":
        pairs = _csv(path, text)
    elif suffix in (".md", ".markdown"):
        pairs = _markdown(text)
    else:
        raise BadFile(f"{path}: unknown kind of file (use .jsonl, .csv or .md)")
    if not pairs:
        raise BadFile(f"{path}: no questions and answers in it")
    return pairs


def _pair(path: Path, line: int, question: object, answer: object) -> tuple[str, str]:
    if not (isinstance(question, str) and question.strip()):
        raise BadFile(f"{path}:{line}: `question` must be non-empty text")
    if not (isinstance(answer, str) and answer.strip()):
        raise BadFile(f"{path}:{line}: `answer` must be non-empty text")
    return question.strip(), answer.strip()


def _jsonl(path: Path, text: str) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadFile(f"{path}:{n}: not JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise BadFile(f"{path}:{n}: not a JSON object")
        pairs.append(_pair(path, n, obj.get("question"), obj.get("answer")))
    return pairs


def _csv(path: Path, text: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    if not {"question", "answer"} <= set(reader.fieldnames or ()):
        raise BadFile(f"{path}:1: the header needs `question` and `answer` columns")
    pairs = []
    for row in reader:
        if None in row:  # more cells than the header names
            raise BadFile(f"{path}:{reader.line_num}: more cells than the header has")
        pairs.append(_pair(path, reader.line_num, row["question"], row["answer"]))
    return pairs


_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _markdown(text: str) -> list[tuple[str, str]]:
    """Each heading with the text under it (a heading with none, a title, is skipped)."""
    pairs, heading, body = [], None, []
    for line in [*text.splitlines(), "# end"]:
        m = _HEADING.match(line)
        if m is None:
            body.append(line)
            continue
        passage = "\n".join(body).strip()
        if heading and passage:
            pairs.append((heading, passage))
        heading, body = m.group(1).strip(), []
    return pairs


@memory_app.command("import")
def import_files(files: Annotated[list[Path], typer.Argument(help=".jsonl, .csv or .md")]
                 ) -> None:
    """Add the questions and answers of these files to the memory (all or nothing)."""
    try:
        pairs = [p for f in files for p in parse(f)]
    except BadFile as exc:
        die(f"nothing imported: {exc}")

    async def main() -> list[int]:
        from inference.memory import Doc, HybridIndex, load_embedder, to_bytes
        from storage import memory as store
        from storage.audit import cli_actor

        index = HybridIndex(load_embedder(load_settings().memory.embedder))
        vectors = index.vectors([Doc(0, q, a) for q, a in pairs])
        async with database() as (_, sessions), sessions() as s:
            return await store.add_entries(
                s, [store.NewEntry(q, a) for q, a in pairs], actor=cli_actor(),
                embedder=index.embedder.name, embeddings=[to_bytes(v) for v in vectors])

    ids = run(main)
    typer.echo(f"imported {len(ids)} entries ({ids[0]}..{ids[-1]})" if ids else "imported 0")


@memory_app.command("list")
def list_entries(
    status: Annotated[str | None, typer.Option(
        help="only entries with this status: active, disabled, erased")] = None,
) -> None:
    """Entries with their use count and trusted 👍/👎; "(not served)" on an active one whose
    answer repeats details of the customer who asked (the gateway never sends or quotes it)."""
    from storage import memory as store

    async def main() -> list[store.EntryStats]:
        async with database() as (_, sessions), sessions() as s:
            return await store.entries(s, status=status)

    rows = run(main)
    served = load_settings().learn.memory_voice()
    typer.echo(f"{'id':>6}  {'status':<9} {'uses':>5} {'up':>3} {'down':>4}  {'source':<10} "
               "question")
    for e in rows:
        q = e.question.replace("\n", " ")
        why = f" ({e.disabled_by})" if e.disabled_by else ""
        if e.status == "active" and served(e) is None:
            why = " (not served: repeats the asker's details)"
        typer.echo(f"{e.id:>6}  {e.status:<9} {e.uses:>5} {e.up:>3} {e.down:>4}  "
                   f"{e.source:<10} {q[:70]}{why}")


def _set(entry_id: int, active: bool) -> None:
    from storage import memory as store
    from storage.audit import cli_actor
    from storage.models import MemoryStatus

    async def main() -> bool:
        async with database() as (_, sessions), sessions() as s:
            return await store.set_status(
                s, entry_id=entry_id, by=cli_actor(),
                status=MemoryStatus.ACTIVE if active else MemoryStatus.DISABLED)

    if not run(main):
        die(f"no memory entry with id {entry_id}")
    typer.echo(f"entry {entry_id} {'enabled' if active else 'disabled'}")


@memory_app.command("disable")
def disable(entry_id: Annotated[int, typer.Argument(help="the entry's id (memory list)")]
            ) -> None:
    """Stop answering from an entry (every replica, within seconds)."""
    _set(entry_id, False)


@memory_app.command("enable")
def enable(entry_id: Annotated[int, typer.Argument(help="the entry's id (memory list)")]
           ) -> None:
    """Answer from a disabled entry again."""
    _set(entry_id, True)


@memory_app.command("export")
def export() -> None:
    """The entries as JSON Lines on stdout (importable again with `memory import`)."""
    from storage import memory as store

    async def main() -> list[store.EntryStats]:
        async with database() as (_, sessions), sessions() as s:
            return await store.entries(s)

    for e in run(main):
        typer.echo(json.dumps({"id": e.id, "question": e.question, "answer": e.answer,
                               "source": e.source, "status": e.status, "uses": e.uses,
                               "up": e.up, "down": e.down}, ensure_ascii=False))


def show_voted_down() -> None:
    """For `chatloop review`: the entries that trusted 👎 votes disabled (more 👎 than 👍
    from distinct trusted voters), to fix and import again, or to enable."""
    from storage import memory as store
    from storage.models import MemoryStatus

    async def main() -> list[store.EntryStats]:
        async with database() as (_, sessions), sessions() as s:
            return [e for e in await store.entries(s, status=MemoryStatus.DISABLED)
                    if e.disabled_by == store.VOTES]

    rows = run(main)
    for e in rows:
        typer.echo(f"memory entry {e.id} turned down by votes ({e.up} 👍, {e.down} 👎, used "
                   f"{e.uses} times)\n  Q: {e.question}\n  A: {e.answer}")
    if rows:
        typer.echo(f"{len(rows)} memory entries turned down by votes (`chatloop memory "
                   "enable ID` answers from one again)")


def register(app: typer.Typer) -> None:
    """Add `chatloop memory` to the `chatloop` app."""
    app.add_typer(memory_app, name="memory")
