"""Sizes, work and durations as the command line prints them."""

from __future__ import annotations

PREFIXES = ("", "K", "M", "G", "T", "P")


def _decimal(n: float, unit: str) -> str:
    for prefix in PREFIXES:
        if abs(n) < 1000 or prefix == PREFIXES[-1]:
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000


def human_bytes(n: float) -> str:
    """Decimal units, as disks are sold: 999 B, 1.2 MB, 48.4 GB."""
    return _decimal(n, "B")


def human_flops(n: float) -> str:
    return _decimal(n, "FLOP")


def human_seconds(seconds: float) -> str:
    """Seconds, minutes or hours, whichever reads best: 45 s, 12 min, 3.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
