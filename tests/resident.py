"""Resident memory of this process's file mappings, from /proc/self/smaps (Linux)."""

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
