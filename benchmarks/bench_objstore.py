"""Persistent-tier throughput to an S3-compatible server: elastickit's object-storage tier
against s3fs moving the same bytes, in one run.

    .venv/bin/python benchmarks/bench_objstore.py [--mib 256] [--repeats 3]

The server is moto's standalone S3 server on 127.0.0.1 (a free port), in its own process, so
it does not share a GIL with the method measured; it is the same server for every method. Each
method runs in a fresh process (its peak RSS is its own), interleaved with the others so drift
hits all alike:

- `elastickit save`: `Checkpointer("s3://...").save(step, state)` then `wait()`: the snapshot
  copy, the streamed multipart upload with checksums, the confirmation and the manifest.
- `s3fs pipe_file`: `fs.pipe_file` of the same safetensors bytes, already serialized in memory
  outside the timed region (what a user of s3fs would do after `safetensors.torch.save`).
- `s3fs put_file`: `fs.put_file` of the same bytes from a local file written beforehand.
- `elastickit restore`: `Checkpointer(...).restore(state)`: manifest, ranged reads, checksums,
  copies into the live tensors.
- `s3fs cat_file`: `fs.cat_file` of the same object into memory (no parsing, no checksum).

Writes results/objstore.md, results/objstore.json and results/objstore.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RssPeak, bar_chart, machine, spawn, write_table

METHODS = ["elastickit save", "s3fs pipe_file", "s3fs put_file", "elastickit restore", "s3fs cat_file"]

SERVER = r"""
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
host, port = s.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
s.stop()
"""


def _state(mib: int):
    import torch

    n = 32
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn((mib << 20) // 4 // n, generator=g) for i in range(n)}


def _rank(rank: int, world: int, method: str, mib: int, bucket: str, tmp: str) -> dict:
    import s3fs
    import torch
    from elastickit.checkpoint.tiers import Tiers, TierSpec

    import elastickit as ek

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    state = _state(mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    url = f"s3://{bucket}/ek"
    tiers = Tiers(memory=None, persistent=TierSpec(max_busy_fraction=1.0))
    prepared = None
    if method == "s3fs pipe_file":
        from safetensors.torch import save

        prepared = save(state)  # the serialized file, in memory before the clock starts
    elif method == "s3fs put_file":
        from safetensors.torch import save_file

        prepared = os.path.join(tmp, "rank.safetensors")
        save_file(state, prepared)
    elif method == "elastickit restore":
        with ek.Checkpointer(url, tiers=tiers, rng=False, lazy="never") as ck:
            ck.save(1, {"model": state})
        state = {k: torch.zeros_like(v) for k, v in state.items()}
    elif method == "s3fs cat_file":
        fs.pipe_file(f"{bucket}/raw/rank.safetensors", __import__("safetensors.torch").torch.save(state))
    ck = ek.Checkpointer(url, tiers=tiers, rng=False, lazy="never") if method.startswith("elastickit") else None
    with RssPeak() as rss:
        t0 = time.perf_counter()
        if method == "elastickit save":
            ck.save(1, {"model": state})
            ck.wait()
        elif method == "s3fs pipe_file":
            fs.pipe_file(f"{bucket}/raw/rank.safetensors", prepared)
        elif method == "s3fs put_file":
            fs.put_file(prepared, f"{bucket}/raw/rank.safetensors")
        elif method == "elastickit restore":
            assert ck.restore({"model": state}) == 1
        elif method == "s3fs cat_file":
            data = fs.cat_file(f"{bucket}/raw/rank.safetensors")
            assert len(data) > nbytes
            del data
        seconds = time.perf_counter() - t0
    extra = rss.extra
    if ck is not None:
        ck.close()
    fs.rm(bucket, recursive=True)  # the server keeps objects in memory: give them back
    return {"seconds": seconds, "bytes": nbytes, "extra_rss": extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="state size in MiB (fp32, 32 tensors)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    endpoint = server.stdout.readline().strip()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    import tempfile

    import s3fs

    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repeats):
                for m in METHODS:
                    bucket = f"bench-{uuid.uuid4().hex[:10]}"
                    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
                    r = spawn(_rank, 1, m, args.mib, bucket, tmp)[0]
                    results[m].append(r)
                    print(f"rep {rep} {m:20s} {r['seconds']:.3f} s  {r['bytes'] / r['seconds'] / 1e6:.0f} MB/s", flush=True)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    load_after = os.getloadavg()
    rows, med = [], {}
    for m in METHODS:
        secs = sorted(x["seconds"] for x in results[m])
        med[m] = secs[len(secs) // 2]
        nbytes = results[m][0]["bytes"]
        rss = max(x["extra_rss"] for x in results[m])
        rows.append([m, f"{med[m]:.2f}", f"{min(secs):.2f}", f"{nbytes / med[m] / 1e6:.0f}", f"{rss / 2**20:.0f}"])
    save_ratio = med["s3fs pipe_file"] / med["elastickit save"]
    put_ratio = med["s3fs put_file"] / med["elastickit save"]
    read_ratio = med["s3fs cat_file"] / med["elastickit restore"]
    notes = [
        (
            f"Machine: {machine()}, shared with other work: load average {load_before[0]:.2f} before, "
            f"{load_after[0]:.2f} after. Server: moto {_moto_version()} (standalone, Python, in-memory) on "
            f"127.0.0.1, its own process. State: {args.mib} MiB fp32 in 32 tensors, one process, median of "
            f"{args.repeats} interleaved runs. Extra RSS: the method's peak RSS (sampled every 2 ms) minus its RSS at the start of the timed region."
        ),
        (
            f"elastickit save vs s3fs pipe_file of the same bytes: **{save_ratio:.2f}x** the throughput "
            f"(vs put_file from a local file: {put_ratio:.2f}x); elastickit restore vs s3fs cat_file: **{read_ratio:.2f}x**."
        ),
        (
            "elastickit's save includes what s3fs's does not: the snapshot copy, a checksum per tensor, the "
            "confirmation of the object and the manifest; pipe_file needs the serialized file in memory "
            "first (a second copy of the state); elastickit sends its parts straight from the snapshot "
            "(16 MiB parts, 4 in flight, each read by the HTTP client 256 KiB at a time), so its extra RSS "
            "is the snapshot itself plus little. The restore includes the checksums and the copy into the "
            "live tensors. moto completes a multipart upload by copying every part in Python, which a single "
            "PUT avoids: s3fs's pipe_file uses one PUT below 100 MB, elastickit one PUT below 16 MiB."
        ),
        (
            "The server is the bottleneck (moto parses every request in Python): these are ratios on one "
            "server, not S3's absolute speed. moto answers every ranged GET by reading the whole object "
            "and slicing it, so a restore by ranged reads (16 MiB parts fetched concurrently, the way "
            "to go fast on S3) pays one full-object copy per request here, which cat_file's single GET does not."
        ),
    ]
    md = write_table(
        "objstore",
        "Persistent tier on S3 (moto on 127.0.0.1), one process",
        ["method", "median s", "best s", "MB/s", "extra RSS MiB"],
        rows,
        notes,
        {"args": vars(args), "results": results, "median_s": med, "load": [load_before, load_after]},
    )
    bar_chart("objstore", "Persistent tier on S3 (MB/s, higher is better)", METHODS,
              [results[m][0]["bytes"] / med[m] / 1e6 for m in METHODS], "MB/s")
    print(md)


def _moto_version() -> str:
    try:
        import moto

        return moto.__version__
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
