"""The quick form of the mutation check (tests/mutations.py): every listed mutation still applies to the code,
and each cheap one is caught by the tests named for it."""
from __future__ import annotations

import pytest

from tests.mutations import MUTATIONS, _copy_tree, check_applies, run_one


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutation_applies_to_the_code(mutation):
    check_applies(mutation)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    copy = tmp_path_factory.mktemp("mutants") / "tree"
    _copy_tree(copy)
    return copy


@pytest.mark.parametrize("mutation", [m for m in MUTATIONS if m.quick], ids=[m.name for m in MUTATIONS if m.quick])
def test_quick_mutation_is_killed(mutation, tree):
    survived, _ = run_one(mutation, tree)
    assert not survived, f"{mutation.name} survives {', '.join(mutation.tests)}"
