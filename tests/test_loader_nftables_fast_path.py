"""The nftables loader's one-line fast path gives what its general statement path gives.

A line that holds one whole statement (no ';', at most one '{ … }' pair that opens no block) is
handed to the statement parser as it is; any other line goes token by token through the
general path, which splits statements at ';' and follows blocks and braces over lines. Ending
such a line with `` ;`` sends the same statement down the general path, so both must load to
the same ruleset, rule line numbers included, or fail with the same error.
"""
import copy

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bench.cluster.generate import generate
from bench.errors import InputError
from bench.loaders.nftables import apply, load
from bench.proxies.nftables import Syncer
from tests.builders import mutate_words


def through_general_path(text: str) -> str:
    """``text`` with every statement line ended by ``;`` (the same statements, split apart)."""
    return "\n".join(f"{line} ;" if line.strip() else line for line in text.split("\n"))


def fingerprint(ruleset) -> list:
    """Everything loaded, with each rule's line (which Rule's equality leaves out)."""
    return [(key, table.comment,
             [(chain, [(rule, rule.line) for rule in chain.rules]) for chain in table.chains.values()],
             list(table.sets.values()))
            for key, table in ruleset.tables.items()]


def outcome(text: str, base=None):
    try:
        return fingerprint(load(text, "rules.nft", base))
    except InputError as error:
        return ("error", error.message, error.where, error.field)


@pytest.mark.parametrize("mix, seed", [("realistic", 0), ("realistic", 3), ("clusterip", 1)])
def test_full_sync_loads_the_same_through_both_paths(mix, seed):
    text = Syncer().full(generate(60, 3, 5, seed=seed, mix=mix))
    assert "{" in text and "," in text  # the fast path also takes lines with a set or map in braces
    assert fingerprint(load(text)) == fingerprint(load(through_general_path(text)))


def test_partial_sync_applies_the_same_through_both_paths():
    syncer = Syncer()
    cluster = generate(60, 3, 5, seed=2)
    ruleset = load(syncer.full(cluster))
    partial = syncer.partial(generate(61, 4, 5, seed=2))
    other = copy.deepcopy(ruleset)
    changes = apply(partial, ruleset)
    assert changes == apply(through_general_path(partial), other)
    assert fingerprint(ruleset) == fingerprint(other)


BASE = Syncer().full(generate(8, 2, 3, seed=0))
BASE_LINES = [line for line in BASE.splitlines() if line.strip()]
WORDS = sorted({word for line in BASE_LINES for word in line.split()} | {
    "{", "}", ",", ":", ".", "@", "==", "!=", "vmap", "numgen", "mod", "0", "1", "65536", "1.2.3.4/33",
    "create", "destroy", "insert", "element", "map", "set", "chain", "table", "delete", "flush"})


@st.composite
def mutated_line(draw):
    """One of the full sync's lines with a few words changed (see tests.builders.mutate_words)."""
    return mutate_words(draw, BASE_LINES, st.integers(0, len(BASE_LINES) - 1), WORDS).splitlines()


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_line(), st.data())
def test_a_changed_line_loads_or_fails_the_same_through_both_paths(lines, data):
    changed = [i for i, line in enumerate(lines) if line != BASE_LINES[i]]
    assume(changed)
    # Up to and including a changed line: a ';' added inside an open brace would change the statement.
    last = data.draw(st.sampled_from(changed))
    line = lines[last]
    assume(line.count("{") == line.count("}") <= 1 and '"' not in line and "#" not in line)
    prefix = "\n".join(lines[:last])
    assert outcome(f"{prefix}\n{line}\n") == outcome(f"{prefix}\n{line} ;\n")


def test_a_loop_behind_chains_already_cleared_is_still_found():
    # The loop search skips chains that lead only to chains proven to be on no loop (leaf, e);
    # c leads to e (cleared) and to d, which closes the loop.
    text = ("add table ip t\nadd chain ip t leaf\nadd chain ip t e\nadd chain ip t c\nadd chain ip t d\n"
            "add rule ip t e jump leaf\nadd rule ip t c jump e\nadd rule ip t c jump d\nadd rule ip t d goto c\n")
    with pytest.raises(InputError, match="chain loop c -> d -> c") as error:
        load(text, "rules.nft")
    assert error.value.where == "rules.nft:8"
    assert load(text.replace("goto c", "goto leaf")).table("t", "ip").chains["d"].rules
