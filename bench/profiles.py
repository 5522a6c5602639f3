"""Reading profiles of a server process: py-spy's collapsed stacks, summarised by function.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;...;leaf N``,
each frame ``function (file:line)``, with ``process N:"cmdline"`` first when subprocesses are
sampled. Without ``--idle`` only busy samples are kept (a thread on the CPU, or in a system call
it did not block on), so the shares are shares of the server's work, not of the wall time.
:func:`top_functions` adds the samples up per function (line numbers dropped): *self* counts
samples where the function was the leaf, *total* those where it was anywhere on the stack.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Final

__all__ = ["top_functions"]

_FRAME: Final = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _function(frame: str) -> str | None:
    if frame.startswith("process "):
        return None
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    # Keep the package-relative tail: ".../site-packages/sqlalchemy/engine/base.py" -> "...".
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = path.split("/", 1)[-1]
            break
    return f"{match['name']} ({path})"


def top_functions(path: Path, limit: int = 20) -> list[str]:
    """The ``limit`` functions with the most self samples, as printable lines (empty if none)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in (_function(x) for x in stack.split(";")) if f is not None]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    if not samples:
        return []
    out = [
        f"py-spy: {samples} busy samples of the server process(es)",
        f"{'self':>6} {'total':>6}  function",
    ]
    for name, count in own.most_common(limit):
        out.append(f"{count / samples:6.1%} {total[name] / samples:6.1%}  {name}")
    return out
