"""The contribution ledger: exact sums, survives restarts, atomic, corrupt files kept aside."""

import json
import multiprocessing as mp

import pytest

from p2ptrain.data.ledger import Ledger


def _round(ledger, round, tokens=100, path="1,0", sources=None, averaged=("stem",)):
    ledger.record_round("run-a", path, round, ["stem", "L0.M1", "L1.M0"], tokens, 2.0,
                        tokens_by_source=sources, docs_by_source={k: 1 for k in (sources or {})},
                        averaged_modules=list(averaged))


def test_rounds_add_up_per_module_path_and_source(tmp_path):
    # Prepare
    ledger = Ledger(tmp_path)

    # Execute
    _round(ledger, 1, 100, sources={"notes": 60, "mail": 40})
    _round(ledger, 2, 50, sources={"notes": 50})
    _round(ledger, 3, 30, path="0,0", sources={"mail": 30}, averaged=())
    totals = ledger.totals()

    # Assert
    assert totals["tokens"] == 180 and totals["rounds"] == 3
    assert totals["rounds_averaged"] == 2  # round 3 averaged with nobody
    assert totals["hours"] == pytest.approx(6.0 / 3600)
    assert totals["modules"]["stem"] == {"tokens": 180, "rounds": 3, "averaged_rounds": 2}
    assert totals["modules"]["L0.M1"]["tokens"] == 180
    notes, mail = totals["sources"]["notes"], totals["sources"]["mail"]
    assert (notes["tokens"], notes["rounds"], notes["first_round"], notes["last_round"]) == (110, 2, 1, 2)
    assert (mail["tokens"], mail["rounds"], mail["first_round"], mail["last_round"]) == (70, 2, 1, 3)
    assert mail["paths"]["1,0"]["tokens"] == 40 and mail["paths"]["0,0"]["tokens"] == 30
    assert totals["runs"]["run-a"]["paths"]["1,0"] == {"tokens": 150, "rounds": 2, "first_round": 1,
                                                        "last_round": 2}


def test_the_ledger_survives_a_restart(tmp_path):
    # Prepare
    _round(Ledger(tmp_path), 1, 123, sources={"notes": 123})

    # Execute: a new process would construct a new Ledger on the same home
    _round(Ledger(tmp_path), 2, 7, sources={"notes": 7})

    # Assert
    totals = Ledger(tmp_path).totals()
    assert totals["tokens"] == 130 and totals["sources"]["notes"]["tokens"] == 130
    assert not list(tmp_path.glob("*.tmp*"))


def test_rounds_averaged_count_rounds_where_any_module_averaged_with_a_peer(tmp_path):
    # Prepare / Execute: one module averaged, two modules averaged, none
    ledger = Ledger(tmp_path)
    _round(ledger, 1, averaged=("stem",))
    _round(ledger, 2, averaged=("stem", "L0.M1"))
    _round(ledger, 3, averaged=())

    # Assert: 3 rounds run, 2 of them averaged; per module as before
    totals = ledger.totals()
    assert (totals["rounds"], totals["rounds_averaged"]) == (3, 2)
    assert [totals["modules"][m]["averaged_rounds"] for m in ("stem", "L0.M1", "L1.M0")] == [2, 1, 0]


def test_a_ledger_written_before_rounds_averaged_reads_its_best_module_as_the_count(tmp_path):
    # Prepare: what an older p2ptrain wrote (no top-level rounds_averaged)
    _round(Ledger(tmp_path), 1, averaged=("stem",))
    _round(Ledger(tmp_path), 2, averaged=("L0.M1",))
    old = json.loads((tmp_path / "ledger.json").read_text())
    del old["rounds_averaged"]
    (tmp_path / "ledger.json").write_text(json.dumps(old))

    # Execute: read it, then record one more averaged round
    before = Ledger(tmp_path).totals()
    _round(Ledger(tmp_path), 3, averaged=("stem",))

    # Assert: a lower bound (1; the truth is 2), never more; counting goes on from there
    assert before["rounds_averaged"] == 1 and before["rounds"] == 2
    assert Ledger(tmp_path).totals()["rounds_averaged"] == 2
    assert not list(tmp_path.glob("ledger.json.corrupt-*"))


