"""Real DeepSpeed on CPU, 2 ranks: read its ZeRO-1/2/3 checkpoints, export the universal format,
and resume DeepSpeed from the export on 1 and on 2 ranks.

The checkpoints come from `tests/fixtures/deepspeed_make_ckpts.py` (a tiny model with odd
parameter sizes, a frozen layer, a tied embedding, two parameter groups), made once per session.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from elastickit.checkpoint.errors import RequestError
from elastickit.reshard.adapters.deepspeed import open_deepspeed
from elastickit.reshard.adapters.deepspeed_universal import write_universal

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

CONFIGS = ("z1-fp32", "z2-bf16", "z3-fp32")  # resumed from universal and through the engine
READ_ONLY = ("z2-fp16",)  # read and exported only
ZERO0 = "z0-fp32"
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "deepspeed_make_ckpts.py")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    # A JIT build of DeepSpeed's shm op from another version in the shared cache breaks
    # init_distributed (ANCHORS.md): keep the extensions inside the venv.
    env["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _torchrun(nproc: int, *args: str) -> str | None:
    """Run the fixture script under torchrun; None when it succeeded, else why it failed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           SCRIPT, *args]
    try:
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    except subprocess.TimeoutExpired:
        return f"{' '.join(cmd)} timed out after 240 s"
    if done.returncode != 0:
        return f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return None


def unsupported(name: str) -> str | None:
    """Why DeepSpeed's accelerator on this machine cannot run config `name`, or None.

    DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels for this CPU
    (`torch.ops.mkldnn._is_mkldnn_fp16_supported()`, e.g. AVX512-FP16 or AMX); asked, never assumed.
    """
    from deepspeed.accelerator import get_accelerator

    dtype = name.split("-")[1]
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    accel = get_accelerator()
    have = accel.supported_dtypes()
    if want in have:
        return None
    names = ", ".join(str(d).removeprefix("torch.") for d in have)
    return (f"DeepSpeed's {accel.device_name()} accelerator does not support {dtype} on this machine "
            f"(supported_dtypes(): {names}), so config {name} cannot be built here")


