"""Search on the shipped model: the same seed gives the same trees with or without prefix reuse, and the
reuse shows up in the ledger."""

from __future__ import annotations

import pytest

from treeward import SHIPPED_POLICY
from treeward.engine.hf import HFPolicy
from treeward.search import beam_search, best_of_n
from treeward.tasks import ArithmeticSteps, generate_problems


@pytest.fixture(scope="module")
def problems():  # type: ignore[no-untyped-def]
    return generate_problems(3, 3, seed=1)


def _tokens(trees):  # type: ignore[no-untyped-def]
    return [[(n.parent, n.token_ids) for n in t.nodes] for t in trees]


@pytest.mark.parametrize("algorithm", [beam_search, best_of_n])
def test_same_trees_with_and_without_prefix_reuse(problems, algorithm) -> None:  # type: ignore[no-untyped-def]
    cached = HFPolicy.from_pretrained(SHIPPED_POLICY)
    plain = HFPolicy.from_pretrained(SHIPPED_POLICY, prefix_cache=False)
    a = algorithm(problems, cached, ArithmeticSteps(), 400, seed=3)
    b = algorithm(problems, plain, ArithmeticSteps(), 400, seed=3)
    assert _tokens(a) == _tokens(b)
    for ta, tb in zip(a, b, strict=True):
        for na, nb in zip(ta.nodes, tb.nodes, strict=True):
            assert na.logprobs == pytest.approx(nb.logprobs, abs=1e-4)
        assert ta.ledger["generated"] == tb.ledger["generated"] == ta.generated_tokens
        # the same work, booked differently: computed + reused is what no cache would compute
        assert ta.ledger["computed"] + ta.ledger["reused"] == tb.ledger["computed"]
        assert tb.ledger["reused"] == 0
    assert cached.ledger.total.computed < plain.ledger.total.computed
