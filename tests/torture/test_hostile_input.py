"""Hostile input (issue 17, item 4): property-based fuzzing of everything a user or a file hands
elastickit: manifest JSON, rules TOML, layout strings, `--inject` specs, CLI arguments, and
pickles with malicious globals in DeepSpeed `.pt` and DCP `.metadata` files. What must hold: the
documented error (one sentence naming the input) or a result, never another exception, never a
traceback, never code executed. The dashboard's refusals are fuzzed too (paths, methods, hosts).
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import shutil
import threading
import urllib.parse
import zipfile

import pytest
import xxhash
from elastickit.checkpoint.errors import DataError, RequestError
from elastickit.checkpoint.format.manifest import _CHECKSUM_SEP, Manifest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(300)

FUZZ = settings(
    max_examples=int(os.environ.get("EK_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)


def _one_sentence(msg: str) -> None:
    assert msg and "Traceback" not in msg, msg
    assert "\n" not in msg.strip(), f"more than one line: {msg!r}"


# -- manifest JSON -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_text(tmp_path_factory) -> str:
    import torch

    import elastickit as ek

    root = tmp_path_factory.mktemp("manifest")
    m = torch.nn.Linear(4, 3)
    with ek.Checkpointer(str(root)) as ck:
        ck.save(1, {"model": m, "data": {"pos": 1}})
    return (root / "step-00000001" / "manifest.json").read_text()


def _sealed(d: dict) -> str:
    """A manifest text whose own checksum matches (what a careful forger writes)."""
    d = {k: v for k, v in d.items() if k != "manifest_checksum"}
    head = json.dumps(d, separators=(",", ":"))[:-1]
    return f'{head}{_CHECKSUM_SEP}{xxhash.xxh3_64_hexdigest(head.encode())}"}}\n'


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _loads(text: str) -> None:
    try:
        Manifest.loads(text, source="step-1/manifest.json")
    except DataError as e:  # CorruptCheckpointError, UnsupportedFormatError, ... are DataErrors
        _one_sentence(str(e))
        assert "step-1/manifest.json" in str(e), str(e)


@FUZZ
@given(value=JSON)
def test_any_json_is_a_manifest_or_one_sentence(value):
    _loads(json.dumps(value))


@FUZZ
@given(data=st.data(), value=JSON)
def test_a_forged_manifest_with_a_valid_checksum_is_read_or_refused_in_one_sentence(
    manifest_text, data, value
):
    """Any field of a real manifest replaced by any JSON value, the checksum recomputed: the
    parser's validation (not the checksum) must catch what does not fit."""
    d = json.loads(manifest_text)
    paths = [p for p in _paths(d) if p and p[0] != "manifest_checksum"]
    path = data.draw(st.sampled_from(paths))
    target = d
    for k in path[:-1]:
        target = target[k]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = value
    _loads(_sealed(d))


@FUZZ
@given(data=st.data())
def test_damaged_manifest_text_is_caught(manifest_text, data):
    raw = bytearray(manifest_text.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    b = data.draw(st.integers(0, 255))
    assume(raw[i] != b)
    raw[i] = b
    with pytest.raises(DataError) as e:
        Manifest.loads(raw.decode("utf-8", errors="replace"), source="step-1/manifest.json")
    _one_sentence(str(e.value))


# -- rules TOML --------------------------------------------------------------------------------

TOML_SCALAR = (
    st.integers(-5, 10).map(str)
    | st.sampled_from(['"tp"', '"dp"', '"model/*"', '"*"', '"["', "true", "1.5", "[]", "{}", '"x"'])
    | st.text(max_size=6).map(json.dumps)
)
OP_NAMES = st.sampled_from(
    ["shard", "replicate", "pad", "fused", "rename", "expert", "flat", "nope", ""]
)
FIELDS = st.sampled_from(
    ["dim", "axis", "size", "parts", "to", "offsets", "pieces", "match", "op", "x"]
)


@st.composite
def rules_text(draw) -> str:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        out.append("[[rule]]")
        if draw(st.booleans()):
            out.append(f"match = {draw(TOML_SCALAR)}")
        ops = []
        for _ in range(draw(st.integers(0, 3))):
            kv = [f'op = "{draw(OP_NAMES)}"'] + [
                f"{draw(FIELDS)} = {draw(TOML_SCALAR)}" for _ in range(draw(st.integers(0, 3)))
            ]
            ops.append("{" + ", ".join(dict.fromkeys(kv)) + "}")
        if ops or draw(st.booleans()):
            out.append(f"ops = [{', '.join(ops)}]")
        if draw(st.booleans()):
            out.append(f"{draw(FIELDS)} = {draw(TOML_SCALAR)}")
    if draw(st.booleans()):
        out.insert(0, draw(st.text(max_size=20)))
    return "\n".join(out) + "\n"


@FUZZ
@given(text=rules_text())
def test_any_rules_file_loads_or_is_refused_in_one_sentence(tmp_path, text):
    from elastickit.reshard.rules import load_rules

    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_rules(str(path))
    except RequestError as e:
        msg = str(e)
        assert msg and "Traceback" not in msg and str(path) in msg, msg


# -- layout strings and --inject specs ---------------------------------------------------------

LAYOUT_TEXT = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.tuples(
            st.sampled_from(["tp", "dp", "pp", "zero", "order", "ep", "TP", "", " dp"]),
            st.sampled_from(["=", "", "==", ":"]),
            st.sampled_from(
                ["1", "2", "0", "-1", "x", "", "1e9", "99999999999999999999", "pp.dp.tp", "dp.dp"]
            ),
        ).map("".join),
        max_size=5,
    ).map(",".join),
)