class Checkpoints:
    """The DeepSpeed checkpoints of the tests, each configuration built by its own torchrun job
    on first use: one configuration that fails (or that this machine cannot run, a skip with the
    reason) never takes the others down."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._failed: dict[str, str | None] = {}

    def __call__(self, name: str) -> str:
        """The folder of config `name`'s checkpoint (skips the test when the machine can't run it)."""
        reason = unsupported(name)
        if reason:
            pytest.skip(reason)
        if name not in self._failed:
            failed = _torchrun(2, "save", "--out", self.root, "--configs", name)
            err = os.path.join(self.root, name, "error_save.txt")
            if os.path.exists(err):
                with open(err) as f:
                    failed = f.read()
            self._failed[name] = failed
        if self._failed[name]:
            pytest.fail(f"building the DeepSpeed checkpoint {name} failed: {self._failed[name]}")
        return os.path.join(self.root, name)

    def runnable(self, names: tuple[str, ...]) -> list[str]:
        """The configs of `names` this machine can run, each built (fails if a build failed)."""
        names = [n for n in names if not unsupported(n)]
        for name in names:
            self(name)
        return names


@pytest.fixture(scope="session")
def ds_ckpts(tmp_path_factory) -> Checkpoints:
    return Checkpoints(str(tmp_path_factory.mktemp("deepspeed")))


def _run_per_config(ds_ckpts: Checkpoints, mode: str, nproc: int, result: str) -> dict[str, str]:
    """Run `mode` of the fixture script once over every runnable config (it isolates each config
    and writes `result` in the config's output folder); map each config to why it failed, if so."""
    names = ds_ckpts.runnable(CONFIGS)
    failed = _torchrun(nproc, mode, "--out", ds_ckpts.root, "--configs", ",".join(names))
    errors = {}
    for name in names:
        folder = os.path.join(ds_ckpts.root, f"{name}-{mode}" if mode != "resume" else f"{name}-universal")
        err = os.path.join(folder, f"error_{result}.txt")
        if os.path.exists(err):
            with open(err) as f:
                errors[name] = f.read()
        elif failed:
            errors[name] = failed
    return errors


@pytest.fixture(scope="session")
def universal_root(ds_ckpts) -> dict[str, str]:
    """Our universal exports, then DeepSpeed resumed from them on 2 ranks and on 1 rank; maps each
    config whose resume failed to the reason."""
    errors: dict[str, str] = {}
    for name in ds_ckpts.runnable(CONFIGS):
        with open_deepspeed(os.path.join(ds_ckpts.root, name)) as ck:
            write_universal(ck, os.path.join(ds_ckpts.root, f"{name}-universal", f"{ck.tag}_universal"))
    for world in (2, 1):
        for name, why in _run_per_config(ds_ckpts, "resume", world, f"resume_ws{world}").items():
            errors.setdefault(name, why)
    return errors


def _silently(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


@pytest.mark.timeout(280)
@pytest.mark.parametrize("name", CONFIGS + READ_ONLY)
def test_fp32_weights_bit_identical_to_zero_to_fp32(ds_ckpts, name):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = ds_ckpts(name)
    ref = _silently(get_fp32_state_dict_from_zero_checkpoint, folder)
    with open_deepspeed(folder) as ck:
        ours = ck.fp32_state_dict()
        kinds = {p.name: p.kind for p in ck.params.values()}
        assert ck.zero_stage == int(name[1]) and ck.dp_world_size == 2
    assert kinds["frozen.weight"] == "frozen" and kinds["head.weight"] == "tied"
    assert kinds["fc1.weight"] == "trainable" and kinds["scale"] == "buffer"
    # zero_to_fp32 leaves out frozen parameters of ZeRO-1 checkpoints; everything else matches.
    assert set(ref) <= set(ours) and set(ours) - set(ref) <= {"frozen.weight", "frozen.bias"}
    for key, value in ref.items():
        value = value if isinstance(value, torch.Tensor) else value.contiguous()
        assert ours[key].dtype == torch.float32
        assert torch.equal(ours[key], value.float()), key
    assert torch.equal(ours["head.weight"], ours["embed.weight"])


@pytest.mark.timeout(280)
@pytest.mark.parametrize("name", CONFIGS + READ_ONLY)
def test_universal_export_equals_ds_to_universal(ds_ckpts, tmp_path, name):
    """Same files, same dict/tensor structure, same values (moments included)."""
    from deepspeed.checkpoint import ds_to_universal

    src = glob.glob(os.path.join(ds_ckpts(name), "global_step*"))[0]
    ref, ours = str(tmp_path / "ref" / "u"), str(tmp_path / "ours" / "u")
    args = argparse.Namespace(input_folder=src, output_folder=ref, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    _silently(ds_to_universal.main, args)
    with open_deepspeed(src) as ck:
        report = write_universal(ck, ours)
    files = sorted(os.path.relpath(p, ref) for p in glob.glob(ref + "/**", recursive=True)
                   if os.path.isfile(p))
    mine = sorted(os.path.relpath(p, ours) for p in glob.glob(ours + "/**", recursive=True)
                  if os.path.isfile(p))
    assert files == mine and report.num_files == len(files)
    assert any(f.endswith("exp_avg_sq.pt") for f in files)
    for rel in files:
        _assert_same(torch.load(os.path.join(ref, rel), weights_only=False),
                     torch.load(os.path.join(ours, rel), weights_only=False), rel)
    for parent in (tmp_path / "ref", tmp_path / "ours"):
        assert (parent / "latest_universal").read_text() == "u"


def _assert_same(a, b, where: str) -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}:{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):
        assert vars(a) == vars(b), where
    else:
        assert a == b, where


@pytest.mark.timeout(120)
def test_every_deepspeed_file_reads_as_torch_load_weights_only_reads_it(ds_ckpts):
    """DESIGN.md section 8 side by side: each file DeepSpeed wrote reads through elastickit's
    restricted unpickler (no torch) to the values torch.load(weights_only=True) gives with the
    same DeepSpeed allowlist."""
    import enum
    import importlib

    import numpy as np
    from elastickit.reshard.adapters.deepspeed_pickle import DEEPSPEED_ALLOWLIST, load_pt

    real = []
    for full in DEEPSPEED_ALLOWLIST:
        module, _, name = full.rpartition(".")
        real.append(getattr(importlib.import_module(module), name))

    def same(ours, ref, where):
        if isinstance(ref, torch.Tensor):
            ref = ref.detach()
            if ref.dtype == torch.bfloat16:
                ref = ref.view(torch.int16)
                ours = ours.view(np.int16)
            assert isinstance(ours, np.ndarray) and ours.shape == tuple(ref.shape), where
            assert np.array_equal(ours, ref.numpy()), where
        elif isinstance(ref, dict):
            assert list(ours) == list(ref), where
            for k in ref:
                same(ours[k], ref[k], f"{where}:{k}")
        elif isinstance(ref, (list, tuple)):
            assert len(ours) == len(ref), where
            for i, (x, y) in enumerate(zip(ours, ref)):
                same(x, y, f"{where}[{i}]")
        elif isinstance(ref, enum.Enum):  # ZeroStageEnum
            assert ours == ref.value and type(ours).ds_name == type(ref).__name__, where
        elif hasattr(ref, "__dict__") and not isinstance(ref, type):  # LossScaler, fragment_address
            assert type(ours).ds_name == type(ref).__name__, where
            same(vars(ours), vars(ref), where)
        else:
            assert ours == ref or str(ours) == str(ref).removeprefix("torch."), where

    names = ds_ckpts.runnable((*CONFIGS, *READ_ONLY, ZERO0))
    files = [f for n in names for f in glob.glob(os.path.join(ds_ckpts.root, n, "global_step*", "*.pt"))]
    # Each config wrote its model and optimizer files (two ranks' optimizer files where ZeRO shards).
    assert len(files) >= 2 * len(names)
    for path in files:
        with torch.serialization.safe_globals(real):
            ref = torch.load(path, weights_only=True, map_location="cpu")
        same(load_pt(path), ref, os.path.relpath(path, ds_ckpts.root))


@pytest.mark.timeout(280)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", CONFIGS)
def test_deepspeed_resumes_from_universal_export(ds_ckpts, universal_root, name, world):
    folder = ds_ckpts(name)
    if name in universal_root:
        pytest.fail(f"DeepSpeed could not resume {name} from the universal export: {universal_root[name]}")
    with open(os.path.join(folder, "ref_resume.json")) as f:
        ref = json.load(f)
    with open(os.path.join(ds_ckpts.root, f"{name}-universal", f"resume_ws{world}.json")) as f:
        got = json.load(f)
    assert got["global_steps"] == 5 and got["world_size"] == world
    tol = 2e-2 if "bf16" in name else 1e-5
    assert got["resume_losses"] == pytest.approx(ref["resume_losses"], rel=tol)
    # The losses must move: a resume that ignored the optimizer state would still match step 1.
    assert abs(ref["resume_losses"][1] - ref["resume_losses"][0]) > 1e-3


def _tiny_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("deepspeed_make_ckpts", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.Tiny()


@pytest.mark.timeout(120)
def test_convert_cli_deepspeed_to_elastickit_restores_the_model(ds_ckpts, tmp_path):
    from elastickit.reshard.adapters.registry import open_source
    from typer.testing import CliRunner

    import elastickit as ek
    from elastickit.cli.main import app

    src = ds_ckpts("z2-bf16")
    dst = str(tmp_path / "ek")
    res = CliRunner().invoke(app, ["convert", src, dst, "--from", "auto", "--to", "elastickit"])
    assert res.exit_code == 0, res.output
    assert "(deepspeed)" in res.output
    with open_deepspeed(src) as ck:
        ref = ck.fp32_state_dict()
        moments = ck.tensors("fc1.weight")
        frozen_bf16 = ck.model_tensor("frozen.weight")
    model = _tiny_model()
    checkpointer = ek.Checkpointer(dst)
    try:
        assert checkpointer.restore({"model": model}) == 3
    finally:
        checkpointer.close()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name
    converted = open_source(dst)
    try:
        assert converted.tensors()["model/frozen.weight"].dtype == "BF16"
        assert torch.equal(converted.read("model/frozen.weight"), frozen_bf16)
        assert torch.equal(converted.read("optim/state/fc1.weight/exp_avg_sq"), moments["exp_avg_sq"])
        assert float(converted.read("optim/state/fc1.weight/step")) == 3.0
        objects = converted.objects()
        assert objects["deepspeed"]["client_state"] == {"epoch": 1, "note": "tiny"}
        assert objects["deepspeed"]["lr_scheduler"] == {"last_batch_iteration": 2}
    finally:
        converted.close()


@pytest.mark.timeout(120)
def test_convert_cli_to_universal_and_trust_pickle(ds_ckpts, tmp_path):
    import fractions
    import shutil

    from typer.testing import CliRunner

    from elastickit.cli.main import app

    dst = str(tmp_path / "out" / "global_step3_universal")
    res = CliRunner().invoke(app, ["convert", ds_ckpts("z3-fp32"), dst,
                                   "--from", "deepspeed", "--to", "deepspeed-universal"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "latest_universal").read_text() == "global_step3_universal"
    assert torch.load(os.path.join(dst, "zero", "fc1.weight", "fp32.pt"), weights_only=True).shape == (77,)

    # A client state holding a class outside the allowlist: refused (exit 1), unless trusted.
    src = tmp_path / "evil"
    shutil.copytree(os.path.join(ds_ckpts("z1-fp32"), "global_step3"), src)
    states = torch.load(src / "mp_rank_00_model_states.pt", weights_only=False)
    states["ratio"] = fractions.Fraction(1, 3)
    torch.save(states, src / "mp_rank_00_model_states.pt")
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "e1"), "--to", "safetensors"])
    assert res.exit_code == 1
    assert "mp_rank_00_model_states.pt" in res.output and "fractions.Fraction" in res.output
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "e2"), "--to", "safetensors",
                                   "--trust-pickle"])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="session")
