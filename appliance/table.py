"""Tables in dmsetup's format: `<start> <length> <target> <args...>`, in 512-byte sectors.

A table is parsed here without opening anything, so `check-config` and the
daemon agree on what is well formed. Constructing the targets (which opens
devices) is the mapped device's job.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from . import SECTOR_SIZE


class TableError(ValueError):
    """A table that cannot be loaded. `line` is 1-based; 0 means the table as a whole."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Segment:
    """One table line: a range of the mapped device handed to one target."""

    start: int  # sectors
    length: int  # sectors
    target: str
    args: tuple[str, ...]
    line: int = 0

    @property
    def offset(self) -> int:
        return self.start * SECTOR_SIZE

    @property
    def size(self) -> int:
        return self.length * SECTOR_SIZE

    def text(self, args: tuple[str, ...] | None = None) -> str:
        words = [str(self.start), str(self.length), self.target, *(args if args is not None else self.args)]
        return " ".join(shlex.quote(w) for w in words)


def _sectors(word: str, what: str, lineno: int) -> int:
    try:
        value = int(word, 10)
    except ValueError:
        raise TableError(lineno, f"{what} {word!r} is not a whole number of sectors") from None
    if value < 0:
        raise TableError(lineno, f"{what} {word} is negative")
    return value


def parse_line(text: str, lineno: int = 1) -> Segment:
    try:
        words = shlex.split(text, comments=True)
    except ValueError as e:
        raise TableError(lineno, f"cannot split {text!r}: {e}") from None
    if len(words) < 3:
        raise TableError(lineno, f"expected '<start> <length> <target> <args...>', got {text!r}")
    start = _sectors(words[0], "start", lineno)
    length = _sectors(words[1], "length", lineno)
    if length == 0:
        raise TableError(lineno, "length is zero")
    from .targets import known_targets  # late: targets import this module

    target = words[2]
    if target not in known_targets():
        raise TableError(lineno, f"unknown target {target!r}; targets: {', '.join(sorted(known_targets()))}")
    return Segment(start, length, target, tuple(words[3:]), lineno)


def parse_table(lines, *, known_devices: set[str] | None = None) -> list[Segment]:
    """Parse and check a whole table: the segments must tile [0, size) with no gap or overlap.

    `known_devices`, when given, is the set of names an `@NAME` argument may refer to.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    segments = []
    for lineno, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        segments.append(parse_line(text, lineno))
    if not segments:
        raise TableError(0, "table is empty")
    segments.sort(key=lambda s: s.start)
    expected = 0
    for seg in segments:
        if seg.start > expected:
            raise TableError(seg.line, f"gap: sectors {expected}..{seg.start - 1} are not mapped")
        if seg.start < expected:
            raise TableError(seg.line, f"overlap: segment starts at {seg.start}, previous one ends at {expected}")
        expected = seg.start + seg.length
    if known_devices is not None:
        for seg in segments:
            for word in seg.args:
                if word.startswith("@") and word[1:] not in known_devices:
                    raise TableError(seg.line, f"unknown device {word}")
    return segments


def references(segments) -> set[str]:
    """Names of the mapped devices (`@NAME`) a table stacks on."""
    return {w[1:] for s in segments for w in s.args if w.startswith("@") and len(w) > 1}


def table_size(segments) -> int:
    """Size in bytes of the device a checked table describes."""
    last = segments[-1]
    return (last.start + last.length) * SECTOR_SIZE
