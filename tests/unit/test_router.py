"""The router: fitted deterministically from the run seed, a pure function of a
document's text, serialisable, and balanced across paths."""

import json

import numpy as np
import pytest

from p2ptrain.config import RouterConfig
from p2ptrain.data.corpus import Document, split_heldout
from p2ptrain.errors import DataError
from p2ptrain.model.router import Router, document_weights, hashed_ngram_features, shard_shares
from p2ptrain.run_state import RunState

FAST = RouterConfig(kmeans_iters=10)


def test_fitting_twice_with_the_same_seed_gives_the_same_router(stdlib_docs):
    # Prepare
    texts = [d.text for d in stdlib_docs]

    # Execute
    a = Router.fit(texts, 4, FAST, seed=0)
    b = Router.fit(texts, 4, FAST, seed=0)

    # Assert
    assert a.to_dict() == b.to_dict()
    assert a.fingerprint() == b.fingerprint()


def test_another_seed_fits_another_router(stdlib_docs):
    # Prepare
    texts = [d.text for d in stdlib_docs]

    # Execute
    a = Router.fit(texts, 4, FAST, seed=0)
    b = Router.fit(texts, 4, FAST, seed=1)

    # Assert
    assert a.fingerprint() != b.fingerprint()


def test_routing_is_a_pure_function_of_the_text(tiny_run_state, stdlib_docs):
    # Prepare
    router = tiny_run_state.router
    texts = [d.text for d in stdlib_docs[:50]]

    # Execute
    alone = [int(router.route([t])[0]) for t in texts]
    batched = router.route(texts)
    reversed_batch = router.route(texts[::-1])[::-1]

    # Assert
    assert alone == batched.tolist() == reversed_batch.tolist()
    assert batched.dtype == np.int64 and set(alone) <= {0, 1, 2, 3}


def test_router_round_trips_through_json(tiny_run_state, stdlib_docs):
    # Prepare
    router = tiny_run_state.router
    texts = [d.text for d in stdlib_docs]

    # Execute
    restored = Router.from_dict(json.loads(json.dumps(router.to_dict())))

    # Assert
    assert restored.to_dict() == router.to_dict()
    assert restored.fingerprint() == router.fingerprint()
    assert np.array_equal(restored.route(texts), router.route(texts))


def test_run_state_round_trips_through_json(tiny_run_state):
    # Execute
    restored = RunState.from_json(tiny_run_state.to_json())

    # Assert
    assert restored.fingerprint() == tiny_run_state.fingerprint()
    assert restored.config == tiny_run_state.config


def test_disjoint_topics_each_get_a_path_of_their_own(make_topic_text):
    # Prepare: 4 topics x 10 documents, interleaved
    texts = [make_topic_text(topic, i) for i in range(10) for topic in range(4)]

    # Execute
    router = Router.fit(texts, 4, RouterConfig(), seed=0)
    routes = router.route(texts).reshape(10, 4)  # row: document index, column: topic

    # Assert
    assert all((routes[:, topic] == routes[0, topic]).all() for topic in range(4))
    assert sorted(routes[0].tolist()) == [0, 1, 2, 3]
    assert shard_shares(routes.ravel(), 4).tolist() == [0.25, 0.25, 0.25, 0.25]


def test_router_balances_real_documents_across_four_paths(stdlib_docs):
    # Prepare: fit on 70 % of the documents, route the 30 % it never saw as well
    fit_docs, unseen_docs = split_heldout(stdlib_docs, 30.0)

    # Execute
    router = Router.fit([d.text for d in fit_docs], 4, RouterConfig(), seed=0)
    fit_texts, unseen_texts = [d.text for d in fit_docs], [d.text for d in unseen_docs]
    fit_shares = shard_shares(router.route(fit_texts), 4, document_weights(fit_texts))
    unseen_shares = shard_shares(router.route(unseen_texts), 4, document_weights(unseen_texts))

    # Assert: the fit tunes every path's token share into (1 +- 0.1) / 4; the ~50 unseen documents
    # (up to 4096 characters each) are too few for a tight share, but starve no path
    assert fit_shares.sum() == pytest.approx(1.0)
    assert fit_shares.min() >= 0.225 - 1e-9 and fit_shares.max() <= 0.275 + 1e-9
    assert unseen_shares.min() >= 0.1


def test_router_balances_tokens_when_long_documents_cluster(make_topic_text):
    # Prepare: topic 0 writes documents ten times as long as the others (as long texts cluster in
    # natural corpora), so balancing document counts would give its path ~3/4 of the tokens
    texts = [make_topic_text(topic, i, 3000 if topic == 0 else 300) for i in range(40) for topic in range(4)]
    weights = document_weights(texts)

    # Execute
    shares = shard_shares(Router.fit(texts, 4, RouterConfig(), seed=0).route(texts), 4, weights)
    topic0_share = weights[0::4].sum() / weights.sum()

    # Assert
    assert topic0_share > 0.75
    assert shares.min() >= 0.225 - 1e-9 and shares.max() <= 0.275 + 1e-9


def test_one_path_router_sends_everything_to_path_zero(stdlib_docs):
    # Prepare
    texts = [d.text for d in stdlib_docs[:20]]

    # Execute
    router = Router.fit(texts, 1, FAST, seed=0)

    # Assert
    assert router.route(texts).tolist() == [0] * 20


def test_routing_no_documents_gives_an_empty_assignment(tiny_run_state):
    # Execute
    routes = tiny_run_state.router.route([])

    # Assert
    assert routes.shape == (0,)
    assert shard_shares(routes, 4).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_features_are_unit_rows_and_only_the_prefix_counts():
    # Prepare
    head = "def main():\n    return 0\n"

    # Execute
    x = hashed_ngram_features([head, head + "x" * 500, "ab"], prefix_chars=len(head), ngram=3, features=64)

    # Assert
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0)
    assert np.array_equal(x[0], x[1])
    assert x.dtype == np.float32 and x.shape == (3, 64)


def test_fitting_a_run_on_fewer_documents_than_paths_is_a_data_error(tiny_config, make_topic_text):
    # Prepare
    docs = [Document(make_topic_text(0, i), f"doc{i}") for i in range(3)]

    # Execute
    with pytest.raises(DataError) as excinfo:
        RunState.create(tiny_config, docs)

    # Assert
    assert "need at least 4 training documents" in str(excinfo.value)
