"""A preloaded Python that forks the training runs of the integration tests (run as a script).

    python _zygote.py SCRIPT [PRELOAD[?] ...]      (?: only where it is installed)

Importing torch and a framework costs seconds of CPU per process (transformers about 4 s,
Lightning about 4 s on this machine), and a kill-and-rerun test starts a dozen processes. This
process imports the training script's module (its top-level imports) and the PRELOAD modules
once, then forks each rank of each run from that state, so a run costs what its training
costs. A forked rank is a fresh process as far as the test is concerned: it runs the script's
`main()` with its own argv and environment, is killed from outside with SIGKILL, and exits
through the interpreter's exit handlers as a script does. Nothing of a run survives in the
zygote (it only imported modules, it never ran anything).

A multi-process run gets the environment torchrun gives its workers (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID, ...), and, as under torchrun, the TCPStore is
hosted by a separate agent process (forked too, port chosen by the OS) that the workers join as
clients (TORCHELASTIC_USE_AGENT_STORE=True).

Requests and answers are JSON lines on stdin/stdout:
    {"op": "run", "nproc": N, "args": [...], "logs": DIR, "env": {...}}
        -> {"pids": [...], "agent": PID | null}
    {"op": "wait", "pids": [...], "agent": PID | null, "timeout_s": T}
        -> {"codes": [...]}   (exit status per pid; -9 for SIGKILL; "timeout" if it was killed
                                 because it ran past T)
EOF on stdin: every child still running is killed, and the zygote exits.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
import traceback
import uuid

children: set[int] = set()


REPLIES = 1  # replaced in main() by a private copy of stdout


def _reply(obj: dict) -> None:
    os.write(REPLIES, (json.dumps(obj) + "\n").encode())


def _child(log_path: str) -> None:
    """In a freshly forked child: detach from the request channel, log to `log_path`."""
    os.close(REPLIES)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _agent(nproc: int, port_w: int) -> None:
    """The store host of a multi-process run (torchrun's agent does this for its workers)."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world_size=nproc, is_master=True, wait_for_workers=False)
    os.write(port_w, str(store.port).encode())
    os.close(port_w)
    while True:  # until the zygote ends the run
        signal.pause()


def _worker(script, argv: list[str], env: dict[str, str]) -> None:
    os.environ.update(env)
    sys.argv = argv
    code = 0
    try:
        script.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 (a script's failure is its exit status)
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what the interpreter does at exit (elastickit's close, logging)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(script, script_path: str, req: dict) -> dict:
    nproc = int(req["nproc"])
    logs = req["logs"]
    os.makedirs(logs, exist_ok=True)
    env = dict(req.get("env") or {})
    agent = None
    if nproc > 1:
        r, w = os.pipe()
        agent = os.fork()
        if agent == 0:
            os.close(r)
            _child(os.path.join(logs, "log-agent.txt"))
            try:
                _agent(nproc, w)
            finally:
                os._exit(1)
        os.close(w)
        port = int(os.read(r, 32).decode())
        os.close(r)
        children.add(agent)
        run_id = uuid.uuid4().hex
        base = {
            "GROUP_RANK": "0", "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(nproc), "WORLD_SIZE": str(nproc),
            "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_USE_AGENT_STORE": "True",
        }
    pids = []
    for rank in range(nproc):
        wenv = dict(env)
        if nproc > 1:
            wenv.update(base, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
        pid = os.fork()
        if pid == 0:
            _child(os.path.join(logs, f"log-{rank}.txt"))
            _worker(script, [script_path, *req["args"]], wenv)
        children.add(pid)
        pids.append(pid)
    return {"pids": pids, "agent": agent}


def _reap(pid: int, deadline: float) -> int | str:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            children.discard(pid)
            return "timeout"
        time.sleep(0.02)


def _wait(req: dict) -> dict:
    deadline = time.monotonic() + float(req["timeout_s"])
    codes = [_reap(pid, deadline) for pid in req["pids"]]
    agent = req.get("agent")
    if agent:
        try:
            os.kill(agent, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(agent, 0)
        children.discard(agent)
    return {"codes": codes}


def main() -> None:
    global REPLIES
    # Answers go to a private copy of stdout; whatever an import prints goes to stderr.
    REPLIES = os.dup(1)
    os.dup2(2, 1)
    script_path = os.path.abspath(sys.argv[1])
    spec = importlib.util.spec_from_file_location("_elastickit_test_script", script_path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # torch.optim imports torch._dynamo when the first optimizer is built (seconds).
    for name in ["torch._dynamo", "elastickit.api", *sys.argv[2:]]:
        # "name?": only where it is installed (DeepSpeed, which accelerate's unwrap_model imports
        # in every process where it can).
        if name.endswith("?"):
            name = name[:-1]
            if importlib.util.find_spec(name) is None:
                continue
        importlib.import_module(name)
    import torch.distributed  # noqa: F401  (the agent's TCPStore)

    # Move every object imported so far out of the collector's reach: a collection in a child
    # (the Trainer calls gc.collect() as it starts) would otherwise touch, and so copy, every
    # page of the preloaded heap (seconds each time).
    gc.collect()
    gc.freeze()
    # Forking is safe only from a single-threaded process (as for DataLoader workers).
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise SystemExit(f"the zygote has {len(threads)} threads after its imports; set OMP_NUM_THREADS=1")
    sys.stdout.flush()
    sys.stderr.flush()
    _reply({"ready": True})
    try:
        for line in sys.stdin:
            req = json.loads(line)
            if req["op"] == "run":
                _reply(_run(script, script_path, req))
            elif req["op"] == "wait":
                _reply(_wait(req))
            else:
                _reply({"error": f"unknown op {req['op']!r}"})
    finally:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


if __name__ == "__main__":
    main()
