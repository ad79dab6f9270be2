"""The resharding language: constructors, TOML/JSON round trips, matching, errors, flat, experts."""

from __future__ import annotations

import pytest
import torch
from elastickit.checkpoint.format.manifest import LayoutRecord
from elastickit.reshard.layout import ParallelLayout
from elastickit.reshard.rules import (
    RuleError,
    RuleSet,
    expert,
    flat,
    fused,
    load_rules,
    pad,
    rename,
    replicate,
    rule,
    shard,
)

pytestmark = pytest.mark.timeout(30)

TOML = """
[[rule]]
match = ["model/*.wqkv.weight", "optim/state/*.wqkv.weight/exp_avg*"]
ops = [
  {op = "shard", dim = 0, axis = "tp"},
  {op = "fused", dim = 0, parts = [["q", 8], ["k", 4], ["v", 4]]},
]

[[rule]]
match = "model/tok_embeddings.weight"
ops = [{op = "pad", dim = 0, size = 10, multiple = 4, axis = "tp"}, {op = "shard", dim = 0, axis = "tp"}]

[[rule]]
match = "model/*norm*"
ops = [{op = "replicate", axis = "tp", merge = "check"}]

[[rule]]
match = "model/layers.*"
ops = [{op = "rename", src = 'layers\\.(?P<i>\\d+)', dst = "layers.{i}", axis = "pp", num_layers = 5}]
"""


def test_toml_json_round_trip(tmp_path):
    p = tmp_path / "rules.toml"
    p.write_text(TOML)
    rs = load_rules(str(p))
    assert len(rs.rules) == 4
    again = RuleSet.from_json(rs.to_json())
    assert again == rs
    assert rs.match("optim/state/layers.0.wqkv.weight/exp_avg_sq") is rs.rules[0]
    assert rs.match("model/layers.1.attention_norm.weight") is rs.rules[2]  # first match wins
    assert rs.match("model/output.weight") is None


def test_python_constructors_equal_toml(tmp_path):
    p = tmp_path / "rules.toml"
    p.write_text(TOML)
    py = RuleSet(
        (
            rule(
                ["model/*.wqkv.weight", "optim/state/*.wqkv.weight/exp_avg*"],
                shard(0, "tp"),
                fused(0, {"q": 8, "k": 4, "v": 4}),
            ),
            rule("model/tok_embeddings.weight", pad(0, 10, multiple=4, axis="tp"), shard(0, "tp")),
            rule("model/*norm*", replicate("tp", merge="check")),
            rule(
                "model/layers.*",
                rename(r"layers\.(?P<i>\d+)", "layers.{i}", axis="pp", num_layers=5),
            ),
        )
    )
    assert py == load_rules(str(p))


def pieces(rs, layout, rank, name, t):
    return rs.piece_rule(ParallelLayout.parse(layout).to_record(), rank)(name, t)


def test_fused_gqa_pieces_on_tp_rank():
    rs = RuleSet((rule("w", shard(0, "tp"), fused(0, {"q": 8, "k": 4, "v": 4})),))
    ps, specs = pieces(rs, "tp=2", 1, "w", torch.zeros(8, 3))
    assert [(p.logical, p.offsets, p.lengths, p.stored_offsets) for p in ps] == [
        ("w:q", (4, 0), (4, 3), (0, 0)),
        ("w:k", (2, 0), (2, 3), (4, 0)),
        ("w:v", (2, 0), (2, 3), (6, 0)),
    ]
    assert [(s.name, s.shape) for s in specs] == [("w:q", (8, 3)), ("w:k", (4, 3)), ("w:v", (4, 3))]


def test_padding_dropped_and_merge_recorded():
    rs = RuleSet(
        (
            rule("e", pad(0, 10, multiple=4, axis="tp"), shard(0, "tp")),
            rule("n", replicate("tp", "average")),
        )
    )
    ps, specs = pieces(
        rs, "tp=2", 1, "e", torch.zeros(8, 2)
    )  # padded to 16: rank 1 holds rows 8..16
    assert [(p.offsets, p.lengths) for p in ps] == [((8, 0), (2, 2))]
    assert specs[0].shape == (10, 2)
    _, specs = pieces(rs, "tp=2", 0, "n", torch.zeros(3))
    assert specs[0].merge == "average"


