"""A real S3-compatible server for the object-storage tests: moto's standalone server on
127.0.0.1, a port the OS picks, as s3fs's own test suite does.

`s3_server` (session) starts it once; `s3_env` points the environment (which s3fs, botocore and
spawned ranks read) at it with throwaway credentials; `bucket` makes a fresh bucket per test.
"""

from __future__ import annotations

import logging
import uuid

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
pytest.importorskip("s3fs", reason="s3fs is in the s3 extra")

ACCESS_KEY = "ek-test-access"
SECRET_KEY = "ek-test-secret-DO-NOT-LEAK-7f3a9c"


@pytest.fixture(scope="session")
def s3_server():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The environment a user sets for an S3-compatible endpoint (inherited by spawned ranks)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


@pytest.fixture
def bucket(s3_env):
    """A fresh, empty bucket name."""
    import s3fs

    name = f"ek-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return name


def s3fs_client():
    """A plain s3fs filesystem on the test server (for tests that poke objects directly)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


