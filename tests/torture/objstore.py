"""An S3-compatible server for the object-storage kill runs (moto's standalone server on
127.0.0.1, a port the OS picks, in this process) and the environment the ranks need."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator

ENV = {
    "AWS_ACCESS_KEY_ID": "ek-torture-access",
    "AWS_SECRET_ACCESS_KEY": "ek-torture-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def missing() -> str | None:
    """Why the object-storage runs cannot run here (None: they can)."""
    for mod, extra in (("moto.server", "dev"), ("s3fs", "s3")):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (the {extra} extra)"
    return None


@contextlib.contextmanager
def s3_root() -> Iterator[tuple[str, dict[str, str]]]:
    """A fresh bucket on a fresh server: yields (the root URL, the environment for the ranks);
    this process's environment points at the server meanwhile."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        bucket = f"ek-torture-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        url = f"s3://{bucket}/run"
        yield url, {**env, "EK_TORTURE_S3": url}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
        # fsspec caches filesystems by their arguments, not by the environment: a later test's
        # `s3://` root in this process would reach this stopped server through the cache.
        s3fs.S3FileSystem.clear_instance_cache()
