"""experiments/RESULTS.md's generated-worlds section: written by `router experiment worlds`
between two markers, kept as it is by `router experiment results`."""

from __future__ import annotations

MARK_START, MARK_END = "<!-- worlds:start -->", "<!-- worlds:end -->"


def splice_section(text: str, section: str) -> str:
    """`text` with its worlds section replaced by `section` (appended when it has none)."""
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end > start:
        return text[:start] + section + text[end + len(MARK_END) :]
    head = text.rstrip("\n")
    return (head + "\n\n" if head else "") + section + "\n"


def worlds_section(text: str) -> str | None:
    """The worlds section of a RESULTS.md text, markers included, if it has one."""
    start, end = text.find(MARK_START), text.find(MARK_END)
    return text[start : end + len(MARK_END)] if start != -1 and end > start else None
