"""The layout policy (pure): keep tp*pp, tp inside a node, dp follows the world, the global
batch is kept through gradient accumulation, spares wait, and a refusal is one sentence."""

from __future__ import annotations

import pytest

from elastickit.elastic.policy import (
    Layout,
    LayoutRequest,
    ModelLimits,
    NoLayoutError,
    choose_layout,
    parse_pins,
)

TINY = ModelLimits(tp_degrees=(1, 2, 4), max_pp=4, state_bytes=1000)


def _req(nodes, *, gb=24, mb=2, pins=(), previous=None, budget=None, limits=TINY):
    return LayoutRequest(
        nodes=tuple(nodes),
        global_batch=gb,
        micro_batch=mb,
        limits=limits,
        pins=tuple(pins),
        previous=previous,
        rank_budget_bytes=budget,
    )


@pytest.mark.parametrize(
    ("nodes", "layout", "grad_accum", "spares"),
    [
        ((1, 1, 1, 1), "pp=1,dp=4,tp=1", 3, ()),
        ((1, 1, 1), "pp=1,dp=3,tp=1", 4, ()),
        ((1, 1), "pp=1,dp=2,tp=1", 6, ()),
        ((1,), "pp=1,dp=1,tp=1", 12, ()),
        # 5 ranks: 12 microbatches do not split 5 ways; dp=4 and one hot spare.
        ((1, 1, 1, 1, 1), "pp=1,dp=4,tp=1", 3, (4,)),
    ],
)
def test_auto_shrinks_and_grows_dp_and_keeps_the_global_batch(nodes, layout, grad_accum, spares):
    choice = choose_layout(_req(nodes))
    assert choice.layout.text() == layout
    assert choice.grad_accum == grad_accum
    assert choice.layout.dp * choice.grad_accum * 2 == 24  # the global batch, every time
    assert choice.spares == spares
    assert len(choice.active) == choice.layout.world_size


def test_pinned_tp_keeps_tp_inside_a_node_and_lets_dp_follow():
    # Nodes of 2 ranks; node 1 lost one rank: its remaining rank cannot host a tp group.
    choice = choose_layout(_req((2, 1, 2), pins=(("tp", 2),)))
    assert choice.layout == Layout(pp=1, dp=2, tp=2)
    assert choice.active == (0, 1, 3, 4)
    assert choice.spares == (2,)
    # every tp group (consecutive pairs of active ranks) lies inside one node
    node_of = {0: 0, 1: 0, 2: 1, 3: 2, 4: 2}
    pairs = [choice.active[i : i + 2] for i in range(0, 4, 2)]
    assert all(node_of[a] == node_of[b] for a, b in pairs)


def test_previous_tp_times_pp_is_kept_while_it_works():
    prev = Layout(pp=1, dp=2, tp=2)
    choice = choose_layout(_req((2, 2, 2), previous=prev))
    assert (choice.layout.tp, choice.layout.pp) == (2, 1)
    assert choice.layout.dp == 3
    # Without a previous layout auto prefers pure data parallelism on the same ranks.
    assert choose_layout(_req((2, 2, 2))).layout == Layout(pp=1, dp=6, tp=1)


def test_previous_split_is_dropped_when_the_ranks_no_longer_allow_it():
    # tp=2 was used; only nodes of one rank are left: auto falls back to tp=1.
    choice = choose_layout(_req((1, 1, 1), previous=Layout(pp=1, dp=2, tp=2)))
    assert choice.layout == Layout(pp=1, dp=3, tp=1)


def test_memory_budget_forces_model_parallelism():
    limits = ModelLimits(tp_degrees=(1, 2), max_pp=2, state_bytes=8000)
    # 4 ranks of 1000 bytes: dp=4 alone gives 2000 per rank; tp=2 x dp=2... also 2000;
    # only pp*dp*tp = 8 would fit, so 4 ranks cannot hold it.
    with pytest.raises(NoLayoutError, match="do not fit 4 rank"):
        choose_layout(_req((2, 2), budget=1000, limits=limits))
    # 8 ranks in nodes of 2 hold it at 1000 bytes each.
    choice = choose_layout(_req((2, 2, 2, 2), budget=1000, limits=limits))
    assert choice.layout.world_size == 8


def test_pipeline_needs_a_microbatch_per_stage():
    limits = ModelLimits(tp_degrees=(1,), max_pp=4)
    choice = choose_layout(_req((1, 1, 1, 1), gb=8, mb=2, pins=(("pp", 2),), limits=limits))
    # 4 microbatches: dp=2 leaves 2 per rank, one per stage of pp=2.
    assert choice.layout == Layout(pp=2, dp=2, tp=1)
    assert choice.grad_accum == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": ()}, "no ranks are left"),
        ({"nodes": (1, 1), "pins": (("tp", 2),)}, "tp=2 needs 2 ranks inside one node, but no node has more than 1"),
        ({"nodes": (4,), "pins": (("tp", 3),)}, "cannot be split over 3 tensor-parallel ranks"),
        ({"nodes": (4,), "pins": (("pp", 9),)}, "only 4 layers"),
        ({"nodes": (1, 1), "pins": (("dp", 4),)}, "dp=4 cannot be kept on 2 rank"),
    ],
)
def test_refusals_are_one_sentence(kwargs, message):
    with pytest.raises(NoLayoutError) as e:
        choose_layout(_req(**kwargs))
    text = str(e.value)
    assert message in text
    assert "\n" not in text and text.count(". ") == 0


def test_parse_pins():
    assert parse_pins("auto") == {}
    assert parse_pins("tp=2") == {"tp": 2}
    assert parse_pins("pp=2, tp=2") == {"pp": 2, "tp": 2}
    for bad, msg in [("tp=2,tp=4", "twice"), ("ep=2", "not one of"), ("tp", "AXIS=N"), ("tp=0", "at least 1")]:
        with pytest.raises(ValueError, match=msg):
            parse_pins(bad)
    assert Layout.parse("pp=1,dp=3,tp=1").text() == "pp=1,dp=3,tp=1"


def test_bad_requests_are_value_errors():
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        _req((1,), gb=25, mb=2)