def engine_root(ds_ckpts) -> dict[str, str]:
    """The `save` run again, through elastickit's checkpoint engine (`install(engine)`); maps each
    config whose run failed to the reason."""
    return _run_per_config(ds_ckpts, "engine", 2, "engine")


@pytest.mark.timeout(280)
@pytest.mark.parametrize("name", CONFIGS)
def test_checkpoint_engine_saves_and_resumes_like_the_default(ds_ckpts, engine_root, name):
    with open(os.path.join(ds_ckpts(name), "ref_resume.json")) as f:
        ref = json.load(f)
    if name in engine_root:
        pytest.fail(f"the elastickit checkpoint engine run of {name} failed: {engine_root[name]}")
    folder = os.path.join(ds_ckpts.root, f"{name}-engine")
    with open(os.path.join(folder, "engine_resume.json")) as f:
        got = json.load(f)
    assert got["global_steps"] == 5
    assert got["resume_losses"] == pytest.approx(ref["resume_losses"], rel=1e-6)
    # DeepSpeed's files are JSON markers; the data is an elastickit checkpoint (no pickle).
    tag = os.path.join(folder, "global_step3")
    for fname in os.listdir(tag):
        with open(os.path.join(tag, fname), "rb") as f:
            assert f.read(1) == b"{", fname
    assert os.path.isfile(os.path.join(folder, "elastickit", "step-00000003", "manifest.json"))
    with pytest.raises(RequestError, match="saved through elastickit's DeepSpeed engine"):
        open_deepspeed(folder)


