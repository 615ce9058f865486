"""Numbers for people: percentages and byte counts in labelled binary units (JSON keeps the raw values)."""

from __future__ import annotations


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_bytes(n: float) -> str:
    """A byte count for people, in binary units labelled as such (1 MiB = 2^20 bytes); JSON keeps raw bytes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
