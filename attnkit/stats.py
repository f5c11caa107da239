"""Counters of what a method did: on the last forward call and in total since it was applied."""

from __future__ import annotations

from typing import Any


class Stats:
    """Per-method counters. The engine calls :meth:`begin_call` before every forward pass and
    :meth:`reset` when the method is applied, so totals count from that apply."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.info: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.total: dict[str, Any] = {}
        self.calls = 0
        self.phases: dict[str, int] = {}
        self.ratios: dict[str, tuple[str, str]] = {}
        self.growth: dict[str, int | float] = {}
        """The last call's per-token growth of its counters (see :meth:`add`)."""

    def begin_call(self, phase: str) -> None:
        """A forward call begins; ``phase`` is prefill, decode or extend, as read from its cache."""
        self.last = {"phase": phase}
        self.growth = {}
        self.calls += 1
        self.phases[phase] = self.phases.get(phase, 0) + 1

    def add(self, key: str, amount: int | float = 1, per_token: int | float = 0) -> None:
        """Add to a counter (tokens, heads touched, bytes saved...). ``per_token``: how much more the
        same work adds for each token further into the sequence (keys of a cache that grows by one a
        step), so that a replayed call counts what it does where it runs (:meth:`repeat`)."""
        self.last[key] = self.last.get(key, 0) + amount
        self.total[key] = self.total.get(key, 0) + amount
        if per_token:
            self.growth[key] = self.growth.get(key, 0) + per_token

    def set(self, key: str, value: Any) -> None:
        """Record a value that describes the call rather than counts (a sink list, a budget)."""
        self.last[key] = value
        self.total[key] = value

    def tally(self, key: str, index: Any, amounts: list[int | float]) -> None:
        """Add ``amounts`` element-wise under ``key[index]`` (per-layer counters, say)."""
        for record in (self.last, self.total):
            table = record.setdefault(key, {})
            old = table.get(index, [0] * len(amounts))
            table[index] = [a + b for a, b in zip(old, amounts)]

    def ratio(self, key: str, numerator: str, denominator: str) -> None:
        """Record ``numerator / denominator`` of two counters (0 when the denominator is 0) under
        ``key``, for the last call and for the totals alike (a mean per row, say)."""
        self.ratios[key] = (numerator, denominator)
        for record in (self.last, self.total):
            _divide(record, key, numerator, denominator)

    def describe(self, key: str, value: Any) -> None:
        """Record a fixed fact about the method as applied (heads targeted), shown with every snapshot."""
        self.info[key] = value

    def snapshot(self, total: bool = False) -> dict[str, Any]:
        if total:
            return {**self.info, "calls": self.calls, "phases": dict(self.phases), **self.total}
        return {**self.info, **self.last}

    def checkpoint(self) -> tuple[Any, ...]:
        """Everything counted so far, for :meth:`rollback` (work that ran but should not count)."""
        return dict(self.total), self.calls, dict(self.phases), dict(self.last), dict(self.growth)

    def rollback(self, saved: tuple[Any, ...]) -> None:
        self.total, self.calls, self.phases, self.last, self.growth = (
            dict(saved[0]), saved[1], dict(saved[2]), dict(saved[3]), dict(saved[4])
        )  # fmt: skip

    def repeat(
        self, call: dict[str, Any], times: int = 1, growth: dict[str, int | float] | None = None, later: int = 0
    ) -> None:
        """Count ``call`` (a :meth:`snapshot` of one call) ``times`` more times: a captured decode
        step replays the recorded call's work exactly, without running the Python that counts it.
        ``growth`` (the recorded call's :attr:`growth`): the first repeat runs ``later`` tokens after
        the recorded call, each next one a token further, and its growing counters grow so."""
        growth = growth or {}
        steps = times * later + times * (times - 1) // 2  # tokens past the recorded call, summed over the repeats
        phase = call.get("phase")
        self.calls += times
        if phase is not None:
            self.phases[phase] = self.phases.get(phase, 0) + times
        for key, value in call.items():
            if (
                key != "phase"
                and key not in self.info
                and key not in self.ratios
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                self.total[key] = self.total.get(key, 0) + value * times + growth.get(key, 0) * steps
        self.last = dict(call)
        for key, rate in growth.items():
            self.last[key] = self.last.get(key, 0) + rate * (later + times - 1)
        self.growth = dict(growth)
        for key, (numerator, denominator) in self.ratios.items():
            for record in (self.total, self.last) if key in self.last else (self.total,):
                _divide(record, key, numerator, denominator)


def _divide(record: dict[str, Any], key: str, numerator: str, denominator: str) -> None:
    count = record.get(denominator, 0)
    record[key] = record.get(numerator, 0) / count if count else 0.0