@pytest.mark.timeout(120)
def test_zero0_checkpoint_reads_its_weights(ds_ckpts):
    folder = ds_ckpts(ZERO0)
    saved = torch.load(glob.glob(os.path.join(folder, "global_step*", "mp_rank_00_model_states.pt"))[0],
                       weights_only=False)["module"]
    with open_deepspeed(folder) as ck:
        assert ck.zero_stage == 0 and not ck.optim_files
        assert {p.kind for p in ck.params.values()} == {"weight", "buffer"}
        ours = ck.fp32_state_dict()
    assert set(ours) == set(saved)
    for key, value in saved.items():
        assert torch.equal(ours[key], value.float()), key


def _restore_into_fsdp2(rank: int, world_size: int, ckpt: str) -> dict[str, torch.Tensor]:
    """On each rank: a wrapped Tiny (names `net.<name>`), FSDP2-sharded, restored from the
    converted checkpoint through a rename rule; returns the full state dict."""
    from elastickit.reshard.rules import RuleSet, rename, rule
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    import elastickit as ek

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _tiny_model()

    model = Wrapped()
    for sub in (model.net.fc1, model.net.fc2):
        fully_shard(sub)
    fully_shard(model)
    rules = RuleSet(rules=(rule("model/net.*", rename(r"^model/net\.(?P<rest>.*)$", "model/{rest}")),))
    checkpointer = ek.Checkpointer(ckpt, rules=rules)
    try:
        step = checkpointer.restore({"model": model})
    finally:
        checkpointer.close()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"step": step, **{k: v.detach().clone() for k, v in full.items()}}


@pytest.mark.timeout(200)
def test_deepspeed_checkpoint_restores_into_fsdp2_with_rename_rules(ds_ckpts, tmp_path):
    import sys as _sys

    from elastickit.reshard.convert import convert

    _sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from tests._dist import run_ranks

    src = ds_ckpts("z3-fp32")
    dst = str(tmp_path / "ek")
    convert(src, dst, source="deepspeed", target="elastickit")
    results = run_ranks(_restore_into_fsdp2, world_size=2, args=(dst,), timeout_s=150)
    with open_deepspeed(src) as ck:
        ref = ck.fp32_state_dict()
    assert [r.pop("step") for r in results] == [3, 3]
    got = results[0]  # a full state dict with cpu_offload lands on rank 0 only
    assert sorted(got) == sorted(f"net.{k}" for k in ref)
    for name, tensor in got.items():
        assert torch.equal(tensor, ref[name[len("net."):]]), name