@FUZZ
@given(text=LAYOUT_TEXT)
def test_layout_strings_parse_or_raise_value_error(text):
    from elastickit.reshard.layout import ParallelLayout

    from elastickit.elastic.policy import Layout
    from elastickit.trainer.parallel import TrainLayout

    for parse in (ParallelLayout.parse, TrainLayout.parse, Layout.parse):
        try:
            got = parse(text)
        except (ValueError, RequestError) as e:
            _one_sentence(str(e))
            continue
        if parse is ParallelLayout.parse:
            assert parse(str(got)) == got  # a parsed layout round-trips


INJECT_TEXT = st.one_of(
    st.text(max_size=30),
    st.tuples(
        st.sampled_from(["slow", "slowlink", "hang", "crash", "nope", ""]),
        st.lists(
            st.tuples(
                st.sampled_from(["rank", "ms", "step", "src", "dst", "x", ""]),
                st.sampled_from(["=", "", "=="]),
                st.sampled_from(
                    ["0", "1", "7", "-1", "1.5", "x", "", "99999999999999999999", "nan", "inf"]
                ),
            ).map("".join),
            max_size=4,
        ),
    ).map(lambda t: ":".join([t[0], *t[1]])),
)


@FUZZ
@given(text=INJECT_TEXT, world=st.integers(1, 8))
def test_inject_specs_parse_or_name_the_flag(text, world):
    from elastickit.faults import parse_fault

    try:
        spec = parse_fault(text, world)
    except RequestError as e:
        _one_sentence(str(e))
        assert "--inject" in str(e)
        return
    for r in (spec.rank, spec.src, spec.dst):
        assert -1 <= r < world, spec  # a spec that parses names ranks that exist


# -- CLI arguments -----------------------------------------------------------------------------

COMMANDS = ["inspect", "verify", "ls", "convert", "reshard"]
FLAGS = [
    "--json",
    "--layout",
    "--rules",
    "--from",
    "--to",
    "--step",
    "--trust-pickle",
    "--debug",
    "--world-size",
    "--help",
    "-x",
    "--",
    "--strict",
    "--tensor",
]


@pytest.fixture(scope="module")
def cli_paths(tmp_path_factory):
    import torch
    from elastickit.reshard.layout import ParallelLayout
    from elastickit.virtual import save_virtual

    base = tmp_path_factory.mktemp("cli")
    save_virtual(str(base / "ck"), 2, ParallelLayout(), [{"model/w": torch.ones(4, 2)}])
    (base / "junk.toml").write_text("[[rule]\n")
    (base / "empty").mkdir()
    (base / "file.bin").write_bytes(b"\x00\xff" * 10)
    return base


@FUZZ
@given(data=st.data())
def test_cli_arguments_get_an_answer_never_a_traceback(cli_paths, data):
    from typer.testing import CliRunner

    from elastickit.cli.main import app

    values = [
        str(cli_paths / n) for n in ("ck", "ck/step-x", "junk.toml", "empty", "file.bin", "nope")
    ]
    values += [
        "tp=2",
        "dp=0",
        "-1",
        "0",
        "99999999999999999999",
        "deepspeed",
        "dcp",
        "",
        "\x00",
        "é",
    ]
    token = st.sampled_from(FLAGS) | st.sampled_from(values) | st.text(max_size=8)
    args = [data.draw(st.sampled_from(COMMANDS)), *data.draw(st.lists(token, max_size=5))]
    out = str(cli_paths / "out")
    shutil.rmtree(out, ignore_errors=True)
    if args[0] in ("convert", "reshard"):
        args.insert(2 if len(args) > 1 else 1, out)
    res = CliRunner().invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        args,
        repr(res.exception),
    )
    assert "Traceback" not in res.output and "internal error" not in res.output.lower(), (
        args,
        res.output,
    )
    assert res.exit_code in (0, 1, 2), (args, res.exit_code, res.output)


# -- pickles with malicious globals ------------------------------------------------------------

EVIL = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("subprocess", "getoutput"),
    ("subprocess", "Popen"),
    ("builtins", "__import__"),
    ("builtins", "getattr"),
    ("shutil", "rmtree"),
    ("io", "open"),
    ("builtins", "open"),
    ("torch", "load"),
    ("numpy", "load"),
    ("pickle", "loads"),
    ("runpy", "run_path"),
]


