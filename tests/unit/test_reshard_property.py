"""Property tests of the resharding language: random logical tensors, rules and layout pairs.

Every rank of a layout is simulated in one process (`elastickit.virtual`: the real writer and commit
protocol, a thread per virtual rank). Physical tensors are built explicitly from the logical ones
(fused GQA [q_r; k_r; v_r], vocabulary padding, column shards, stacked experts, pipeline-local
layer names, a nested ZeRO-style dp split), so that "A -> B equals slicing the logical tensors for
B directly" is checked against an independent construction.
"""

from __future__ import annotations

import pytest
import torch
from elastickit.checkpoint.errors import DataError
from elastickit.reshard.layout import ParallelLayout
from elastickit.reshard.offline import reshard_checkpoint
from elastickit.reshard.rules import RuleSet, expert, fused, pad, rename, replicate, rule, shard
from elastickit.virtual import load_virtual, save_virtual
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(240)

LAYOUTS = [
    ParallelLayout(),
    ParallelLayout(tp=2),
    ParallelLayout(dp=2),
    ParallelLayout(tp=4),
    ParallelLayout(dp=2, tp=2),
    ParallelLayout(pp=2),
    ParallelLayout(pp=2, tp=2),
    ParallelLayout(ep=2),
    ParallelLayout(dp=3),
    ParallelLayout(pp=2, ep=2, tp=2),
]


def stage_layers(L: int, pp: int, s: int) -> range:
    base, extra = divmod(L, pp)
    start = s * base + min(s, extra)
    return range(start, start + base + (1 if s < extra else 0))


class Model:
    """Random logical tensors and their explicit per-rank physical construction."""

    def __init__(
        self,
        *,
        d: int,
        D: int,
        H: int,
        K: int,
        V: int,
        L: int,
        E: int,
        F: int,
        dtype,
        seed: int,
        merge: str,
    ):
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
        self.dims = {"d": d, "D": D, "H": H, "K": K, "V": V, "L": L, "E": E, "F": F}
        self.merge = merge
        self.logical: dict[str, torch.Tensor] = {
            "model/emb": rnd(V, D),
            "model/experts": rnd(E, F, D),
        }
        for i in range(L):
            self.logical[f"model/layers.{i}.wqkv:q"] = rnd(H * d, D)
            self.logical[f"model/layers.{i}.wqkv:k"] = rnd(K * d, D)
            self.logical[f"model/layers.{i}.wqkv:v"] = rnd(K * d, D)
            self.logical[f"model/layers.{i}.wo"] = rnd(D, H * d)
            self.logical[f"model/layers.{i}.norm"] = rnd(D)

    def rules(self) -> RuleSet:
        m = self.dims
        ren = rename(r"layers\.(?P<i>\d+)", "layers.{i}", axis="pp", num_layers=m["L"])
        return RuleSet(
            (
                rule(
                    "model/layers.*.wqkv",
                    ren,
                    shard(0, "tp"),
                    shard(0, "dp"),
                    fused(0, {"q": m["H"] * m["d"], "k": m["K"] * m["d"], "v": m["K"] * m["d"]}),
                ),
                rule("model/layers.*.wo", ren, shard(1, "tp")),
                rule("model/layers.*.norm", ren, replicate("tp", self.merge)),
                rule("model/emb", pad(0, m["V"], multiple=4, axis="tp"), shard(0, "tp")),
                rule("model/experts", expert("ep")),
            )
        )

    def physical(
        self, lay: ParallelLayout, rank: int, *, norm_delta: bool = False
    ) -> dict[str, torch.Tensor]:
        c, lg, m = lay.coords(rank), self.logical, self.dims
        tp, r = lay.tp, c["tp"]
        out = {}
        if c["pp"] == 0:
            V, D = m["V"], m["D"]
            unit = 4 * tp
            Vp = -(-V // unit) * unit
            padded = torch.zeros(Vp, D, dtype=lg["model/emb"].dtype)
            padded[:V] = lg["model/emb"]
            out["model/emb"] = padded.chunk(tp)[r].clone()
        out["model/experts"] = lg["model/experts"].chunk(lay.ep)[c["ep"]].clone()
        for j, i in enumerate(stage_layers(m["L"], lay.pp, c["pp"])):
            q, k, v = (lg[f"model/layers.{i}.wqkv:{p}"] for p in "qkv")
            block = torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]])
            out[f"model/layers.{j}.wqkv"] = block.chunk(lay.dp)[c["dp"]].clone()
            out[f"model/layers.{j}.wo"] = lg[f"model/layers.{i}.wo"].chunk(tp, dim=1)[r].clone()
            norm = lg[f"model/layers.{i}.norm"].clone()
            out[f"model/layers.{j}.norm"] = norm + r if norm_delta else norm
        return out


