"""Data: documents from directories and .jsonl, splitting long texts, the held-out split,
byte tokens and training windows."""

import logging
import random

import pytest
import torch

from p2ptrain.data.batches import TokenStream
from p2ptrain.data.corpus import Document, default_corpus_dir, load_documents, split_heldout, split_text
from p2ptrain.data.tokenizer import ByteTokenizer, load_tokenizer
from p2ptrain.errors import ConfigError, DataError

NUMBERED_DOCS = [Document(f"document {i}\n", f"d{i}") for i in range(2000)]


# ------------------------------------------------------------ held-out split

def test_heldout_split_takes_about_the_asked_share_by_content_hash():
    # Execute
    counts = {p: len(split_heldout(NUMBERED_DOCS, p)[1]) for p in (0.0, 5.0, 10.0, 50.0)}

    # Assert: sha256 buckets, so the counts are the same on every machine
    assert counts == {0.0: 0, 5.0: 97, 10.0: 181, 50.0: 982}


def test_heldout_split_is_deterministic_and_independent_of_document_order():
    # Prepare
    shuffled = list(NUMBERED_DOCS)
    random.Random(0).shuffle(shuffled)

    # Execute
    train_a, held_a = split_heldout(NUMBERED_DOCS, 10.0)
    train_b, held_b = split_heldout(shuffled, 10.0)

    # Assert
    assert set(held_a) == set(held_b) and set(train_a) == set(train_b)
    assert len(train_a) + len(held_a) == 2000 and not set(train_a) & set(held_a)
    assert split_heldout(NUMBERED_DOCS, 10.0) == (train_a, held_a)


def test_heldout_split_depends_on_text_not_on_source():
    # Prepare
    renamed = [Document(d.text, "elsewhere") for d in NUMBERED_DOCS]

    # Execute
    _, held_a = split_heldout(NUMBERED_DOCS, 10.0)
    _, held_b = split_heldout(renamed, 10.0)

    # Assert
    assert [d.text for d in held_a] == [d.text for d in held_b]


def test_heldout_percent_counts_in_hundredths_without_float_truncation():
    # Prepare: "document 1969" hashes to bucket 229 of 10000, "document 3542" to bucket 230
    at_229 = Document("document 1969", "a")
    at_230 = Document("document 3542", "b")

    # Execute
    _, held = split_heldout([at_229, at_230], 2.3)  # 2.3 * 100 is 229.99999999999997 in floats

    # Assert: buckets 0..229 are held out
    assert held == [at_229]


# ------------------------------------------------------------------ splitting

def test_short_text_is_one_piece_and_blank_text_none():
    # Execute / Assert
    assert split_text("hello\n", 256) == ["hello\n"]
    assert split_text("  \n\n", 256) == []


def test_split_text_respects_max_chars_and_loses_nothing_on_real_source():
    # Prepare
    text = (default_corpus_dir() / "argparse.py").read_text()

    # Execute
    pieces = split_text(text, 1000)

    # Assert
    assert len(text) > 50_000
    assert all(0 < len(p) <= 1000 for p in pieces)
    assert "".join(pieces) == text
    assert len(pieces) >= len(text) // 1000


def test_split_text_prefers_blank_line_boundaries():
    # Prepare: paragraphs of 5 lines x 20 chars = 100 chars each, then a blank line
    paragraph = "".join(f"line {i:02d}".ljust(19, ".") + "\n" for i in range(5))
    text = "\n".join([paragraph] * 10)

    # Execute
    pieces = split_text(text, 256)

    # Assert: a piece is closed at the first blank line past half of max_chars
    assert len(paragraph) == 100
    assert pieces[0] == paragraph + "\n" + paragraph
    assert all(p.startswith("\n") for p in pieces[1:])
    assert "".join(pieces) == text


def test_split_text_cuts_one_enormous_line():
    # Prepare
    text = "a" * 10_000 + "\nshort tail\n"

    # Execute
    pieces = split_text(text, 4096)

    # Assert
    assert [len(p) for p in pieces] == [4096, 4096, 1808 + 1 + 11]
    assert "".join(pieces) == text


# --------------------------------------------------------------------- loading

def test_loads_text_files_of_known_suffixes_in_sorted_order(tmp_path):
    # Prepare
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "a.md").write_text("# a\n")
    (tmp_path / "sub" / "c.py").write_text("print('c')\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty.txt").write_text("   \n")

    # Execute
    docs = load_documents([tmp_path], 4096)

    # Assert
    assert [d.text for d in docs] == ["# a\n", "bee\n", "print('c')\n"]
    assert [d.source for d in docs] == [str(tmp_path / "a.md"), str(tmp_path / "b.txt"),
                                        str(tmp_path / "sub" / "c.py")]