def _unicode(s: str) -> bytes:
    data = s.encode()
    return (
        b"\x8c" + bytes([len(data)]) + data
        if len(data) < 256
        else b"X" + len(data).to_bytes(4, "little") + data
    )


@st.composite
def evil_pickle(draw, canary: str) -> bytes:
    """A pickle that, fully unpickled, would create `canary` (or call something worse)."""
    module, name = draw(
        st.sampled_from(EVIL)
        | st.tuples(
            st.from_regex(r"[a-z_.]{1,12}", fullmatch=True),
            st.from_regex(r"[A-Za-z_]{1,12}", fullmatch=True),
        )
    )
    if name in ("system", "getoutput"):
        arg = f"touch {canary}"
    elif name in ("eval", "exec"):
        arg = f"open({canary!r}, 'w').close()"
    else:
        arg = canary
    if draw(st.booleans()):  # protocol 2, GLOBAL opcode
        call = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    else:  # protocol 4, STACK_GLOBAL
        call = _unicode(module) + _unicode(name) + b"\x93"
    call += b"(" + _unicode(arg) + b"tR"
    where = draw(st.sampled_from(["top", "in a dict", "in a list"]))
    if where == "in a dict":
        body = b"}" + _unicode("optimizer_state_dict") + call + b"s"
    elif where == "in a list":
        body = b"](" + call + b"e"
    else:
        body = call
    return b"\x80\x04" + body + b"."


def _torch_zip(path: pathlib.Path, pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@FUZZ
@given(data=st.data())
def test_a_deepspeed_file_with_malicious_globals_runs_nothing(tmp_path, data):
    from elastickit.reshard.adapters.deepspeed_pickle import load_pt

    canary = tmp_path / "pwned"
    pkl = data.draw(evil_pickle(str(canary)))
    path = tmp_path / "mp_rank_00_model_states.pt"
    _torch_zip(path, pkl)
    try:
        got = load_pt(str(path))
    except DataError as e:
        _one_sentence(str(e))
        assert str(path) in str(e)
    else:  # only a global on the allowlist may load, and it is an inert stand-in
        assert not callable(got) or isinstance(got, type), got
    assert not canary.exists(), "the pickle ran code"


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory):
    from tests.torture import foreign

    path = tmp_path_factory.mktemp("dcp") / "ck"
    foreign.make_dcp(str(path))
    return path


@FUZZ
@given(data=st.data())
def test_a_dcp_metadata_with_malicious_globals_runs_nothing(dcp_dir, tmp_path, data):
    from tests.torture import foreign

    canary = tmp_path / "pwned"
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(dcp_dir, src)
    (src / ".metadata").write_bytes(data.draw(evil_pickle(str(canary))))
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    code, text = foreign.convert(str(src), str(out))
    assert code in (1, 2), text
    assert "Traceback" not in text and ".metadata" in text, text
    assert not canary.exists(), "the pickle ran code"


# -- the dashboard -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard():
    from elastickit.dashboard.logs import RunSources
    from elastickit.dashboard.server import make_server
    from elastickit.dashboard.summary import Dashboard

    run = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "dashboard" / "run"
    server = make_server(Dashboard(RunSources.from_run_dir(str(run))), port=0, token="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _request(server, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


SEGMENTS = st.sampled_from(
    [
        "api",
        "static",
        "summary",
        "job",
        "..",
        "%2e%2e",
        "%2f",
        "%00",
        "app.js",
        "style.css",
        "etc",
        "passwd",
        "",
        ".",
        "%5c",
        "~",
        "index.html",
        "events?type=crash",
        "?token=s3cret",
        "logs.py",
    ]
)


@FUZZ
@given(
    segs=st.lists(SEGMENTS | st.text(max_size=6), max_size=5),
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "get"]),
    auth=st.sampled_from(["", "Bearer s3cret", "Bearer wrong", "Basic czNjcmV0", "Bearer "]),
    host=st.sampled_from(["127.0.0.1", "localhost", "evil.example", "127.0.0.1.evil.example", ""]),
)
def test_the_dashboard_refuses_what_it_must(dashboard, segs, method, auth, host):
    path = "/" + "/".join(urllib.parse.quote(s, safe="/%?=.~") for s in segs)
    headers = {"Host": f"{host}:{dashboard.server_port}"} if host else {}
    if auth:
        headers["Authorization"] = auth
    status, body = _request(dashboard, method, path, headers)
    assert status != 500 and b"Traceback" not in body, (method, path, status, body[:300])
    if status == 200:
        # Data only with the token, to a loopback name, by GET or HEAD, on a known path.
        assert auth == "Bearer s3cret" or "?token=s3cret" in path, (method, path, headers)
        assert host in ("127.0.0.1", "localhost"), (method, path, headers)
        assert method in ("GET", "HEAD"), (method, path)
        assert ".." not in path and "%2e" not in path.lower() and "%00" not in path, path
