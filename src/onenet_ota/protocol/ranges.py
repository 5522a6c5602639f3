"""The E6 ``Range`` header: grammar and OneNET's clamping (spec §6.6.1, §6.6.2, decision D8).

OneNET never answers 416: out-of-range requests are clamped. The unit-less form ``0-4095`` is the
one OneNET documents and the C SDK sends; ``bytes=0-4095`` is accepted as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# range-value = OWS [ unit OWS "=" OWS ] spec OWS   (§6.6.1; OWS is spaces and tabs only)
_RANGE_RE = re.compile(
    r"[ \t]*(?:bytes[ \t]*=[ \t]*)?"
    r"(?:(?P<first>[0-9]+)[ \t]*-[ \t]*(?P<last>[0-9]+)?|-[ \t]*(?P<suffix>[0-9]+))"
    r"[ \t]*",
    re.IGNORECASE,
)

# §6.6.1: "A number with more than 18 significant digits counts as larger than any package; it must
# not raise an error." Python's int() refuses very long digit strings, so cap before converting.
_HUGE = 10**18
_MAX_SIGNIFICANT_DIGITS = 18


def _number(digits: str) -> int:
    significant = digits.lstrip("0")
    if len(significant) > _MAX_SIGNIFICANT_DIGITS:
        return _HUGE
    return int(significant) if significant else 0


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """A parsed Range: form A ``s-e`` (first, last), B ``s-`` (first), or C ``-n`` (suffix)."""

    first: int | None
    last: int | None
    suffix: int | None

    def clamp(self, length: int) -> tuple[int, int]:
        """The inclusive byte range served for a file of ``length`` bytes (§6.6.2, in its order)."""
        if length < 1:
            raise ValueError("clamping is undefined for an empty file (D9)")
        if self.suffix is not None:  # form C
            n = min(self.suffix, length)
            return length - n, length - 1
        assert self.first is not None
        start = self.first
        if self.last is None:  # form B
            if start >= length:
                start = 0
            return start, length - 1
        # Form A. The start is kept when only the end runs past EOF: the C SDK's last chunk depends
        # on it (§6.6.2, §8.3). The English docs' "end := L-1 and start := 0" MUST NOT be used.
        end = self.last
        if end >= length:
            end = length - 1
        if start > end:
            start = 0
        return start, end


def parse_range(value: str) -> RangeSpec | None:
    """Parse one Range header value; None when it is malformed (served as if absent, D8)."""
    match = _RANGE_RE.fullmatch(value)
    if match is None:
        return None
    suffix = match.group("suffix")
    if suffix is not None:
        n = _number(suffix)
        if n < 1:  # "-0" has no meaningful answer (D8)
            return None
        return RangeSpec(first=None, last=None, suffix=n)
    first = _number(match.group("first"))
    last = match.group("last")
    return RangeSpec(first=first, last=None if last is None else _number(last), suffix=None)


def format_request_range(start: int, end: int) -> str:
    """The value a device sends: the unit-less ``start-end`` form (spec §10)."""
    if start < 0 or end < start:
        raise ValueError(f"invalid range {start}-{end}")
    return f"{start}-{end}"


def format_content_range(start: int, end: int, length: int) -> str:
    """The ``Content-Range`` value of a 206 reply (§6.6.3)."""
    return f"bytes {start}-{end}/{length}"


_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


def parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """Parse ``bytes s-e/L`` into (s, e, L or None); None when malformed or inverted."""
    match = _CONTENT_RANGE_RE.fullmatch(value.strip())
    if match is None:
        return None
    start, end = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if end < start or (total is not None and end >= total):
        return None
    return start, end, total
