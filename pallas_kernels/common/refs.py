"""Splitting a kernel's flat ref list into its named groups."""

from __future__ import annotations


def split(refs, *sizes):
    """``refs`` cut into consecutive groups of the given sizes, plus the remainder as the last group."""
    out, i = [], 0
    for n in sizes:
        out.append(tuple(refs[i:i + n]))
        i += n
    out.append(tuple(refs[i:]))
    return out