def test_long_files_are_split_into_documents_of_max_doc_chars(tmp_path):
    # Prepare
    (tmp_path / "long.txt").write_text("".join(f"line {i:04d}\n" for i in range(1000)))  # 10 000 chars

    # Execute
    docs = load_documents([tmp_path], 1000)

    # Assert
    assert len(docs) == 10
    assert all(len(d.text) == 1000 for d in docs)


def test_jsonl_skips_bad_lines_with_one_warning(tmp_path, caplog):
    # Prepare
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first doc"}\n'
                    'not json at all\n'
                    '\n'
                    '{"title": "no text field"}\n'
                    '{"text": 42}\n'
                    '["text"]\n'
                    '{"text": "second doc", "id": 7}\n')
    caplog.set_level(logging.WARNING, logger="p2ptrain.data.corpus")

    # Execute
    docs = load_documents([path], 4096)

    # Assert
    assert [(d.text, d.source) for d in docs] == [("first doc", f"{path}:1"), ("second doc", f"{path}:7")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipped 4 lines that are not JSON objects with a string 'text' field"]


def test_missing_data_directory_is_a_data_error(tmp_path):
    # Execute
    with pytest.raises(DataError) as excinfo:
        load_documents([tmp_path / "nope"], 4096)

    # Assert
    assert str(excinfo.value) == f"data directory {tmp_path / 'nope'} does not exist"
    assert excinfo.value.exit_code == 4


def test_directory_without_documents_is_a_data_error(tmp_path):
    # Prepare
    (tmp_path / "notes.csv").write_text("a,b\n")

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_documents([tmp_path], 4096)

    # Assert
    assert str(excinfo.value).startswith(f"no documents found in {tmp_path}: expected non-empty .txt")


def test_default_corpus_is_python_stdlib_source_and_stops_near_the_char_budget(stdlib_docs):
    # Assert: the fixture asked for 400 000 characters, whole files at a time
    total = sum(len(d.text) for d in stdlib_docs)
    assert 400_000 <= total < 400_000 + 2_000_000
    assert all(len(d.text) <= 4096 for d in stdlib_docs)
    assert all(d.source.startswith(str(default_corpus_dir())) for d in stdlib_docs)
    assert not any("/site-packages/" in d.source or "/test/" in d.source for d in stdlib_docs)


# ------------------------------------------------------- tokens and batches

def test_byte_tokenizer_round_trips_unicode_and_skips_eos():
    # Prepare
    tokenizer = ByteTokenizer()
    text = "naïve café → 字"

    # Execute
    ids = tokenizer.encode(text)

    # Assert
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(list(ids) + [tokenizer.eos_id]) == text
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)


def test_unknown_tokenizer_is_a_config_error(tmp_path):
    # Execute / Assert
    with pytest.raises(ConfigError, match="data.tokenizer: .* is neither 'bytes' nor an existing tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_token_stream_joins_documents_with_eos():
    # Prepare
    docs = [Document("ab", "1"), Document("c", "2")]

    # Execute
    stream = TokenStream(docs, ByteTokenizer())

    # Assert
    assert stream.tokens.tolist() == [97, 98, 256, 99, 256]
    assert len(stream) == 5 and stream.num_docs == 2


def test_samples_are_windows_with_next_token_targets():
    # Prepare
    stream = TokenStream([Document("".join(chr(65 + i % 26) for i in range(500)), "x")], ByteTokenizer())

    # Execute
    x, y = stream.sample(4, 16, torch.Generator().manual_seed(0))

    # Assert
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x:  # each window is a contiguous slice of the stream
        start = int(row[0]) - 65
        assert row.tolist() == [65 + (start + j) % 26 for j in range(16)]


def test_samples_are_reproducible_from_the_generator_seed():
    # Prepare
    stream = TokenStream([Document("x" * 100 + "y" * 100, "x")], ByteTokenizer())

    # Execute
    a = stream.sample(3, 8, torch.Generator().manual_seed(5))
    b = stream.sample(3, 8, torch.Generator().manual_seed(5))

    # Assert
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_too_short_shard_is_a_data_error():
    # Prepare
    stream = TokenStream([Document("short", "x")], ByteTokenizer())  # 6 tokens with EOS

    # Execute
    with pytest.raises(DataError) as excinfo:
        stream.sample(1, 16, torch.Generator().manual_seed(0))

    # Assert
    assert str(excinfo.value).startswith("this shard has only 6 tokens; need more than 17")