def empty_like_all(ts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in ts.items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, w in want.items():
        assert torch.equal(got[k], w), f"{what}: {k} differs"


dims = st.fixed_dictionaries(
    {
        "d": st.sampled_from([1, 2]),
        "D": st.integers(1, 5),
        "H": st.sampled_from([4, 8]),
        "K": st.just(4),
        "V": st.integers(5, 23),
        "L": st.integers(2, 3),
        "E": st.just(4),
        "F": st.integers(1, 3),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
        "seed": st.integers(0, 2**16),
    }
)


def divides(m: Model, lay: ParallelLayout) -> bool:
    d = m.dims
    block = (d["H"] + 2 * d["K"]) * d["d"] // lay.tp
    return lay.tp <= d["K"] and block % lay.dp == 0 and lay.pp <= d["L"]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(dims=dims, a=st.sampled_from(LAYOUTS), b=st.sampled_from(LAYOUTS))
def test_a_to_b_is_slicing_and_back_is_bit_exact(tmp_path_factory, dims, a, b):
    m = Model(**dims, merge="first")
    assume(divides(m, a) and divides(m, b))
    rules = m.rules()
    root = str(tmp_path_factory.mktemp("ck"))
    save_virtual(root + "/a", 1, a, [m.physical(a, r) for r in range(a.world_size)], rules)
    loaded_b = []
    for r in range(b.world_size):
        want = m.physical(b, r)
        got = empty_like_all(want)
        load_virtual(root + "/a/step-00000001", b, r, got, rules)
        assert_same(got, want, f"{a} -> {b} rank {r}")
        loaded_b.append(got)
    save_virtual(root + "/b", 2, b, loaded_b, rules)
    for r in range(a.world_size):
        want = m.physical(a, r)
        got = empty_like_all(want)
        load_virtual(root + "/b/step-00000002", a, r, got, rules)
        assert_same(got, want, f"{a} -> {b} -> {a} rank {r}")


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(dims=dims, a=st.sampled_from(LAYOUTS), b=st.sampled_from(LAYOUTS))
def test_offline_reshard_equals_slicing(tmp_path_factory, dims, a, b):
    m = Model(**dims, merge="first")
    assume(divides(m, a) and divides(m, b) and b.pp == 1)  # offline output keeps global names
    rules = m.rules()
    root = str(tmp_path_factory.mktemp("ck"))
    save_virtual(root + "/a", 3, a, [m.physical(a, r) for r in range(a.world_size)], rules)
    out = reshard_checkpoint(root + "/a/step-00000003", root + "/b", b, rules, fsync=False)
    assert out.world_size == b.world_size and out.step == 3
    for r in range(b.world_size):
        want = m.physical(b, r)
        got = empty_like_all(want)
        load_virtual(root + "/b/step-00000003", b, r, got, rules)
        assert_same(got, want, f"offline {a} -> {b} rank {r}")


@pytest.mark.parametrize(
    "a, b",
    [(ParallelLayout(tp=2, dp=2), ParallelLayout(tp=4)), (ParallelLayout(tp=4), ParallelLayout())],
)
def test_merge_average_and_check(tmp_path, a, b):
    dims_ = {
        "d": 1,
        "D": 3,
        "H": 4,
        "K": 4,
        "V": 7,
        "L": 2,
        "E": 4,
        "F": 2,
        "dtype": torch.float64,
        "seed": 1,
    }
    m = Model(**dims_, merge="average")
    save_virtual(
        str(tmp_path / "avg"),
        1,
        a,
        [m.physical(a, r, norm_delta=True) for r in range(a.world_size)],
        m.rules(),
    )
    for r in range(b.world_size):
        got = empty_like_all(m.physical(b, r))
        load_virtual(str(tmp_path / "avg/step-00000001"), b, r, got, m.rules())
        for i in range(2):  # copies were norm + tp coordinate, over every holder
            assert torch.allclose(
                got[f"model/layers.{i}.norm"], m.logical[f"model/layers.{i}.norm"] + (a.tp - 1) / 2
            )
    m = Model(**dims_, merge="check")
    save_virtual(
        str(tmp_path / "ok"), 1, a, [m.physical(a, r) for r in range(a.world_size)], m.rules()
    )
    got = empty_like_all(m.physical(b, 0))
    load_virtual(str(tmp_path / "ok/step-00000001"), b, 0, got, m.rules())
    assert torch.equal(got["model/layers.0.norm"], m.logical["model/layers.0.norm"])
    save_virtual(
        str(tmp_path / "bad"),
        1,
        a,
        [m.physical(a, r, norm_delta=True) for r in range(a.world_size)],
        m.rules(),
    )
    with pytest.raises(DataError, match="replicas of 'model/layers.0.norm' differ"):
        load_virtual(
            str(tmp_path / "bad/step-00000001"), b, 0, empty_like_all(m.physical(b, 0)), m.rules()
        )


def test_a_model_larger_than_the_checkpoint_is_named_plainly(tmp_path):
    """Was: `'model/0.weight' wants rows up to 64 of 'model/0.weight' whose global shape is
    [32, 16]` (issue 13 item 16)."""
    from elastickit.checkpoint.format.directory import load_manifest
    from elastickit.checkpoint.errors import DataError
    from elastickit.checkpoint.format.items import Piece
    from elastickit.reshard.planner import plan_reads

    import elastickit as ek

    with ek.Checkpointer(str(tmp_path)) as ck:
        ck.save(1, {"model": torch.nn.Sequential(torch.nn.Linear(16, 32))})
    manifest = load_manifest(str(tmp_path / "step-00000001"))
    tail = (
        "but the checkpoint's 'model/0.weight' has shape [32, 16]: they are different models "
        "(size or config); restore into the model that saved the checkpoint, or check the "
        "model's config and the rules"
    )
    with pytest.raises(DataError) as e:
        plan_reads(manifest, [("model/0.weight", (Piece.whole("model/0.weight", (0, 0), (64, 16)),))])
    assert str(e.value) == (
        "the model's tensor 'model/0.weight' needs elements [0:64, 0:16], so a shape of at least "
        f"[64, 16], {tail}"
    )
    box = Piece(logical="model/0.weight", offsets=(32, 0), lengths=(32, 16), stored_offsets=(0, 0))
    with pytest.raises(DataError) as e:
        plan_reads(manifest, [("model/0.weight", (box,))], who="rank 1 of tp=2")
    assert str(e.value).startswith(
        "on rank 1 of tp=2, the target tensor 'model/0.weight' needs elements [32:64, 0:16]"
    )
    with pytest.raises(DataError) as e:
        plan_reads(manifest, [("model/0.weight", (Piece.whole("model/0.weight", (0,), (512,)),))])
    assert str(e.value) == f"the model's tensor 'model/0.weight' is 1-dimensional ([0:512]), {tail}"
    # and a restore into the larger model says the same
    with pytest.raises(DataError) as e:
        ek.Checkpointer(str(tmp_path)).restore({"model": torch.nn.Sequential(torch.nn.Linear(16, 64))})
    assert "the model's tensor 'model/0.weight' has shape [64, 16] (F32), but in" in str(e.value)
    assert "it has shape [32, 16] (F32): they are different models" in str(e.value)
