"""Registered data sources: the registry, what a scan reads and skips, the feed at round
boundaries, the ledger's numbers against the tokens the inner loop consumed, and the CLI."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from p2ptrain.config import RunConfig
from p2ptrain.data.ledger import Ledger
from p2ptrain.data.sources import (DocumentFeed, SourceScanner, add_source, check_directory, read_sources,
                                   remove_source, settings_path, write_sources)
from p2ptrain.data.tokenizer import ByteTokenizer
from p2ptrain.errors import ConfigError, DataError, UserError
from p2ptrain.model.grid import path_name
from p2ptrain.run_state import RunState
from p2ptrain.train.session import PathSession

from conftest import TINY_RUN, topic_text
from tests.unit.conftest import assert_one_line_error

ONE_PATH_RUN = {**TINY_RUN, "run": {"id": "unit-sources", "seed": 0}, "grid": {"levels": [1], "blocks_per_level": 1},
                "data": {"heldout_percent": 0.0},
                "inner": {**TINY_RUN["inner"], "optimizer": "adamw", "batch_size": 4, "steps_per_round": 3}}
STEPS = 3  # inner steps per round in these tests






def write_docs(directory: Path, topic: int, count: int, chars: int = 400, prefix: str = "doc") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (directory / f"{prefix}{i:03d}.txt").write_text(topic_text(topic, i, chars))
    return directory


def mixed_source(root: Path) -> Path:
    """Good files, and one of each thing a scan must skip."""
    root.mkdir(parents=True)
    (root / "good.txt").write_text("a plain note\n")
    (root / "sub").mkdir()
    (root / "sub" / "nested.md").write_text("# nested\ntext\n")
    (root / "lines.jsonl").write_text('{"text": "first"}\nnot json\n{"text": 3}\n{"text": "second"}\n')
    (root / "id_rsa.key").write_text("-----BEGIN RSA PRIVATE KEY-----\n")
    (root / "secret.txt").write_text("excluded by a pattern\n")
    (root / ".env").write_text("TOKEN=abc\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("ref\n")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "big.txt").write_text("x" * (1024 * 1024 + 10))
    os.symlink("/etc/hostname", root / "outside.txt")
    os.symlink(root / "good.txt", root / "inside-link.txt")
    os.mkfifo(root / "pipe.txt")
    locked = root / "locked.txt"
    locked.write_text("no access")
    locked.chmod(0)
    return root


def test_add_list_remove_round_trip_keeps_the_rest_of_the_settings(tmp_path):
    # Prepare: the settings file already holds someone else's keys
    home = tmp_path / "home"
    home.mkdir()
    settings_path(home).write_text("# computing preferences\nrun_on_batteries = false\n\n[network]\nup = 5\n")
    a, b = write_docs(tmp_path / "a", 0, 2), write_docs(tmp_path / "b", 1, 2)

    # Execute
    add_source(home, a, "notes", exclude=["*.key"], redact="email,phone")
    add_source(home, b)
    listed = read_sources(home)
    removed = remove_source(home, "notes")
    after = read_sources(home)

    # Assert
    assert [(s.name, s.path) for s in listed] == [("notes", str(a.resolve())), ("b", str(b.resolve()))]
    assert listed[0].exclude[-1] == "*.key" and ".*" in listed[0].exclude
    assert listed[0].redact == ["email", "phone"]
    assert removed.name == "notes" and [s.name for s in after] == ["b"]
    text = settings_path(home).read_text()
    assert text.startswith("# computing preferences\nrun_on_batteries = false\n\n[network]\nup = 5\n")
    assert text.count("[[sources]]") == 1


def test_registry_refuses_duplicates_missing_dirs_and_bad_names(tmp_path):
    home = tmp_path / "home"
    a = write_docs(tmp_path / "a", 0, 1)
    add_source(home, a, "notes")
    with pytest.raises(UserError, match="already registered"):
        add_source(home, a, "again")
    with pytest.raises(UserError, match="named 'notes' is already registered"):
        add_source(home, write_docs(tmp_path / "b", 0, 1), "notes")
    with pytest.raises(DataError, match="does not exist"):
        add_source(home, tmp_path / "missing")
    with pytest.raises(UserError, match="source name"):
        add_source(home, a, "../evil")
    with pytest.raises(UserError, match="no source named 'nope'"):
        remove_source(home, "nope")


def test_a_bad_settings_file_is_a_config_error_naming_the_key(tmp_path):
    settings_path(tmp_path).write_text('[[sources]]\nname = "x"\npath = "/tmp"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match=r"sources\[0\]\.colour: unknown key"):
        read_sources(tmp_path)
    settings_path(tmp_path).write_text('[[sources]]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"sources\[0\]\.path: expected a string"):
        read_sources(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files of mode 000")
def test_unreadable_file_is_skipped_and_listed(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "ok.txt").write_text("fine")
    (root / "locked.txt").write_text("no")
    (root / "locked.txt").chmod(0)
    scan = check_directory(root, 4096)
    assert ("locked.txt", "unreadable: Permission denied") in scan.skipped


def test_scan_reads_text_and_skips_and_lists_everything_else(tmp_path):
    # Prepare
    root = mixed_source(tmp_path / "src")

    # Execute
    scan = check_directory(root, 4096, exclude=["secret*"], max_file_mb=1.0)

    # Assert
    assert sorted(scan.files) == sorted(["good.txt", "inside-link.txt", "lines.jsonl", "sub/nested.md"]
                                        + (["locked.txt"] if os.geteuid() == 0 else []))
    reasons = dict(scan.skipped)
    assert reasons[".env"] == "excluded: matches '.*'"
    assert reasons[".git/"] == "excluded: matches '.*'"
    assert reasons["secret.txt"] == "excluded: matches 'secret*'"
    assert reasons["id_rsa.key"] == "not included: matches no include pattern"
    assert reasons["image.txt"] == "binary: contains NUL bytes"
    assert reasons["latin1.txt"].startswith("not UTF-8")
    assert reasons["empty.txt"] == "empty"
    assert reasons["big.txt"].startswith("too large: 1.0 MiB, over the 1 MiB cap")
    assert reasons["outside.txt"] == "symlink out of the source"
    assert reasons["pipe.txt"] == "not a regular file: device, FIFO or socket"
    assert scan.files["lines.jsonl"].bad_lines == 2
    texts = sorted(d.text for d in scan.documents)
    assert texts == sorted(["a plain note\n", "a plain note\n", "first", "second", "# nested\ntext\n"]
                           + (["no access"] if os.geteuid() == 0 else []))


def test_a_file_added_or_changed_is_picked_up_by_reading_only_that_file(tmp_path):
    # Prepare
    home, src = tmp_path / "home", write_docs(tmp_path / "src", 0, 5)
    add_source(home, src, "notes")
    feed = DocumentFeed(home, 4096)
    before = len(feed())

    # Execute
    unchanged = feed.refresh()
    (src / "new.txt").write_text("a new note")
    (src / "doc000.txt").write_text("rewritten")
    os.utime(src / "doc001.txt", ns=(1, 1))  # touched, same content
    change = feed.refresh()

    # Assert
    assert before == 5
    assert not unchanged.changed and unchanged.files_read == 0
    assert (change.files_added, change.files_changed, change.files_read) == (1, 1, 3)
    assert sorted(d.text for d in feed() if d.text in ("a new note", "rewritten")) == ["a new note", "rewritten"]
    index = json.loads((home / "sources" / "notes" / "index.json").read_text())
    assert set(index["files"]) == {f"doc{i:03d}.txt" for i in range(5)} | {"new.txt"}
    entry = index["files"]["new.txt"]
    assert entry["size"] == 10 and len(entry["sha256"]) == 64 and entry["documents"] == 1


def test_the_index_lets_a_new_process_report_without_reading(tmp_path):
    # Prepare
    home, src = tmp_path / "home", write_docs(tmp_path / "src", 0, 3)
    spec = add_source(home, src, "notes")
    DocumentFeed(home, 4096)()

    # Execute
    scanner = SourceScanner(spec, 4096)
    scanner.load_index(home / "sources" / "notes" / "index.json")
    scan = scanner.scan(need_documents=False)

    # Assert
    assert scan.read == 0 and len(scan.files) == 3 and scan.summary()["documents"] == 3


def test_redaction_counts_reach_the_ledger_and_no_positive_reaches_a_batch(tmp_path, tiny_config):
    # Prepare: documents full of things to redact
    from test_redact import POSITIVES
    src = tmp_path / "src"
    src.mkdir()
    positives = [t for texts in POSITIVES.values() for t in texts]
    for i, text in enumerate(positives):
        (src / f"p{i:02d}.txt").write_text(f"note {i}: {text} end of note {i}\n" + topic_text(i % 4, i, 300))
    home = tmp_path / "home"
    add_source(home, src, "pii")
    feed = DocumentFeed(home, tiny_config.data.max_doc_chars)
    docs = feed()
    config = RunConfig.from_dict(ONE_PATH_RUN)
    state = RunState.create(config, docs)
    session = PathSession(state, (0,), docs, torch.device("cpu"), home)

    # Execute: every batch the inner loop draws in 60 steps, and the whole token stream
    seen = []
    step = session.inner.step
    session.inner.step = lambda x, y: (seen.append(x.clone()), step(x, y))[1]
    session.inner_steps(20)
    stream = bytes(t for t in session.stream.tokens.tolist() if t < 256).decode("utf-8")

    # Assert
    counts = Ledger(home).source("pii")["redactions"]
    assert counts == {"card": 7, "email": 4, "ip": 7, "phone": 7, "secret": 10}
    for text in positives:
        assert text not in stream
    pattern = [ord(c) for c in "@example.com"]
    for x in seen:
        rows = x.tolist()
        for row in rows:
            assert not _contains(row, pattern)


def _contains(row, pattern) -> bool:
    n = len(pattern)
    return any(row[i:i + n] == pattern for i in range(len(row) - n + 1))


def _two_source_session(tmp_path):
    home = tmp_path / "home"
    add_source(home, write_docs(tmp_path / "a", 0, 6, 500), "a")
    add_source(home, write_docs(tmp_path / "b", 1, 6, 300), "b")
    config = RunConfig.from_dict(ONE_PATH_RUN)
    feed = DocumentFeed(home, config.data.max_doc_chars)
    state = RunState.create(config, feed())
    session = PathSession(state, (0,), feed(), torch.device("cpu"), home)
    return home, feed, session


def _attribute(session, x_rows):
    """Count, independently of the stream's own bookkeeping, which source each input token came
    from: find each window in the token stream, then the document its tokens belong to."""
    tokens = session.stream.tokens
    lengths = [len(ByteTokenizer().encode(d.text)) + 1 for d in session.stream.docs]
    owner = np.repeat([d.origin for d in session.stream.docs], lengths)
    counts: dict[str, int] = {}
    context = x_rows.shape[1]
    windows = tokens.unfold(0, context, 1)
    for row in x_rows:
        starts = torch.nonzero((windows == row).all(1)).flatten().tolist()
        assert len(starts) == 1
        for origin in owner[starts[0]:starts[0] + context]:
            counts[str(origin)] = counts.get(str(origin), 0) + 1
    return counts


def test_ledger_equals_the_tokens_the_inner_loop_consumed_and_survives_a_restart(tmp_path):
    # Prepare
    home, feed, session = _two_source_session(tmp_path)
    consumed = []
    step = session.inner.step
    session.inner.step = lambda x, y: (consumed.append(x.clone()), step(x, y))[1]

    # Execute: two rounds, each recorded at its boundary as the round driver does
    for round in (1, 2):
        feed.begin_round(session)
        session.inner_steps(STEPS)
        feed.end_round(session, round, seconds=1.5, averaged_modules=["stem"])
    restarted = Ledger(home).totals()

    # Assert
    x = torch.cat(consumed)
    expected = _attribute(session, x)
    assert restarted["tokens"] == x.numel() == 2 * STEPS * 4 * 32
    assert {k: v["tokens"] for k, v in restarted["sources"].items()} == expected
    assert restarted["rounds"] == 2 and restarted["hours"] == pytest.approx(3.0 / 3600)
    assert restarted["modules"]["stem"] == {"tokens": x.numel(), "rounds": 2, "averaged_rounds": 2}
    assert restarted["modules"]["L0.M0"]["averaged_rounds"] == 0
    a = restarted["sources"]["a"]
    assert (a["first_round"], a["last_round"], a["rounds"]) == (1, 2, 2)
    assert a["paths"]["0"]["tokens"] == a["tokens"]
    assert 1 <= a["documents"] <= 6
    used = Ledger(home).usage("a")["files"]
    assert sum(f["tokens"] for f in used.values()) == a["tokens"]
    assert all(Path(f).parent == (tmp_path / "a").resolve() for f in used)


def test_a_file_added_while_training_is_used_from_the_next_round(tmp_path):
    # Prepare
    home, feed, session = _two_source_session(tmp_path)
    session.inner_steps(STEPS)
    feed.end_round(session, 1, 1.0)

    # Execute: a new, long document arrives during round 2; round 3 may use it
    feed.begin_round(session)
    (tmp_path / "a" / "late.txt").write_text(topic_text(0, 99, 3000))
    session.inner_steps(STEPS)
    feed.end_round(session, 2, 1.0)
    changes = []
    for round in (3, 4, 5):
        changes.append(feed.begin_round(session))
        session.inner_steps(STEPS)
        feed.end_round(session, round, 1.0)

    # Assert
    assert [c.files_added for c in changes] == [1, 0, 0]
    late = Ledger(home).usage("a")["files"][str((tmp_path / "a").resolve() / "late.txt")]
    assert late["first_round"] == 3 and late["tokens"] > 0


def test_remove_stops_a_source_and_its_last_round_stays_fixed(tmp_path, cli):
    # Prepare
    home, feed, session = _two_source_session(tmp_path)
    for round in (1, 2):
        session.inner_steps(STEPS)
        feed.end_round(session, round, 1.0)

    # Execute: remove between rounds, then train three more rounds
    removed = cli("data", "remove", "b", "--home", home)
    for round in (3, 4, 5):
        feed.begin_round(session)
        session.inner_steps(STEPS)
        feed.end_round(session, round, 1.0)
    ledger = Ledger(home).totals()

    # Assert
    assert removed.exit_code == 0, removed.output
    assert "cannot be taken out" in removed.stdout
    b = ledger["sources"]["b"]
    assert (b["last_round"], b["removed_at_round"], b["open"]) == (2, 2, False)
    assert ledger["sources"]["a"]["last_round"] == 5
    assert all(d.origin == "a" for d in session.stream.docs)


def test_remove_during_a_round_counts_that_round_as_the_last(tmp_path):
    # Prepare
    home, feed, session = _two_source_session(tmp_path)
    session.inner_steps(STEPS)
    feed.end_round(session, 1, 1.0)

    # Execute: `data remove` lands while round 2 runs
    session.inner_steps(STEPS)
    remove_source(home, "b")
    Ledger(home).close_source("b", 1)
    feed.end_round(session, 2, 1.0)
    feed.begin_round(session)
    session.inner_steps(STEPS)
    feed.end_round(session, 3, 1.0)

    # Assert
    b = Ledger(home).source("b")
    assert (b["last_round"], b["removed_at_round"]) == (2, 2)


def test_without_sources_the_feed_uses_the_built_in_corpus_then_switches(tmp_path):
    # Prepare
    home = tmp_path / "home"
    feed = DocumentFeed(home, 4096)

    # Execute
    builtin = feed()
    add_source(home, write_docs(tmp_path / "a", 0, 3), "a")
    change = feed.refresh()

    # Assert
    assert builtin and all(d.origin == "built-in corpus" for d in builtin[:10])
    assert change.changed and change.sources_added == ["a"]
    assert {d.origin for d in feed()} == {"a"}


def test_a_missing_source_folder_is_skipped_at_a_round_boundary(tmp_path, caplog):
    home = tmp_path / "home"
    add_source(home, write_docs(tmp_path / "a", 0, 3), "a")
    add_source(home, write_docs(tmp_path / "b", 1, 3), "b")
    feed = DocumentFeed(home, 4096)
    feed()
    for f in (tmp_path / "b").iterdir():
        f.unlink()
    (tmp_path / "b").rmdir()
    change = feed.refresh()
    assert change.sources_removed == ["b"] and {d.origin for d in feed()} == {"a"}
    assert "is missing" in caplog.text


# ----------------------------------------------------------------------- CLI

def test_cli_add_list_show_check(cli, tmp_path, tiny_run_toml):
    # Prepare
    home = tmp_path / "home"
    src = write_docs(tmp_path / "notes", 0, 4)
    (src / "contact.txt").write_text("write to alice@example.com or call +1 415 555 2671\n")
    (src / "blob.txt").write_bytes(b"\x00\x01")

    # Execute
    added = cli("data", "add", src, "--name", "notes", "--home", home)
    trained = cli("train", "--steps", 2, "--device", "cpu", "--json", "--home", home, "--run-config", tiny_run_toml)
    listed = cli("data", "list", "--json", "--home", home, "--run-config", tiny_run_toml)
    listed_text = cli("data", "list", "--home", home, "--run-config", tiny_run_toml)
    shown = cli("data", "show", "notes", "--home", home)
    checked = cli("data", "check", src, "--json")

    # Assert
    assert added.exit_code == 0, added.output
    assert "added source 'notes'" in added.stdout and "email 1, phone 1" in added.stdout
    assert trained.exit_code == 0, trained.output
    report = json.loads(listed.stdout)
    (row,) = report["sources"]
    assert (row["name"], row["files"], row["documents"], row["skipped"]) == ("notes", 5, 5, 1)
    assert row["redactions"] == {"email": 1, "phone": 1}
    assert report["routed"] and sum(row["tokens_per_path"].values()) + row["heldout_tokens"] == row["tokens"]
    assert listed_text.exit_code == 0 and "training tokens per path" in listed_text.stdout
    assert shown.exit_code == 0, shown.output
    check = json.loads(checked.stdout)
    assert check["skipped_files"] == [{"file": "blob.txt", "reason": "binary: contains NUL bytes"}]
    assert check["redactions"] == {"email": 1, "phone": 1}


def test_cli_bad_input_is_one_error_line(cli, tmp_path):
    home = tmp_path / "home"
    assert_one_line_error(cli("data", "add", tmp_path / "missing", "--home", home), 4, f"{tmp_path / 'missing'}")
    assert_one_line_error(cli("data", "remove", "ghost", "--home", home), 2, "no source named 'ghost'")
    assert_one_line_error(cli("data", "show", "ghost", "--home", home), 2, "no source named 'ghost'")
    assert_one_line_error(cli("data", "check", tmp_path / "missing"), 4, f"{tmp_path / 'missing'} does not exist")
    assert_one_line_error(cli("data", "add", tmp_path, "--redact", "names", "--home", home), 2,
                          "--redact: unknown redaction kind 'names'")


def test_route_and_train_default_to_registered_sources(cli, tmp_path, tiny_run_toml):
    # Prepare
    home = tmp_path / "home"
    cli("data", "add", write_docs(tmp_path / "mine", 2, 12), "--name", "mine", "--home", home)
    train_tokens = sum(len(topic_text(2, i, 400).encode()) + 1 for i in range(12)) - \
        _heldout_tokens(tmp_path / "mine", 20.0)

    # Execute
    routed = cli("route", "--json", "--home", home, "--run-config", tiny_run_toml)

    # Assert: the router was fitted on (and routes) the 12 registered documents, not the built-in corpus
    assert routed.exit_code == 0, routed.output
    summary = json.loads(routed.stdout)
    assert summary["docs"] == 12
    assert sum(p["tokens"] for p in summary["paths"]) == train_tokens


def _heldout_tokens(directory, percent):
    from p2ptrain.data.corpus import Document, split_heldout
    docs = [Document(p.read_text(), str(p)) for p in sorted(directory.iterdir())]
    return sum(len(d.text.encode()) + 1 for d in split_heldout(docs, percent)[1])


def test_write_sources_output_reads_back(tmp_path):
    add_source(tmp_path, write_docs(tmp_path / 'we"ird name', 0, 1), "weird")
    specs = read_sources(tmp_path)
    write_sources(tmp_path, specs)
    assert read_sources(tmp_path) == specs
