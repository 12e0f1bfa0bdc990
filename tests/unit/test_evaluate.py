"""Routed evaluation: every held-out token is scored exactly once, and the mixture loss
is the token-weighted mean over paths."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from p2ptrain.train.evaluate import EvalReport, PathEval, document_loss, evaluate, heldout_by_path
from p2ptrain.train.session import PathSession, build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("length", [2, 20, 33, 97, 100])
def test_document_loss_scores_every_next_token_once(tiny_run_state, length):
    # Prepare: context is 32 in the tiny run
    model = build_model(tiny_run_state, (0, 0))
    tokens = torch.randint(0, 257, (length,), generator=torch.Generator().manual_seed(length))

    # Execute
    total, count = document_loss(model, tokens, 32, CPU)

    # Assert
    assert count == length - 1
    assert total / count == pytest.approx(math.log(257), abs=0.3)  # untrained: near-uniform over bytes


def test_document_within_one_window_is_scored_like_a_plain_forward_pass(tiny_run_state):
    # Prepare
    model = build_model(tiny_run_state, (1, 1))
    tokens = torch.randint(0, 257, (25,), generator=torch.Generator().manual_seed(0))

    # Execute
    total, count = document_loss(model, tokens, 32, CPU)

    # Assert
    logits, _ = model(tokens[None, :-1])
    expected = F.cross_entropy(logits[0].float(), tokens[1:], reduction="sum").item()
    assert count == 24
    assert total == pytest.approx(expected, rel=1e-5)


def test_mixture_loss_is_token_weighted_and_untrained_paths_count_at_init():
    # Prepare
    report = EvalReport([
        PathEval("0,0", docs=3, tokens=100, loss=2.0, init_loss=5.0, round=4),
        PathEval("0,1", docs=1, tokens=300, loss=None, init_loss=6.0, round=None),
        PathEval("1,0", docs=0, tokens=0, loss=math.nan, init_loss=math.nan, round=None),
    ])

    # Execute
    result = report.to_dict()

    # Assert
    assert result["mixture_loss"] == pytest.approx((2.0 * 100 + 6.0 * 300) / 400)
    assert result["mixture_init_loss"] == pytest.approx((5.0 * 100 + 6.0 * 300) / 400)
    assert result["untrained_paths"] == 1


def test_heldout_documents_are_routed_to_the_paths_of_the_grid(tiny_run_state, stdlib_docs):
    # Execute
    by_path = heldout_by_path(tiny_run_state, stdlib_docs)

    # Assert
    assert list(by_path) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    routed = [d for docs in by_path.values() for d in docs]
    assert len(routed) == len(set(routed)) > 0
    for number, docs in enumerate(by_path.values()):
        assert all(r == number for r in tiny_run_state.router.route([d.text for d in docs]))


def test_evaluate_uses_the_newest_checkpoint_of_a_path(tiny_run_state, stdlib_docs, tmp_path):
    # Prepare
    session = PathSession(tiny_run_state, (0, 0), stdlib_docs, CPU, tmp_path)
    session.inner_steps(20)
    session.make_local_global()
    session.round = 1
    session.save_checkpoint()

    # Execute
    report = evaluate(tiny_run_state, stdlib_docs, [tmp_path], CPU, max_tokens_per_path=2048)

    # Assert
    by_name = {p.path: p for p in report.paths}
    assert by_name["0,0"].round == 1
    assert by_name["0,0"].loss < by_name["0,0"].init_loss - 0.5
    assert [by_name[p].round for p in ("0,1", "1,0", "1,1")] == [None, None, None]
    assert report.untrained_paths == 3
    assert all(p.tokens <= 2048 for p in report.paths)


def test_report_of_a_path_without_heldout_tokens_is_strict_json():
    # Prepare
    report = EvalReport([
        PathEval("0,0", docs=2, tokens=50, loss=3.0, init_loss=5.5, round=1),
        PathEval("0,1", docs=0, tokens=0, loss=math.nan, init_loss=math.nan, round=1),
    ])

    # Execute
    text = json.dumps(report.to_dict(), allow_nan=False)

    # Assert
    paths = json.loads(text)["paths"]
    assert (paths[1]["loss"], paths[1]["init_loss"], paths[1]["round"]) == (None, None, 1)
    assert (paths[0]["loss"], paths[0]["init_loss"]) == (3.0, 5.5)
