"""The S3 server fixtures (tests/_s3.py) for every object-storage test."""

from tests._s3 import bucket, s3_env, s3_server  # noqa: F401
