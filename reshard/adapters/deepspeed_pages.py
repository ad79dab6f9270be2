"""Giving back the pages of memory-mapped checkpoint files once they have been read.

`torch.load(mmap=True)` maps each DeepSpeed file privately; every page a conversion touches
stays resident (and counts in the process's RSS) until the mapping goes away. A conversion reads
each flat buffer front to back, so once a parameter is done, the pages before its end are not
needed again. `PageReleaser` hands those pages back with `madvise(MADV_DONTNEED)`.

Safety: on a private mapping of a file that is never written, MADV_DONTNEED only drops clean
pages; a later access reads them again from the file. On anonymous memory it would zero data,
so a range is released only if `/proc/self/maps` shows it inside a mapping of the expected file.
Anywhere this cannot be checked (not Linux, no libc), releasing does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import torch

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def _libc():
    if not os.path.exists("/proc/self/maps"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return lib
    except (OSError, AttributeError):
        return None


class PageReleaser:
    """Releases already-read prefixes of tensors that live in memory-mapped files."""

    def __init__(self) -> None:
        self._libc = _libc()
        self._ranges: dict[str, list[tuple[int, int]]] = {}
        self._done: dict[int, int] = {}  # tensor base address -> released up to this address

    @property
    def enabled(self) -> bool:
        """True where pages can be released safely (Linux with /proc and libc)."""
        return self._libc is not None

    def watch(self, path: str) -> None:
        """Record the address ranges at which `path` is mapped (call right after loading it)."""
        if not self.enabled:
            return
        real = os.path.realpath(path)
        ranges = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
        self._ranges[real] = ranges

    def _mapped(self, lo: int, hi: int) -> bool:
        return any(a <= lo and hi <= b for ranges in self._ranges.values() for a, b in ranges)

    def release_prefix(self, tensor: torch.Tensor, upto_elements: int) -> None:
        """Release the whole pages of `tensor`'s first `upto_elements` elements."""
        if not self.enabled or tensor.numel() == 0:
            return
        base = tensor.data_ptr()
        end = base + min(upto_elements, tensor.numel()) * tensor.element_size()
        lo = max(self._done.get(base, base), base)
        lo = (lo + _PAGE - 1) // _PAGE * _PAGE
        hi = end // _PAGE * _PAGE
        if hi <= lo or not self._mapped(lo, hi):
            return
        self._libc.madvise(ctypes.c_void_p(lo), hi - lo, _MADV_DONTNEED)
        self._done[base] = hi

    def release(self, tensor: torch.Tensor) -> None:
        """Release every whole page of `tensor`."""
        self.release_prefix(tensor, tensor.numel())
