"""Unusable samples: what was wrong with each, a run-wide count of distinct ones, and the limit that aborts a run.

A sample is unusable when its tar cannot be read up to it (truncated tar, garbage, an empty or 0-byte file: the
manifest says how many samples each shard holds), when a member is missing, when its JSON does not parse or has no
captions, or when its image does not decode. Readers skip it and hand a ``SampleFault`` to the training loop or
the evaluator, which count distinct faults over all ranks and stop the run past ``data.max_bad_share`` /
``data.max_bad_count``.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable


class SampleError(ValueError):
    """A sample whose members cannot be used (the reason is the message)."""


@dataclass(frozen=True)
class SampleFault:
    """An unusable sample: its shard, its position there, why, and its key when the sample could be read."""

    shard: str
    position: int
    reason: str
    key: str | None = None

    @property
    def identity(self) -> str:
        """Names the sample across epochs, ranks and resumes (keys are unique within a split)."""
        return self.key or f"{self.shard}#{self.position}"


def bad_sample_limit(max_share: float, max_count: int | None, samples: int) -> int:
    """How many distinct unusable samples of a split of ``samples`` a run tolerates."""
    return max_count if max_count is not None else math.floor(max_share * samples)


def summarize(faults: Iterable[SampleFault], lines: int = 10) -> list[str]:
    """At most ``lines`` lines, one per (shard, reason), the most frequent first."""
    groups = Counter((f.shard, f.reason) for f in faults)
    out = [f"{shard}: {count} sample{'s' if count > 1 else ''}: {reason}"
           for (shard, reason), count in groups.most_common(lines)]
    if len(groups) > lines:
        rest = sum(count for _, count in groups.most_common()[lines:])
        out.append(f"... and {rest} more in {len(groups) - lines} other shard/reason groups")
    return out


class FaultLog:
    """Distinct unusable samples of one split as one rank knows them: ``known`` (agreed by every rank at the last
    ``merge``, or restored from a checkpoint) and ``found`` here since."""

    def __init__(self, split: str, samples: int, limit: int):
        self.split, self.samples, self.limit = split, samples, limit
        self.known: dict[str, SampleFault] = {}
        self.found: dict[str, SampleFault] = {}

    def add(self, faults: Iterable[SampleFault]) -> None:
        for fault in faults:
            if fault.identity not in self.known:
                self.found.setdefault(fault.identity, fault)

    def known_bad(self) -> frozenset[str]:
        """Identities the readers skip without decoding (so a resumed stream replays the same batches)."""
        return frozenset(self.known) | frozenset(self.found)

    def merge(self, everyone_found: Iterable[dict[str, SampleFault]]) -> list[SampleFault]:
        """Fold every rank's ``found`` (from an all-gather) into ``known``; returns the faults new to ``known``."""
        new = []
        for found in everyone_found:
            for identity, fault in found.items():
                if identity not in self.known:
                    self.known[identity] = fault
                    new.append(fault)
        self.found = {}
        return new

    def over_limit(self, total: int) -> bool:
        return total > self.limit

    def limit_message(self, total: int) -> str:
        share = 100.0 * total / max(1, self.samples)
        return (f"{total} unusable samples in split '{self.split}' ({share:.2f}% of {self.samples}), more than the "
                f"limit of {self.limit} (data.max_bad_share / data.max_bad_count):\n  "
                + "\n  ".join(summarize(self.known.values())))

    def state_dict(self) -> list[dict]:
        return [asdict(f) for f in self.known.values()]

    def load_state_dict(self, state: list[dict]) -> None:
        self.known = {f.identity: f for f in (SampleFault(**item) for item in state)}
        self.found = {}
