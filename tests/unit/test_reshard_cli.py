"""`elastickit reshard` (dry run and real) and `elastickit convert` through the CLI."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from elastickit.reshard.layout import ParallelLayout
from elastickit.reshard.rules import RuleSet, fused, replicate, rule, shard
from elastickit.virtual import load_virtual, save_virtual
from typer.testing import CliRunner

from elastickit.cli.main import app

pytestmark = pytest.mark.timeout(60)

RULES = RuleSet(
    (
        rule("model/w", shard(0, "dp")),
        rule("model/qkv", shard(0, "dp"), fused(0, {"q": 12, "k": 6, "v": 6})),
        rule("model/norm", replicate("dp")),
    )
)
Q, K, V = torch.randn(12, 3), torch.randn(6, 3), torch.randn(6, 3)
W, NORM = torch.randn(12, 2), torch.randn(5)


def physical(lay: ParallelLayout, r: int) -> dict[str, torch.Tensor]:
    n = lay.dp
    return {
        "model/w": W.chunk(n)[r].clone(),
        "model/qkv": torch.cat([Q.chunk(n)[r], K.chunk(n)[r], V.chunk(n)[r]]),
        "model/norm": NORM.clone(),
    }


def test_dry_run_4_to_3_ranks_reads_no_tensor_bytes(tmp_path):
    rules = RuleSet((rule("model/w", shard(0, "dp")), rule("model/norm", replicate("dp"))))
    src = ParallelLayout(dp=4)
    states = [{"model/w": W.chunk(4)[r].clone(), "model/norm": NORM.clone()} for r in range(4)]
    save_virtual(str(tmp_path / "s"), 5, src, states, rules)
    ck = tmp_path / "s" / "step-00000005"
    for f in os.listdir(ck):  # the dry run must not touch tensor bytes: remove them all
        if f.endswith(".safetensors"):
            os.remove(ck / f)
    res = CliRunner().invoke(app, ["reshard", str(ck), "--to", "dp=3", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert [r["rank"] for r in plan["ranks"]] == [0, 1, 2]
    # rank 1 of 3 needs rows 4..8 of w: rows 4,5 live on source rank 1 and 6,7 on source rank 2
    r1 = plan["ranks"][1]
    assert r1["files"] == [
        "rank-00000.safetensors",
        "rank-00001.safetensors",
        "rank-00002.safetensors",
    ]
    assert r1["bytes_needed"] == 4 * 2 * 4 + 5 * 4
    assert r1["peak_bytes"] >= r1["target_bytes"] > 0
    text = CliRunner().invoke(app, ["reshard", str(ck), "--to", "dp=3", "--dry-run"])
    assert text.exit_code == 0 and "dry run" in text.output and "dp=2" in text.output


def test_reshard_4_to_3_writes_a_loadable_checkpoint(tmp_path):
    rules = RuleSet((rule("model/w", shard(0, "dp")), rule("model/norm", replicate("dp"))))
    states = [{"model/w": W.chunk(4)[r].clone(), "model/norm": NORM.clone()} for r in range(4)]
    save_virtual(str(tmp_path / "s"), 5, ParallelLayout(dp=4), states, rules)
    res = CliRunner().invoke(
        app, ["reshard", str(tmp_path / "s"), str(tmp_path / "d"), "--to", "dp=3"]
    )
    assert res.exit_code == 0, res.output
    # a new root holding the source's step, as `convert` writes (DST/step-<step>/)
    assert os.listdir(tmp_path / "d") == ["step-00000005"]
    assert f"resume with --ckpt {tmp_path / 'd'}" in res.output
    man = json.loads((tmp_path / "d" / "step-00000005" / "manifest.json").read_text())
    assert man["world_size"] == 3 and sorted(man["files"]) == [
        f"rank-0000{i}.safetensors" for i in range(3)
    ]
    for r in range(3):
        got = {"model/w": torch.zeros(4, 2), "model/norm": torch.zeros(5)}
        load_virtual(str(tmp_path / "d" / "step-00000005"), ParallelLayout(dp=3), r, got, rules)
        assert torch.equal(got["model/w"], W.chunk(3)[r]) and torch.equal(got["model/norm"], NORM)


def test_reshard_bad_layout_exit_2(tmp_path):
    res = CliRunner().invoke(app, ["reshard", str(tmp_path), "--to", "xp=3", "--dry-run"])
    assert res.exit_code == 2
    assert "unknown layout axis 'xp'" in res.output


def test_convert_round_trip_through_dcp_and_safetensors(tmp_path):
    from safetensors.torch import load_file

    lay = ParallelLayout(dp=3)
    save_virtual(
        str(tmp_path / "s"),
        9,
        lay,
        [physical(lay, r) for r in range(3)],
        RULES,
        objects={"model": {"w": {"__tensor__": "model/w"}}, "meta": {"lr": 0.5}},
    )
    run = CliRunner().invoke
    assert (
        run(app, ["convert", str(tmp_path / "s"), str(tmp_path / "dcp"), "--to", "dcp"]).exit_code
        == 0
    )
    import torch.distributed.checkpoint as dcp

    sd = {"model": {"w": torch.zeros(12, 2), "qkv:k": torch.zeros(6, 3)}}
    dcp.load(sd, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert torch.equal(sd["model"]["w"], W) and torch.equal(sd["model"]["qkv:k"], K)
    res = run(
        app,
        [
            "convert",
            str(tmp_path / "dcp"),
            str(tmp_path / "hf"),
            "--to",
            "safetensors",
            "--max-shard-size",
            "100B",
        ],
    )
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"w", "qkv:q", "qkv:k", "qkv:v", "norm"}
    assert len(set(index["weight_map"].values())) > 1  # 100-byte shards: several files
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(str(tmp_path / "hf" / f)))
    assert torch.equal(got["qkv:q"], Q) and torch.equal(got["norm"], NORM)
    res = run(
        app,
        [
            "convert",
            str(tmp_path / "dcp"),
            str(tmp_path / "ek"),
            "--from",
            "dcp",
            "--to",
            "elastickit",
        ],
    )
    assert res.exit_code == 0, res.output
    from elastickit.reshard.adapters.native import ElastickitSource

    src = ElastickitSource(str(tmp_path / "ek"))
    assert torch.equal(src.read("model/qkv:v"), V)
    assert src.objects()["meta"] == {"lr": 0.5}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_dcp_metadata_refuses_foreign_classes(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ".metadata").write_bytes(pickle.dumps(Evil()))
    res = CliRunner().invoke(
        app,
        [
            "convert",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--from",
            "dcp",
            "--to",
            "safetensors",
        ],
    )
    assert res.exit_code == 1
    assert "refusing to unpickle" in res.output and "posix.system" in res.output


def test_convert_unknown_formats(tmp_path):
    (tmp_path / "src").mkdir()
    src, dst = str(tmp_path / "src"), str(tmp_path / "o")
    res = CliRunner().invoke(app, ["convert", src, dst])
    assert res.exit_code == 2 and "not a checkpoint of any known format" in res.output
    res = CliRunner().invoke(app, ["convert", src, dst, "--to", "onnx"])
    assert res.exit_code == 2


def test_hf_model_to_elastickit_restores_into_a_module(tmp_path):
    from safetensors.torch import save_file

    import elastickit as ek

    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    (tmp_path / "hf").mkdir()
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()},
        str(tmp_path / "hf" / "model.safetensors"),
    )
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "hf"), str(tmp_path / "ek")])
    assert res.exit_code == 0 and "(safetensors)" in res.output, res.output
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with ek.Checkpointer(str(tmp_path / "ek")) as ck:
        assert ck.restore({"model": dst}) == 0
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # an uncommitted elastickit step directory is not mistaken for a model
    (tmp_path / "raw").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "raw" / "rank-00000.safetensors"))
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "raw"), str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a checkpoint of any known format" in res.output


def test_convert_stores_rules_for_a_later_reshard(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "hf").mkdir()
    save_file({"w": W.clone(), "norm": NORM.clone()}, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "r.toml").write_text(
        '[[rule]]\nmatch = "model/w"\nops = [{op = "shard", dim = 0, axis = "dp"}]\n'
    )
    args = [
        "convert",
        str(tmp_path / "hf"),
        str(tmp_path / "ek"),
        "--rules",
        str(tmp_path / "r.toml"),
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    res = CliRunner().invoke(
        app, ["reshard", str(tmp_path / "ek"), "--to", "dp=4", "--dry-run", "--json"]
    )
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert [r["bytes_needed"] for r in plan["ranks"]] == [
        3 * 2 * 4 + 5 * 4
    ] * 4  # w split, norm whole
    bad = CliRunner().invoke(
        app, [*args[:2], str(tmp_path / "x"), "--rules", str(tmp_path / "r.toml"), "--to", "dcp"]
    )
    assert bad.exit_code == 2 and "--rules is stored with --to elastickit only" in bad.output


def test_dcp_round_trip_keeps_the_step_and_the_rules(tmp_path):
    """elastickit -> DCP -> elastickit came back as step 0 with no rules (issue 13 item 8)."""
    import torch.distributed.checkpoint as dcp

    lay = ParallelLayout(dp=3)
    objects = {"model": {"w": {"__tensor__": "model/w"}}, "meta": {"lr": 0.5}}
    save_virtual(str(tmp_path / "s"), 9, lay, [physical(lay, r) for r in range(3)], RULES, objects=objects)
    run = CliRunner().invoke
    assert run(app, ["convert", str(tmp_path / "s"), str(tmp_path / "dcp"), "--to", "dcp"]).exit_code == 0
    # DCP itself reads the entries (and a load that does not ask for them still works)
    sd = {"model": {"w": torch.zeros(12, 2)}, "elastickit": {"step": 0, "rules": ""}}
    dcp.load(sd, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert sd["elastickit"]["step"] == 9 and json.loads(sd["elastickit"]["rules"]) == RULES.to_json()
    res = run(app, ["convert", str(tmp_path / "dcp"), str(tmp_path / "ek")])
    assert res.exit_code == 0, res.output
    assert os.listdir(tmp_path / "ek") == ["step-00000009"]
    man = json.loads((tmp_path / "ek" / "step-00000009" / "manifest.json").read_text())
    assert man["step"] == 9 and man["rules"] == RULES.to_json()
    assert "elastickit" not in man["objects"] and man["objects"]["meta"] == {"lr": 0.5}
    # and the rules drive a later reshard as they did on the source
    res = run(app, ["reshard", str(tmp_path / "ek"), "--to", "dp=2", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    # w split over dp=2 (6x2 fp32 each); the parts of qkv, stored apart now, and norm whole
    assert [r["bytes_needed"] for r in plan["ranks"]] == [6 * 2 * 4 + (12 + 6 + 6) * 3 * 4 + 5 * 4] * 2


def test_convert_to_safetensors_says_what_it_left_out(tmp_path):
    """144 tensors -> 39 without a word (issue 13 item 18)."""
    import elastickit as ek

    m = torch.nn.Linear(4, 3)
    o = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 4)).sum().backward()
    o.step()
    with ek.Checkpointer(str(tmp_path / "ck")) as ck:
        ck.save(7, {"model": m, "optim": o})
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "safetensors"])
    assert res.exit_code == 0, res.output
    assert (
        "note: left out 6 of 8 tensors (optim/: 6) and the step: a Hugging Face safetensors model "
        "holds the model weights only; use --to elastickit or --to dcp to keep the optimizer state"
    ) in res.output
    assert "2 tensors" in res.output
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "ck"), str(tmp_path / "d"), "--to", "dcp"])
    assert res.exit_code == 0 and "left out" not in res.output
