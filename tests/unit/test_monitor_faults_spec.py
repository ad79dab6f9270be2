"""`--inject` specs: parsed into step hooks; bad ones raise RequestError naming the flag."""

from __future__ import annotations

import pytest
from elastickit.checkpoint.errors import RequestError

from elastickit.faults import Crash, Hang, SlowLink, SlowRank, build_step_hooks, parse_fault

pytestmark = pytest.mark.timeout(30)


def test_parse_each_kind() -> None:
    assert parse_fault("slow:rank=2:ms=50", 4).ms == 50.0
    link = parse_fault("slowlink:src=0:dst=3:ms=5", 4)
    assert (link.src, link.dst, link.step) == (0, 3, 0)
    assert parse_fault("hang:rank=1:step=7", 4).step == 7
    assert parse_fault("crash:rank=3:step=0", 4).rank == 3
    assert parse_fault("slow:rank=2:ms=50:step=4", 4).step == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("melt:rank=1", "unknown fault 'melt'"),
        ("slow:rank=1", "field 'ms' is missing"),
        ("slow:rank=9:ms=5", "rank=9 is outside the world of 4 ranks"),
        ("slow:rank=x:ms=5", "rank='x' is not a number"),
        ("slow:rank=1:ms=-5", "ms must be positive"),
        ("hang:rank=1:step=2:ms=4", "unexpected field 'ms=4'"),
        ("slowlink:src=1:dst=1:ms=4", "src and dst are the same rank"),
        ("crash:rank=1:rank=2:step=1", "given twice"),
    ],
)
def test_bad_specs_name_the_flag(spec: str, message: str) -> None:
    with pytest.raises(RequestError, match="--inject") as err:
        parse_fault(spec, 4)
    assert message in str(err.value)
    assert err.value.exit_code == 2


def test_hooks_only_on_the_faulty_rank() -> None:
    specs = ["slow:rank=1:ms=5", "hang:rank=2:step=3", "crash:rank=3:step=1"]
    assert build_step_hooks(specs, None, 0, 4) == []
    assert [type(h) for h in build_step_hooks(specs, None, 1, 4)] == [SlowRank]
    assert [type(h) for h in build_step_hooks(specs, None, 2, 4)] == [Hang]
    assert [type(h) for h in build_step_hooks(specs, None, 3, 4)] == [Crash]


def test_all_specs_are_checked_before_any_hook_is_built() -> None:
    with pytest.raises(RequestError, match="rank=7"):
        build_step_hooks(["slow:rank=1:ms=5", "crash:rank=7:step=1"], None, 1, 4)


def test_slowlink_delays_only_its_traffic() -> None:
    import time

    from elastickit.monitor.probe import PROBE

    hook = SlowLink(parse_fault("slowlink:src=1:dst=2:ms=30", 4), rank=1)
    try:
        assert PROBE.interceptor is not None
        t0 = time.perf_counter()
        hook.before_issue("send", (0, 1, 2, 3), 3)  # another peer: no delay
        hook.before_issue("recv", (0, 1, 2, 3), 2)  # a receive on the sender: no delay
        assert time.perf_counter() - t0 < 0.02
        hook.before_issue("send", (0, 1, 2, 3), 2)
        assert time.perf_counter() - t0 >= 0.03

        class _Work:
            waited = False

            def wait(self) -> None:
                self.waited = True

        w = _Work()
        hook.after_issue("allreduce", (0, 1), -1, w)  # dst not in the group
        assert not w.waited
        hook.after_issue("allreduce", (1, 2), -1, w)
        assert w.waited
    finally:
        hook.close()
    assert PROBE.interceptor is None


def test_hang_spec_turns_abort_on_by_default(tmp_path) -> None:
    hooks = build_step_hooks(["hang:rank=1:step=3"], str(tmp_path / "e.jsonl"), 0, 4)
    assert hooks[0].abort_on_hang is True
    hooks = build_step_hooks(["slow:rank=1:ms=3"], str(tmp_path / "e.jsonl"), 0, 4)
    assert hooks[0].abort_on_hang is False
    hooks = build_step_hooks([], str(tmp_path / "e.jsonl"), 0, 4, abort_on_hang=True)
    assert hooks[0].abort_on_hang is True