def test_pipeline_rename_and_experts():
    rs = RuleSet(
        (
            rule(
                "model/layers.*",
                rename(r"layers\.(?P<i>\d+)", "layers.{i}", axis="pp", num_layers=5),
            ),
            rule("moe/experts.*", expert("ep", num_local=2)),
            rule("moe/stacked", expert("ep")),
        )
    )
    # 5 layers over pp=2: stage 0 has 3, stage 1 starts at layer 3
    ps, _ = pieces(rs, "pp=2", 1, "model/layers.1.w", torch.zeros(2))
    assert ps[0].logical == "model/layers.4.w"
    ps, _ = pieces(rs, "ep=2", 1, "moe/experts.1.w", torch.zeros(2))
    assert ps[0].logical == "moe/experts.3.w"
    ps, specs = pieces(rs, "ep=2", 1, "moe/stacked", torch.zeros(2, 5))
    assert ps[0].offsets == (2, 0) and specs[0].shape == (4, 5)


def test_flat_zero_buffer_maps_to_flattened_params():
    rs = RuleSet((rule("flat", flat([("a", (2, 3)), ("b", (5,))], zero=2, axis="dp", align=2)),))
    # 11 elements padded to 12 (align 2 * dp 2): rank 1 holds elements 6..12
    ps, specs = pieces(rs, "dp=2", 1, "flat", torch.zeros(6))
    assert [(p.logical, p.offsets, p.lengths, p.stored_offsets) for p in ps] == [
        ("b", (0,), (5,), (0,))
    ]
    ps, _ = pieces(rs, "dp=2", 0, "flat", torch.zeros(6))
    assert [(p.logical, p.offsets, p.lengths) for p in ps] == [("a", (0,), (6,))]
    assert [(s.name, s.shape) for s in specs] == [("a", (6,)), ("b", (5,))]


@pytest.mark.parametrize(
    "ruleset, t, message",
    [
        (
            RuleSet((rule("w", shard(0, "tp"), fused(0, {"q": 8, "k": 4})),)),
            torch.zeros(5, 2),
            r"rule 'w' does not fit tensor 'w': fused parts add up to 12 but dim 0 has 10",
        ),
        (
            RuleSet((rule("w", shard(2, "tp")),)),
            torch.zeros(5, 2),
            r"rule 'w' does not fit tensor 'w': shard.dim 2",
        ),
        (
            RuleSet((rule("w", pad(0, 9, multiple=4), shard(0, "tp")),)),
            torch.zeros(4, 2),
            r"rule 'w' does not fit tensor 'w': dim 0 has 8 rows but pad\(size=9, multiple=4\) pads to 12",
        ),
        (
            RuleSet((rule("w", shard(0, "tp"), fused(0, {"q": 3, "k": 3})),)),
            torch.zeros(3, 2),
            r"fused parts \['q', 'k'\] do not split into 2 equal shards",
        ),
    ],
)
def test_rule_that_does_not_fit_names_both(ruleset, t, message):
    with pytest.raises(RuleError, match=message):
        pieces(ruleset, "tp=2", 0, "w", t)


@pytest.mark.parametrize(
    "data, message",
    [
        ([{"ops": []}], "rule 0 needs a 'match'"),
        ([{"match": "x", "ops": [{"op": "explode"}]}], "'op' must be one of"),
        (
            [{"match": "x", "ops": [{"op": "shard", "dim": 0, "axis": "zz"}]}],
            "shard.axis must be one of",
        ),
        (
            [{"match": "x", "ops": [{"op": "shard", "dim": 0, "axis": "tp", "size": 3}]}],
            r"shard has no field\(s\) \['size'\]",
        ),
        (
            [{"match": "x", "ops": [{"op": "replicate", "axis": "tp", "merge": "max"}]}],
            "replicate.merge must be one of",
        ),
    ],
)
def test_malformed_rules(data, message):
    with pytest.raises(RuleError, match=message):
        RuleSet.from_json(data)


def test_bad_toml_file(tmp_path):
    with pytest.raises(RuleError, match="does not exist"):
        load_rules(str(tmp_path / "nope.toml"))
    (tmp_path / "r.toml").write_text("[[rules]]\nmatch='x'\n")
    with pytest.raises(RuleError, match=r"unknown top-level key\(s\) \['rules'\]"):
        load_rules(str(tmp_path / "r.toml"))


def test_record_of_world_axis():
    rs = RuleSet((rule("w", shard(0, "dp")),))
    ps, _ = rs.piece_rule(LayoutRecord(axes=(("world", 2),)), 1)("w", torch.zeros(3))
    assert ps[0].offsets == (3,)
