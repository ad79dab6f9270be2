"""The reference decoder: fused layouts, vocab padding, layout-independent init, layouts."""

from __future__ import annotations

import pytest
import torch

from elastickit.trainer.model import (
    CONFIGS,
    ModelConfig,
    Transformer,
    fused_from_tp_order,
    fused_parts,
    fused_to_tp_order,
    init_weights,
    model_config,
    padded_vocab,
)
from elastickit.trainer.parallel import TrainLayout, stage_layers

pytestmark = pytest.mark.timeout(60)


def test_fused_tp_order_gives_each_rank_its_q_k_v_rows() -> None:
    cfg = CONFIGS["tiny"]  # H=4, K=2, d=8: q 32 rows, k 16, v 16
    sizes = [n for _, n in fused_parts(cfg)["attention.wqkv.weight"]]
    assert sizes == [32, 16, 16]
    logical = torch.arange(64.0)[:, None].expand(64, 3).clone()
    phys = fused_to_tp_order(logical, sizes, tp=2)
    local1 = phys.chunk(2)[1][:, 0].tolist()  # what Shard(0) hands tp rank 1
    assert local1 == list(range(16, 32)) + list(range(40, 48)) + list(range(56, 64))
    assert torch.equal(fused_from_tp_order(phys, sizes, tp=2), logical)
    assert torch.equal(fused_to_tp_order(logical, sizes, tp=1), logical)


def test_vocab_padding_and_init_do_not_depend_on_tp() -> None:
    cfg = CONFIGS["tiny"]
    assert padded_vocab(cfg, 1) == 256 and padded_vocab(cfg, 4) == 256
    assert padded_vocab(model_config("small"), 2) % 128 == 0
    m1 = Transformer(cfg, tp=1)  # Vp 256
    m3 = Transformer(ModelConfig(**{**_fields(cfg), "vocab_multiple": 96}), tp=1)  # Vp 288
    for m in (m1, m3):
        init_weights(m, seed=3)
    emb1, emb3 = m1.tok_embeddings.weight, m3.tok_embeddings.weight
    assert emb3.shape[0] == 288
    assert torch.equal(emb1[:250], emb3[:250])
    assert torch.count_nonzero(emb3[250:]) == 0 and torch.count_nonzero(m3.output.weight[250:]) == 0
    tokens = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    assert m1(tokens).shape == (2, 8, 250)
    torch.testing.assert_close(m1(tokens), m3(tokens), rtol=0, atol=0)


def _fields(cfg: ModelConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_configs_and_gqa_checks() -> None:
    assert CONFIGS["tiny"].n_kv_heads < CONFIGS["tiny"].n_heads
    small = sum(p.numel() for p in Transformer(model_config("small")).parameters())
    assert 90e6 < small < 110e6
    with pytest.raises(ValueError, match="n_heads must be a multiple of n_kv_heads"):
        ModelConfig(
            vocab_size=10, dim=12, n_layers=1, n_heads=3, n_kv_heads=2, ffn_hidden=8, max_seq_len=8
        )
    with pytest.raises(ValueError, match=r"n_kv_heads \(2\) is not divisible by tp=4"):
        CONFIGS["tiny"].check_tp(4)
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        model_config("huge")


def test_moe_model_runs_and_routes() -> None:
    m = Transformer(model_config("tiny-moe"))
    init_weights(m, seed=0)
    names = {n for n, _ in m.named_parameters()}
    assert (
        "layers.0.feed_forward.experts.w13" in names
        and "layers.0.feed_forward.router.weight" in names
    )
    loss = m(torch.randint(0, 250, (2, 8))).logsumexp(-1).mean()
    loss.backward()
    assert m.layers["0"].feed_forward.experts.w13.grad.abs().sum() > 0


def test_layout_parsing_and_stage_split() -> None:
    lay = TrainLayout.parse("dp=2, tp=2")
    assert (lay.pp, lay.dp, lay.tp, lay.world_size, str(lay)) == (1, 2, 2, 4, "dp=2,tp=2")
    assert TrainLayout.parse("single").world_size == 1
    for bad, msg in [
        ("dp=2,dp=2", "names dp twice"),
        ("zz=2", "not one of pp, dp, tp"),
        ("dp2", "not AXIS=N"),
        ("dp=0", "dp=0: an axis needs at least 1 rank"),
    ]:
        with pytest.raises(ValueError, match=msg):
            TrainLayout.parse(bad)
    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="cannot be split"):
        stage_layers(1, 2, 0)
