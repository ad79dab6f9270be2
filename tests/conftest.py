"""Test setup shared by every suite: one torch thread per process (2-core machine)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
