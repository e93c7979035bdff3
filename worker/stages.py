"""Weighted stages: turn "step 3 of 10 of the convert stage" into the job's overall percentage.

A job made of parts that take different amounts of time names them with a weight each (any
unit: seconds you expect, or just "convert is 3 times download")::

    stages = Stages(ctx, {"download": 1, "convert": 3, "upload": 1})
    await stages.enter("download")                      # 0 %, stage "download"
    await stages.step(1, 2, message="first half")       # 10 %
    await stages.enter("convert")                       # 20 %, stage "convert"
    for i, chunk in enumerate(chunks, 1):
        await stages.step(i, len(chunks), message=f"chunk {i} of {len(chunks)}")   # 20 % .. 80 %
    await stages.enter("upload")                        # 80 %, then 80 % .. 100 %

Each call computes the overall percentage and reports it with ``ctx.progress(pct, message=...,
stage=name)``, so the document's ``progress``, ``stage`` and ``eta_s`` come out right.

Async and sync jobs use the same class. Every reporting method returns what ``ctx.progress``
returns: with an async job's context (``worker.progress.JobContext``) that is a coroutine to
``await``; with a plain ``def`` job's context (``worker.progress.ThreadJobContext``) the report
is made during the call and there is nothing to await::

    def crunch(ctx, params):                 # a sync job, run in a thread
        stages = Stages(ctx, ["load", "crunch"])
        stages.enter("load")
        ...
        stages.step(i, n)

The arithmetic (``percent``) needs no context and does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class Stages:
    """The stages of one job run, in order, with their weights.

    Contract:

    * ``weights`` is a mapping ``name -> weight`` (weights finite and > 0) or a sequence of
      names (weight 1 each); the order given is the order the job runs them in.
    * Stages are entered in that order; a stage may be skipped (it then counts as done), but
      entering an earlier stage than the current one raises ``ValueError``.
    * The reported percentage never goes back during a run: a ``step`` below an earlier one
      reports the earlier percentage again.
    * ``ctx`` is anything with ``progress(pct, message=None, stage=None)`` (the job's ctx), or
      ``None`` when only ``percent`` is used.
    """

    def __init__(self, ctx: Any, weights: Mapping[str, float] | Iterable[str]) -> None:
        items = list(weights.items()) if isinstance(weights, Mapping) else [(name, 1.0) for name in weights]
        if not items:
            raise ValueError("Stages needs at least one stage")
        names = [name for name, _ in items]
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError("stage names must be distinct, non-empty strings")
        for name, weight in items:
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight < float("inf"):
                raise ValueError(f"stage {name!r}: weight must be a finite number > 0, not {weight!r}")
        self.ctx = ctx
        self.names: list[str] = names
        total = float(sum(weight for _, weight in items))
        self._share = {name: weight / total for name, weight in items}  # fraction of the whole job
        self._start: dict[str, float] = {}  # fraction done when the stage begins
        done = 0.0
        for name in names:
            self._start[name] = done
            done += self._share[name]
        self.current: str | None = None
        self.reported = 0.0  # the highest percentage reported so far

    def percent(self, stage: str, done: float = 0, total: float = 1) -> float:
        """Overall percentage (0-100) when ``done`` of ``total`` units of ``stage`` are finished.

        ``total`` must be > 0; ``done`` is clamped to ``0..total``. Pure arithmetic.
        """
        if stage not in self._share:
            raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(self.names)}")
        if not total > 0:
            raise ValueError(f"total must be > 0, not {total!r}")
        fraction = min(max(float(done), 0.0), float(total)) / float(total)
        return min(100.0, 100.0 * (self._start[stage] + self._share[stage] * fraction))

    def enter(self, stage: str, message: str | None = None) -> Any:
        """Begin ``stage``: report the percentage at its start, with ``stage`` set (always published)."""
        if stage not in self._share:
            raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(self.names)}")
        if self.current is not None and self.names.index(stage) < self.names.index(self.current):
            raise ValueError(f"stage {stage!r} comes before the current stage {self.current!r}")
        self.current = stage
        return self._report(self.percent(stage, 0), message)

    def step(self, done: float, total: float, message: str | None = None) -> Any:
        """Report that ``done`` of ``total`` units of the current stage are finished."""
        if self.current is None:
            raise RuntimeError("call enter(stage) before step()")
        return self._report(self.percent(self.current, done, total), message)

    def _report(self, pct: float, message: str | None) -> Any:
        self.reported = max(self.reported, pct)
        return self.ctx.progress(self.reported, message=message, stage=self.current)
