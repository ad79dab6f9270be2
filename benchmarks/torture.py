"""The long torture run (issue 17): what was tried, how many times, what survived.

    .venv/bin/python benchmarks/torture.py [--kills 120] [--ours 300] [--foreign 150]
        [--peers 8] [--disk-rounds 2] [--load-minutes 3] [--load-world 8] [--only kills,load]
        [--seed 17]

Sections (each the campaign its CI subset in tests/torture runs, with more instants and seeds):

- kills: kill -9 at random instants and at exact file-system operations of real two-rank saves,
  spread over the tier configurations (every tier at once; persistent with zstd; node-local with
  peer copies); after each, every committed checkpoint must verify and the next job must restore
  the newest one bit-exact.
- ours: bit flips, truncations and deletions at random offsets in our rank files (plain and
  zstd), manifests and node-local files: `elastickit verify` must name the file, and restore must
  fall back to the previous checkpoint bit-exact.
- peers: the same for peer copies under two real ranks, some with the original's node lost.
- foreign: the same damages in DeepSpeed, DCP and Hugging Face safetensors checkpoints through
  `elastickit convert`: one sentence, never a traceback, never a wrong tensor where the format
  has a checksum.
- disks: a checkpoint root on a small tmpfs that fills up, turns read-only, or is covered by
  another file system (an unmounted share), under two ranks (skipped where mounting is refused).
- load: `--load-world` ranks saving every step through every tier for `--load-minutes`.
- sigterm: SIGTERM at random instants of a two-rank job: the step saved is the last step trained.

Each section's figures go to results/reliability.json (kept across runs with `--only`), and
results/reliability.md is written from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))
from _common import RESULTS, machine

SECTIONS = ("kills", "objkills", "ours", "peers", "foreign", "disks", "load", "sigterm")
JSON = os.path.join(RESULTS, "reliability.json")


def _say(*a: Any) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def run_kills(work: str, count: int, seed: int) -> dict[str, Any]:
    from tests.torture import kills
    from tests.torture.job import TIER_CONFIGS

    share = {"all": 0.5, "persistent-zstd": 0.25, "local-peer": 0.25}
    out: dict[str, Any] = {"configs": {}, "failures": []}
    for i, config in enumerate(TIER_CONFIGS):
        n = max(1, round(count * share[config]))
        t0 = time.monotonic()
        rep = kills.campaign(
            os.path.join(work, config),
            config=config,
            count=n,
            seed=seed + i,
            log=lambda o: _say(
                f"  kill #{o.instant.index} {o.instant.describe()}: "
                f"{'hit' if o.hit else 'missed'}, restored {o.restored_step}"
                f"{' PROBLEM' if o.problems else ''}"
            ),
        )
        at_ops = [o for o in rep.outcomes if o.instant.point is not None]
        out["configs"][config] = {
            "instants": len(rep.outcomes),
            "kills": rep.kills,
            "at_operations": sum(o.hit for o in at_ops),
            "by_time": sum(o.hit for o in rep.outcomes if o.instant.point is None),
            "sites": len({o.instant.label for o in at_ops if o.hit}),
            "node_losses": sum(o.instant.node_loss for o in rep.outcomes),
            "checkpoints_verified": rep.verified,
            "restores_newest_bit_exact": sum(
                o.restored_step == o.expected_step and o.bit_exact is not False
                for o in rep.outcomes
            ),
            "lost_committed": sum(
                any("verify exit" in p or "restore picked" in p for p in o.problems)
                for o in rep.outcomes
            ),
            "tracebacks": sum(any("Traceback" in p for p in o.problems) for o in rep.outcomes),
            "problems": len(rep.failures),
            "seconds": round(time.monotonic() - t0, 1),
        }
        out["failures"] += [f"{config}: {f[:800]}" for f in rep.failures]
        _say(f"kills {config}: {out['configs'][config]}")
    return out


def run_objkills(work: str, count: int, seed: int) -> dict[str, Any]:
    from tests.torture import kills, objstore

    why = objstore.missing()
    if why:
        return {"skipped": why, "failures": []}
    t0 = time.monotonic()
    with objstore.s3_root() as (url, env):
        os.environ["EK_TORTURE_S3"] = url
        rep = kills.campaign(
            work,
            config="objstore",
            count=count,
            seed=seed,
            env=env,
            step_s=0.03,
            log=lambda o: _say(
                f"  kill #{o.instant.index} {o.instant.describe()}: "
                f"{'hit' if o.hit else 'missed'}, restored {o.restored_step}"
                f"{' PROBLEM' if o.problems else ''}"
            ),
        )
    at_ops = [o for o in rep.outcomes if o.instant.point is not None]
    row = {
        "instants": len(rep.outcomes),
        "kills": rep.kills,
        "at_operations": sum(o.hit for o in at_ops),
        "by_time": sum(o.hit for o in rep.outcomes if o.instant.point is None),
        "sites": len({o.instant.label for o in at_ops if o.hit}),
        "node_losses": 0,
        "checkpoints_verified": rep.verified,
        "restores_newest_bit_exact": sum(
            o.restored_step == o.expected_step and o.bit_exact is not False for o in rep.outcomes
        ),
        "lost_committed": sum(
            any(
                "verify" in p or "restore picked" in p or "object store step" in p
                for p in o.problems
            )
            for o in rep.outcomes
        ),
        "tracebacks": sum(any("Traceback" in p for p in o.problems) for o in rep.outcomes),
        "problems": len(rep.failures),
        "seconds": round(time.monotonic() - t0, 1),
    }
    return {
        "configs": {"objstore": row},
        "failures": [f"objstore: {f[:800]}" for f in rep.failures],
    }


def run_ours(work: str, trials: int, seed: int) -> dict[str, Any]:
    from tests.torture import corruption

    rep = corruption.ours_campaign(work, trials=trials, seed=seed)
    table = {f"{v} {t}": row for (v, t), row in sorted(rep.table().items())}
    return {"table": table, "failures": [f[:800] for f in rep.failures]}


def run_peers(work: str, trials: int, seed: int) -> dict[str, Any]:
    from tests.torture import peers

    got = peers.campaign(work, trials=trials, seed=seed)
    files = [t for t in got if not t.file.endswith("manifest.json")]
    return {
        "trials": len(got),
        "file_trials": len(files),
        "with_node_lost": sum(bool(t.lost) for t in files),
        "fell_back_bit_exact": sum(t.restored_step == 2 and t.bit_exact for t in files),
        "failures": [
            f"{t.file} ({t.mutation.describe()}): {p}"[:800] for t in got for p in t.problems
        ],
    }


def run_foreign(work: str, trials: int, seed: int) -> dict[str, Any]:
    from tests.torture import foreign

    rep = foreign.campaign(work, trials=trials, seed=seed)
    table = {f"{f} {t}": row for (f, t), row in sorted(rep.table().items())}
    silent = {k: row["silent"] for k, row in rep.table().items() if row["silent"]}
    bad_silent = [
        f"{k}: {n} wrong tensor(s) loaded silently"
        for k, n in silent.items()
        if k not in foreign.UNPROTECTED
    ]
    return {
        "table": table,
        "unprotected": [f"{f} {t}" for f, t in foreign.UNPROTECTED],
        "failures": [b[:800] for b in rep.broken()] + bad_silent,
    }


def run_disks(work: str, rounds: int, seed: int) -> dict[str, Any]:
    from tests.torture import disks

    why = disks.mount_problem(work)
    if why:
        return {"skipped": why, "failures": []}
    rows: dict[str, Any] = {}
    failures: list[str] = []
    for r in range(rounds):
        for fault in disks.FAULTS:
            base = os.path.join(work, f"r{r}")
            os.makedirs(base, exist_ok=True)
            o = disks.run_fault(base, fault, world=2)
            row = rows.setdefault(
                fault, {"runs": 0, "failed_saves": 0, "recovered": 0, "reasons": []}
            )
            row["runs"] += 1
            row["failed_saves"] += len(o.failed_steps)
            row["recovered"] += not o.problems
            row["reasons"] = sorted(
                set(row["reasons"]) | {x.replace(base, "<tmpfs>") for x in o.reasons}
            )[:4]
            failures += [f"{fault}: {p[:800]}" for p in o.problems]
            _say(f"disk {fault} round {r}: failed saves {o.failed_steps}, problems {o.problems}")
    return {"faults": rows, "failures": failures}


def run_load(work: str, world: int, minutes: float, seed: int) -> dict[str, Any]:
    from tests.torture import load

    rep = load.run(work, world=world, duration_s=minutes * 60)
    return {
        "world": world,
        "duration_s": minutes * 60,
        "steps": rep.steps,
        "checkpoints": rep.checkpoints,
        "rss_growth_mib": [round(x / 2**20, 1) for x in rep.rss_growth],
        "fd_growth": rep.fd_growth,
        "rss_mib": rep.rss_mib,
        "failures": rep.problems,
    }


def run_sigterm(work: str, count: int, seed: int) -> dict[str, Any]:
    from tests.torture import sigterm

    rep = sigterm.campaign(work, count=count, seed=seed)
    return {
        "signals": len(rep.trials),
        "last_step_saved": sum(t.saved == t.trained for t in rep.trials),
        "grace_s": rep.grace_s,
        "max_exit_s": round(max((t.exit_s for t in rep.trials), default=0.0), 2),
        "failures": rep.failures,
    }


def _md(data: dict[str, Any]) -> str:
    L = [
        "# Reliability: the torture run (issue 17)",
        "",
        f"Machine: {data.get('machine', '?')}; `benchmarks/torture.py`, seed {data.get('seed')}.",
        "Each section below says what was tried, how many times, and what survived. A",
        "*failure* is any broken promise (a lost or unverifiable committed checkpoint, a restore",
        "that is not the newest or not bit-exact, an undetected corruption, a traceback, a",
        "resource that grows); the lists of failures are in reliability.json.",
        "",
    ]
    k = data.get("kills")
    ok = data.get("objkills")
    if ok and ok.get("configs"):
        k = {**(k or {}), "configs": {**(k or {}).get("configs", {}), **ok["configs"]}}
    if k:
        L += [
            "## kill -9 at random instants (item 1)",
            "",
            "| tiers | instants | kills | at FS operations | by time | operation sites | node-local disk lost | committed checkpoints verified | restores newest, bit-exact | lost committed | tracebacks | failures |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c, r in k["configs"].items():
            L.append(
                f"| {c} | {r['instants']} | {r['kills']} | {r['at_operations']} | {r['by_time']} | {r['sites']} | {r['node_losses']} | {r['checkpoints_verified']} | {r['restores_newest_bit_exact']} | {r['lost_committed']} | {r['tracebacks']} | {r['problems']} |"
            )
        tot = sum(r["kills"] for r in k["configs"].values())
        L += [
            "",
            f"{tot} kills in all. 'all' is memory, node-local with peer copies and persistent at "
            "once; sites are the operations of commit, retention, peer copy and event log the kill "
            "was aimed at (the Nth write/fsync/rename/unlink/rmdir; on object storage the Nth S3 "
            "request: upload_part and complete_multipart_upload of a rank file in parts, a small "
            "rank file's PUT, the manifest PUT, retention's deletes). 'objstore' is the persistent "
            "tier on an S3-compatible server (moto on 127.0.0.1), 17 MiB in rank 0's file so that "
            "it goes up in parts. A missed instant is one the job never reached (it ended first). "
            "After every kill each committed checkpoint is verified byte for byte "
            "(`elastickit verify`, or the store's ranged reads), and the next job must restore the "
            "newest one, bit-exact against the digest each rank wrote when it trained that step.",
            "",
        ]
    o = data.get("ours")
    if o:
        L += [
            "## Corruption of our format (item 2)",
            "",
            "| tiers, file | damages | detected by verify (naming the file) | restore fell back, bit-exact |",
            "|---|---|---|---|",
        ]
        L += [
            f"| {key} | {r['trials']} | {r['detected']} | {r['fell_back']} |"
            for key, r in o["table"].items()
        ]
        n = sum(r["trials"] for r in o["table"].values())
        d = sum(r["detected"] for r in o["table"].values())
        L += [
            "",
            f"{d} of {n} damages detected ({'100%' if n and d == n else f'{100 * d / max(n, 1):.1f}%'}); "
            f"{len(o['failures'])} failures.",
            "",
        ]
    p = data.get("peers")
    if p:
        L += [
            "## Corruption of peer copies (item 2)",
            "",
            f"{p['trials']} damaged files under two real ranks ({p['file_trials']} peer-copy files, "
            f"{p['with_node_lost']} with the original's node lost, the rest manifests): "
            f"{p['fell_back_bit_exact']} restores fell back bit-exact; {len(p['failures'])} failures.",
            "",
        ]
    f = data.get("foreign")
    if f:
        L += [
            "## Corruption of foreign formats (item 2)",
            "",
            "| format, file | damages | detected (one sentence) | harmless | wrong tensor, silent | traceback |",
            "|---|---|---|---|---|---|",
        ]
        L += [
            f"| {key} | {r['trials']} | {r['detected']} | {r['harmless']} | {r['silent']} | {r['broken']} |"
            for key, r in f["table"].items()
        ]
        L += [
            "",
            "Silent wrong tensors are possible only where the format keeps no checksum of the "
            f"bytes: {', '.join(f['unprotected']) or 'none'}. {len(f['failures'])} failures.",
            "",
        ]
    d = data.get("disks")
    if d:
        L += ["## Full, read-only and vanished disks (item 3)", ""]
        if d.get("skipped"):
            L += [f"Not run: {d['skipped']}.", ""]
        else:
            L += [
                "| fault | runs | saves that failed (training went on) | runs with every promise kept | reasons logged |",
                "|---|---|---|---|---|",
            ]
            L += [
                f"| {fault} | {r['runs']} | {r['failed_saves']} | {r['recovered']} | {'; '.join(x[:90] for x in r['reasons'][:2])} |"
                for fault, r in d["faults"].items()
            ]
            L += [
                "",
                "A tmpfs of 6 MiB; full: a filler file; read-only: a read-only bind mount; vanished: "
                "an empty tmpfs stacked over the root. Promises: training goes on, no partial "
                "directory, older checkpoints unchanged, a failure record per failed save, nothing "
                "written in a vanished root's place, saving resumes after the repair.",
                "",
            ]
    ld = data.get("load")
    if ld:
        L += [
            "## Load (item 5)",
            "",
            f"{ld['world']} ranks on {data.get('machine', '?')}, saving every step through memory, "
            f"node-local with peer copies (2 ranks a node) and persistent tiers for {ld.get('duration_s', ld['seconds']):.0f} s: "
            f"{ld['steps']} steps.",
            "",
            f"- event log (rank 0): {', '.join(f'{k}: {v}' for k, v in sorted(ld['checkpoints'].items()))}",
            f"- RSS growth after warm-up per rank (MiB): {ld['rss_growth_mib']}; RSS at the end (MiB): {ld['rss_mib']}",
            f"- open descriptors growth after warm-up per rank: {ld['fd_growth']}",
            f"- failures: {len(ld['failures'])}",
            "",
        ]
    s = data.get("sigterm")
    if s:
        L += [
            "## SIGTERM (item 6)",
            "",
            f"{s['signals']} SIGTERMs at random instants of a two-rank job (grace {s['grace_s']} s): "
            f"the step saved was the last step trained {s['last_step_saved']} times; the slowest "
            f"exit took {s['max_exit_s']} s after the signal. {len(s['failures'])} failures.",
            "",
        ]
    fails = sum(len(v.get("failures", [])) for v in data.values() if isinstance(v, dict))
    L += ["## Summary", ""]
    if k:
        rows = k["configs"].values()
        L.append(
            f"- committed checkpoints lost after {sum(r['kills'] for r in rows)} kills: "
            f"{sum(r['lost_committed'] for r in rows)}; restores that were not the newest or not "
            f"bit-exact: {sum(r['instants'] - r['restores_newest_bit_exact'] for r in rows)}"
        )
    if o:
        n = sum(r["trials"] for r in o["table"].values())
        L.append(
            f"- undetected corruptions in our format: {n - sum(r['detected'] for r in o['table'].values())} of {n}"
        )
    if f:
        L.append(
            f"- tracebacks on damaged foreign checkpoints: {sum(r['broken'] for r in f['table'].values())}"
        )
    if ld:
        L.append(
            f"- under load: RSS grew at most {max(ld['rss_growth_mib'])} MiB and descriptors at most "
            f"{max(ld['fd_growth'])} per rank after warm-up"
        )
    L += [f"- broken promises in all sections run: {fails}", ""]
    return "\n".join(L)


def _write(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), "reliability.md"), "w") as f:
        f.write(_md(data))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=120)
    ap.add_argument("--obj-kills", type=int, default=20)
    ap.add_argument("--ours", type=int, default=300)
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--foreign", type=int, default=150)
    ap.add_argument("--disk-rounds", type=int, default=2)
    ap.add_argument("--load-minutes", type=float, default=3.0)
    ap.add_argument("--load-world", type=int, default=8)
    ap.add_argument("--sigterms", type=int, default=20)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument(
        "--json", default=JSON, help="the figures file (several runs at once: one each)"
    )
    ap.add_argument(
        "--merge", nargs="*", default=[], help="figures files whose sections join --json's"
    )
    ap.add_argument(
        "--work", default=None, help="where the runs write (default: a temporary directory)"
    )
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    data: dict[str, Any] = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            data = json.load(f)
    for path in args.merge:
        with open(path) as f:
            data.update({k: v for k, v in json.load(f).items() if k in SECTIONS})
    data["machine"], data["seed"] = machine(), args.seed
    random.seed(args.seed)
    work = args.work or tempfile.mkdtemp(prefix="ek-torture-")
    runs = {
        "kills": lambda w: run_kills(w, args.kills, args.seed),
        "objkills": lambda w: run_objkills(w, args.obj_kills, args.seed),
        "ours": lambda w: run_ours(w, args.ours, args.seed),
        "peers": lambda w: run_peers(w, args.peers, args.seed),
        "foreign": lambda w: run_foreign(w, args.foreign, args.seed),
        "disks": lambda w: run_disks(w, args.disk_rounds, args.seed),
        "load": lambda w: run_load(w, args.load_world, args.load_minutes, args.seed),
        "sigterm": lambda w: run_sigterm(w, args.sigterms, args.seed),
    }
    for name in only:
        _say(f"section {name} in {work}/{name}")
        t0 = time.monotonic()
        os.makedirs(os.path.join(work, name), exist_ok=True)
        try:
            data[name] = runs[name](os.path.join(work, name))
        except Exception:  # noqa: BLE001 - a harness failure is a result too, and the run goes on
            import traceback

            data[name] = {
                "failures": [f"the {name} section raised:\n{traceback.format_exc()[-3000:]}"]
            }
            _say(data[name]["failures"][0])
        data[name]["seconds"] = round(time.monotonic() - t0, 1)
        _say(
            f"section {name}: {len(data[name].get('failures', []))} failures, {data[name]['seconds']} s"
        )
        _write(args.json, data)
    if args.merge or not only:
        _write(args.json, data)
    fails = sum(len(data[n].get("failures", [])) for n in only)
    _say(f"done: {fails} failures in {', '.join(only)}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
