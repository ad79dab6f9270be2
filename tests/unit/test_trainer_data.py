"""The token stream is addressed by global sample index; the loader resumes at any dp size."""

from __future__ import annotations

import functools
import operator

import pytest
import torch

from elastickit.trainer.data import TokenLoader, TokenStream

pytestmark = pytest.mark.timeout(60)


def test_samples_are_a_function_of_seed_and_index() -> None:
    s = TokenStream(vocab_size=50, seq_len=12, seed=1)
    assert torch.equal(s.sample(7), TokenStream(vocab_size=50, seq_len=12, seed=1).sample(7))
    assert not torch.equal(s.sample(7), s.sample(8))
    assert not torch.equal(s.sample(7), TokenStream(vocab_size=50, seq_len=12, seed=2).sample(7))
    assert s.sample(3).shape == (13,) and int(s.sample(3).max()) < 50


def _seen(loader: TokenLoader, steps: int) -> list[list[int]]:
    return [x[:, 0].tolist() for x, _ in (loader.next_batch() for _ in range(steps))]


def test_dp_ranks_split_each_global_batch_and_resume_at_another_dp() -> None:
    stream = TokenStream(vocab_size=1000, seq_len=4, seed=0, noise=0.0)
    single = TokenLoader(stream, global_batch=4)
    ref = _seen(single, 3)  # first token of each sample identifies it
    halves = [TokenLoader(stream, global_batch=4, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(2):
        got = halves[0].next_batch()[0][:, 0].tolist() + halves[1].next_batch()[0][:, 0].tolist()
        assert got == ref[step]
    state = halves[1].state_dict()
    assert state == {"sample_index": 8} == halves[0].state_dict()
    # Restore at dp=4: the next unseen samples, none skipped or repeated.
    quarter = [TokenLoader(stream, global_batch=4, dp_rank=r, dp_size=4) for r in range(4)]
    for q in quarter:
        q.load_state_dict(state)
    assert (
        functools.reduce(operator.iadd, (q.next_batch()[0][:, 0].tolist() for q in quarter), [])
        == ref[2]
    )


def test_inputs_and_targets_are_shifted_and_errors_name_the_field() -> None:
    loader = TokenLoader(TokenStream(vocab_size=30, seq_len=6), global_batch=2)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 6) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="multiple of dp"):
        TokenLoader(TokenStream(vocab_size=30, seq_len=6), global_batch=3, dp_size=2)
    with pytest.raises(ValueError, match="sample_index"):
        loader.load_state_dict({"sample_index": -1})
    with pytest.raises(ValueError, match="TokenStream.noise"):
        TokenStream(vocab_size=30, seq_len=6, noise=2.0)
