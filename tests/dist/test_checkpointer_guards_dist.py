"""Issue 13's Checkpointer guards across ranks: every rank of a job raises the same sentence."""

import os
import subprocess
import sys

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.dist]

HOLDER = r"""
import sys
import elastickit as ek
ck = ek.Checkpointer(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""


def _construct(rank: int, world: int, root: str):
    import elastickit as ek
    from elastickit.checkpoint.errors import RequestError

    try:
        ek.Checkpointer(root).close()
        return None
    except RequestError as e:
        return str(e)


@pytest.mark.timeout(240)
def test_every_rank_of_a_second_job_is_refused_naming_the_holder(tmp_path):
    root = str(tmp_path / "root")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        got = run_ranks(_construct, 2, (root,), timeout_s=150)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert got[0] == got[1] and got[0] is not None
    assert got[0].startswith(f"the checkpoint root {root} is in use by pid {holder.pid} on host")
    assert run_ranks(_construct, 2, (root,), timeout_s=150) == [None, None]  # the holder is gone
    assert os.path.isfile(os.path.join(root, ".elastickit.lock"))