def test_the_summary_is_what_a_node_publishes_in_its_peer_record(tmp_path):
    # Prepare
    ledger = Ledger(tmp_path)
    assert ledger.summary() == {"tokens": 0, "rounds": 0, "rounds_averaged": 0, "hours": 0.0}  # no file yet
    _round(ledger, 1, 100, averaged=("stem",))
    _round(ledger, 2, 60, averaged=())

    # Execute / Assert: two rounds of 2 s each
    assert ledger.summary() == {"tokens": 160, "rounds": 2, "rounds_averaged": 1, "hours": 4.0 / 3600}


def test_tokens_by_source_must_sum_to_the_round_tokens(tmp_path):
    with pytest.raises(ValueError, match="sum to 5"):
        Ledger(tmp_path).record_round("r", "0,0", 1, ["stem"], 6, 1.0, tokens_by_source={"a": 5})


def test_closing_a_source_fixes_its_last_round(tmp_path):
    # Prepare
    ledger = Ledger(tmp_path)
    _round(ledger, 1, sources={"notes": 100})

    # Execute
    ledger.close_source("notes", 1)
    _round(ledger, 2, sources={"other": 100})
    notes = ledger.source("notes")

    # Assert
    assert notes["open"] is False and notes["removed_at_round"] == 1 and notes["last_round"] == 1
    assert notes["tokens"] == 100


def test_a_corrupt_ledger_is_kept_aside_and_a_new_one_started(tmp_path, caplog):
    # Prepare
    (tmp_path / "ledger.json").write_text("{not json")

    # Execute
    totals = Ledger(tmp_path).totals()
    _round(Ledger(tmp_path), 1, 10)

    # Assert
    assert totals["tokens"] == 0
    aside = list(tmp_path.glob("ledger.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == "{not json"
    assert "unreadable" in caplog.text
    assert json.loads((tmp_path / "ledger.json").read_text())["tokens"] == 10


def test_a_ledger_with_wrong_types_is_treated_as_corrupt(tmp_path):
    (tmp_path / "ledger.json").write_text(json.dumps({"format": 1, "tokens": "many"}))
    assert Ledger(tmp_path).totals()["tokens"] == 0
    assert list(tmp_path.glob("ledger.json.corrupt-*"))


def test_files_and_documents_used_are_kept_per_source(tmp_path):
    # Prepare
    ledger = Ledger(tmp_path)

    # Execute
    ledger.record_round("r", "0,0", 1, ["stem"], 30, 1.0, tokens_by_source={"notes": 30},
                        docs_by_source={"notes": 2}, files_by_source={"notes": {"a.txt": 20, "b.txt": 10}},
                        documents_by_source={"notes": ["d1", "d2"]})
    ledger.record_round("r", "0,0", 2, ["stem"], 5, 1.0, tokens_by_source={"notes": 5},
                        docs_by_source={"notes": 1}, files_by_source={"notes": {"a.txt": 5}},
                        documents_by_source={"notes": ["d1"]})

    # Assert
    usage = ledger.usage("notes")
    assert usage["files"]["a.txt"] == {"tokens": 25, "first_round": 1, "last_round": 2}
    assert usage["files"]["b.txt"] == {"tokens": 10, "first_round": 1, "last_round": 1}
    assert ledger.source("notes")["documents"] == 2


def _writer(home, n):
    ledger = Ledger(home)
    for i in range(n):
        ledger.record_round("r", "0,0", i, ["stem"], 1, 0.0, tokens_by_source={"s": 1})


def test_concurrent_writers_lose_no_update(tmp_path):
    # Execute: two processes record 40 rounds each on the same home
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, 40)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)

    # Assert
    assert [p.exitcode for p in procs] == [0, 0]
    assert Ledger(tmp_path).totals()["tokens"] == 80
