"""Resident memory of this process's file mappings (/proc/self/smaps) and the page cache (mincore), on Linux."""

import ctypes
import mmap
from pathlib import Path


def mapped_rss(directory: Path) -> int:
    """Bytes of this process's resident memory that are mappings of files under `directory`."""
    total, counting = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                counting = len(fields) >= 6 and fields[5].startswith(str(directory))
            elif counting and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def cached_bytes(path: Path, offset: int = 0, length: int | None = None) -> int:
    """Bytes of `path[offset:offset + length]` (whole pages) that are in the kernel's page cache (mincore)."""
    size = path.stat().st_size
    length = size - offset if length is None else length
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        pages = -(-(offset + length - start) // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(mapped)  # an address for mincore, not a copy
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor) + start), ctypes.c_size_t(offset + length - start), vector):
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del anchor
    return sum(page & 1 for page in vector) * mmap.PAGESIZE
