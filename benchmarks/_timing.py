"""Shared helpers of the benchmarks: a wall-clock `Timer` that wraps named methods of live objects, and statistics.

Used by benchmarks/step_breakdown.py, vs_trl.py, scaling.py and (`write_results`) evaluate_sharing.py and
cycle_reward_sensitivity.py (not a script; nothing to run here).

`Timer.wrap(obj, "method", part)` replaces ``obj.method`` on that one instance by a wrapper that calls the
original unchanged and adds its wall time to ``part``. Nested timed calls are *exclusive*: the time of an inner
timed call goes to the inner part and is subtracted from the outer one, so the parts of a step never overlap and
"other" = step total - sum of parts. A part wrapped with ``opaque=True`` (e.g. the reverse-model pass) keeps the
whole time of everything it calls: timed methods called inside it are not split off.

`Timer(probe=...)` also attributes the changes of a counter dict (e.g. `Sa2VAPolicy.counters`) to the parts, with
the same exclusive rule.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any


class _Frame:
    __slots__ = ("part", "opaque", "start", "child_time", "probe_start", "child_probe")

    def __init__(self, part: str, opaque: bool, probe: Counter | None):
        self.part = part
        self.opaque = opaque
        self.start = time.perf_counter()
        self.child_time = 0.0
        self.probe_start = probe
        self.child_probe: Counter = Counter()


class Timer:
    """Accumulates exclusive wall time (and optional counter deltas) per named part.

    Args:
        probe: optional callable returning a dict of integer counters; their changes during each timed call are
            attributed to its part (exclusive of nested timed calls), in `counts`.

    Attributes:
        totals: part -> seconds since the last `reset`.
        calls: part -> number of timed calls since the last `reset`.
        counts: part -> Counter of probe deltas since the last `reset`.
    """

    def __init__(self, probe: Callable[[], dict[str, int]] | None = None):
        self.probe = probe
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self._stack: list[_Frame] = []
        self._patched: list[tuple[Any, str, bool, Any]] = []

    # --- timing ---------------------------------------------------------------------------------------------------
    def _read_probe(self) -> Counter | None:
        return Counter(self.probe()) if self.probe is not None else None

    def _enter(self, part: str, opaque: bool) -> _Frame | None:
        if any(frame.opaque for frame in self._stack):
            return None  # absorbed by an opaque outer part
        frame = _Frame(part, opaque, self._read_probe())
        self._stack.append(frame)
        return frame

    def _exit(self, frame: _Frame | None) -> None:
        if frame is None:
            return
        elapsed = time.perf_counter() - frame.start
        popped = self._stack.pop()
        assert popped is frame, "timed calls must nest"
        self.totals[frame.part] += elapsed - frame.child_time
        self.calls[frame.part] += 1
        delta = Counter()
        if frame.probe_start is not None:
            end = self._read_probe()
            delta = Counter({k: end[k] - frame.probe_start.get(k, 0) for k in end})
            own = Counter({k: delta[k] - frame.child_probe.get(k, 0) for k in delta})
            self.counts[frame.part].update({k: v for k, v in own.items() if v})
        if self._stack:
            parent = self._stack[-1]
            parent.child_time += elapsed
            parent.child_probe.update(delta)

    def region(self, part: str, opaque: bool = False):
        """Context manager timing a block as `part`."""
        timer = self

        class _Region:
            def __enter__(self):
                self.frame = timer._enter(part, opaque)

            def __exit__(self, *exc):
                timer._exit(self.frame)
                return False

        return _Region()

    def wrap(self, obj: Any, name: str, part: str | Callable[[], str], opaque: bool = False) -> None:
        """Time every call of ``obj.<name>`` as `part` (a name, or a callable giving it at call time).

        The instance attribute is replaced by a wrapper calling the original (same arguments, same result);
        `restore` puts the original back.
        """
        original = getattr(obj, name)
        had_own = name in getattr(obj, "__dict__", {})
        previous = obj.__dict__.get(name) if had_own else None

        @functools.wraps(original)
        def timed(*args, **kwargs):
            frame = self._enter(part() if callable(part) else part, opaque)
            try:
                return original(*args, **kwargs)
            finally:
                self._exit(frame)

        setattr(obj, name, timed)
        self._patched.append((obj, name, had_own, previous))

    def restore(self) -> None:
        """Undo every `wrap` (latest first)."""
        for obj, name, had_own, previous in reversed(self._patched):
            if had_own:
                setattr(obj, name, previous)
            else:
                delattr(obj, name)
        self._patched = []

    def take(self) -> tuple[dict[str, float], dict[str, int], dict[str, dict[str, int]]]:
        """(totals, calls, counts) since the last take, then reset them."""
        out = dict(self.totals), dict(self.calls), {k: dict(v) for k, v in self.counts.items()}
        self.totals = defaultdict(float)
        self.calls = defaultdict(int)
        self.counts = defaultdict(Counter)
        return out


# --- statistics ---------------------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): the growth order (1.0 = linear)."""
    import math

    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / var if var else float("nan")


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table (markdown pipes), numbers formatted compactly."""

    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    table = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in table]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import os
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    for name in ("transformers", "trl", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def write_results(output: dict[str, Any], path: str) -> dict[str, Any]:
    """Write a benchmark's JSON (creating its folder) and say where."""
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(output, indent=1, default=str))
    print(f"\nwritten to {path}")
    return output
