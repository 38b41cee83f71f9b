"""`chatloop memory import|list|disable|export` on a real SQLite database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chatloop.cli import app
from storage.migrate import upgrade


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("CHATLOOP_DATABASE_URL", url)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["memory", *args])


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_import_reads_jsonl_csv_and_markdown_then_lists_and_exports(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    jsonl = write(tmp_path, "faq.jsonl", json.dumps(
        {"question": "Where is the shop?", "answer": "12 Mill Lane, Leeds."}) + "\n\n")
    table = write(tmp_path, "faq.csv", 'question,answer\n"Open on Sundays?","Yes, 10-4."\n')
    md = write(tmp_path, "faq.md", "# Shop FAQ\n\n## Do you ship abroad?\nTo the EU only.\n\n"
               "## Gift cards\nSold in store,\nvalid two years.\n")
    done = cli("import", jsonl, table, md)
    assert done.exit_code == 0, done.output
    assert "imported 4 entries" in done.output
    listed = cli("list")
    assert "Do you ship abroad?" in listed.output and "Gift cards" in listed.output
    exported = [json.loads(line) for line in cli("export").output.splitlines()]
    assert [e["question"] for e in exported] == [
        "Where is the shop?", "Open on Sundays?", "Do you ship abroad?", "Gift cards"]
    assert exported[3]["answer"] == "Sold in store,\nvalid two years."


def test_a_malformed_file_names_the_line_and_imports_nothing(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = write(tmp_path, "good.jsonl", json.dumps({"question": "Q?", "answer": "A."}) + "\n")
    bad = write(tmp_path, "bad.jsonl", json.dumps({"question": "Q?", "answer": "A."}) + "\n"
                + json.dumps({"question": "No answer?"}) + "\n")
    done = cli("import", good, bad)
    assert done.exit_code == 2
    assert "bad.jsonl:2" in done.output and "nothing imported" in done.output
    assert cli("export").output == ""
    broken_csv = write(tmp_path, "bad.csv", "question,answer\nfine,yes\n,missing\n")
    assert "bad.csv:3" in cli("import", broken_csv).output


def test_disable_stops_an_entry_and_an_unknown_id_is_refused(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cli("import", write(tmp_path, "f.jsonl", json.dumps({"question": "Q?", "answer": "A."})))
    assert cli("disable", "1").exit_code == 0
    assert "disabled" in cli("list").output
    done = cli("disable", "99")
    assert done.exit_code == 2 and "no memory entry with id 99" in done.output
