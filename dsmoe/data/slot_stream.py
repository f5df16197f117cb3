"""One data slot's training pairs for an epoch, in shuffled order, and the cursor that saves its place.

A slot (a rank's DataLoader worker) reads its share of the shards, dealt anew each cycle, sample by sample; each
sample's pairs pass through a shuffle buffer; the slot's data is cycled until the epoch's batches are taken. All
randomness derives from (seed, epoch, slot, cycle), so the order is fixed by the run's settings alone.

``SlotStream.cursor()`` is the stream's place: the shard and byte it reads next, the random state, and the buffer's
pairs as ``Pair.code``s, kept in an int64 array beside the buffer, so that the cursor every batch carries costs a
copy of that array, not a walk over the buffer. A stream made from a cursor continues exactly as the saved one would
have, reading nothing before the saved place, so a resumed run starts as quickly at 90% of an epoch as at 10%. A
cursor needs the byte where each buffered pair's sample begins, to read it again: a ``pipe:`` source, or a damaged
shard read through tarfile, gives none, and such a stream is resumed by replaying the epoch instead
(``TrainStream``).
"""
from __future__ import annotations

import random
from array import array
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from dsmoe.data.bad_samples import SampleError, SampleFault
from dsmoe.data.format import ShardEntry
from dsmoe.data.location import RemoteReads
from dsmoe.data.shard_reader import MediaRef, shard_samples

CODE = 4  # ints per pair in a cursor's arrays


class Pair(NamedTuple):
    """One training pair before decoding: where it comes from, its media, label and text payload."""

    key: str
    c: object  # which caption of the sample (index, or language + index)
    media: bytes | list[bytes] | MediaRef | list[MediaRef] | None
    label: int
    payload: object
    shard: str  # the shard's file name
    position: int
    code: tuple[int, int, int, int]  # (the shard's manifest index, position, the byte where the sample begins (-1:
    #                                  not known), the pair's index among its sample's pairs): enough to read it again


def seeded(*parts) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


@dataclass(frozen=True)
class SlotPlan:
    """What fixes a slot's pairs: the split's shards, the seed and epoch, the shuffle buffer, and how shards are
    read."""

    shards: list[ShardEntry]
    seed: int
    epoch: int
    shuffle_buffer: int
    reads: RemoteReads
    checksums: bool
    where: str  # the shards' location, for messages


class PairSource(Protocol):
    """What a slot's stream asks of the reader that owns it (``dsmoe.data.pipeline.TrainStream``)."""

    def sample_pairs(self, sample: dict, position: int) -> list[Pair]:
        """The training pairs of one raw sample; ``SampleError`` when it is unusable."""

    def pairs_at(self, codes) -> list[Pair]:
        """The pairs of a cursor's ``Pair.code``s (flat), their samples read again from the shards."""

    def known_bad(self, key: str) -> bool:
        """Whether the sample ``key`` was found unusable (its pairs are left out)."""


class SlotStream:
    """The pairs of data slot ``slot`` of ``slots`` under ``plan``, from the start or from a ``cursor``; samples
    become pairs through ``source``. Unusable samples collect in ``faults`` for the owner to take.
    While ``replaying`` (set by the owner, taking batches a resumed run already trained on), media are not read and
    no cursor is kept."""

    def __init__(self, source: PairSource, plan: SlotPlan, slot: int, slots: int, cursor: dict | None = None,
                 replaying: bool = False):
        self.source, self.plan, self.slot, self.slots = source, plan, slot, slots
        self.replaying = replaying
        self.faults: list[SampleFault] = []
        self.samples = None  # the open shard's (position, sample) iterator
        if cursor is None:
            self.empty_cycles = 0
            self._begin_cycle(0)
        else:
            self._restore(cursor)

    def _begin_cycle(self, cycle: int) -> None:
        plan = self.plan
        self.cycle = cycle
        self.rng = seeded(plan.seed, plan.epoch, self.slot, cycle, "buffer")
        self.buffer: list[Pair] = []
        # the buffer's pairs' codes in buffer order; not kept while replaying batches already taken
        self.codes: array | None = None if self.replaying else array("q")
        self.drained: int | None = None  # once the cycle's shards are read: how much of the shuffled buffer is given
        self.usable = False
        shards = list(plan.shards)
        seeded(plan.seed, plan.epoch, cycle, "shards").shuffle(shards)
        if len(shards) >= self.slots:
            self.shards, self.keep = shards[self.slot::self.slots], None
        else:  # fewer shards than slots: every slot reads every shard, keeping every slots-th sample
            self.shards, self.keep = shards, self.slot
        self.shard, self.position, self.offset = 0, 0, 0  # the next sample: its shard, position and byte
        self.pending: list[Pair] = []  # the current sample's pairs not yet in the buffer

    def __iter__(self):
        return self

    def __next__(self) -> Pair:
        """The next pair, leaving out those of samples known to be unusable."""
        known_bad, codes = self.source.known_bad, self.codes
        if self.replaying:  # no cursor is asked for until the replay ends
            codes = self.codes = None
        elif codes is None:
            codes = self.codes = array("q", [n for p in self.buffer for n in p.code])
        while True:
            if self.drained is None:
                pair = self._read()
                if pair is None:  # the cycle's shards are read: give what the buffer holds, shuffled
                    self.rng.shuffle(self.buffer)
                    if codes is not None:
                        codes = self.codes = array("q", [n for p in self.buffer for n in p.code])
                    self.drained = 0
                    continue
                self.buffer.append(pair)
                if codes is not None:
                    codes.extend(pair.code)
                if len(self.buffer) < self.plan.shuffle_buffer:
                    continue
                index = self.rng.randrange(len(self.buffer))
                if codes is not None:
                    del codes[CODE * index:CODE * (index + 1)]
                pair = self.buffer.pop(index)
            elif self.drained < len(self.buffer):
                pair = self.buffer[self.drained]
                self.drained += 1
            else:
                self._next_cycle()
                codes = self.codes
                continue
            if not known_bad(pair.key):
                self.usable = True
                return pair

    def _next_cycle(self) -> None:
        self.empty_cycles = 0 if self.usable else self.empty_cycles + 1
        if self.empty_cycles > len(self.plan.shards):  # each cycle deals the shards anew: all had a chance
            faults = self.faults
            found = f" ({len(faults)} unusable samples, e.g. {faults[0]})" if faults else ""
            raise RuntimeError(f"data slot {self.slot} of {self.slots} received no usable samples from "
                               f"{self.plan.where}{found}")
        self._begin_cycle(self.cycle + 1)

    def _read(self) -> Pair | None:
        """The next pair of the slot's samples in shard order; None at the end of the cycle's shards."""
        while not self.pending:
            if self.samples is None:
                if self.shard == len(self.shards):
                    return None
                self.samples = self._open(self.shards[self.shard])
            item = next(self.samples, None)
            if item is None:
                self.samples = None
                self.shard, self.position, self.offset = self.shard + 1, 0, 0
                continue
            position, sample = item
            self.position, self.offset = position + 1, sample["__end__"]
            if self._owns(position):
                try:
                    self.pending = self.source.sample_pairs(sample, position)[::-1]
                except SampleError as exc:
                    self.faults.append(SampleFault(sample["__shard__"], position, str(exc), sample["__key__"]))
        return self.pending.pop()

    def _open(self, shard: ShardEntry):
        self.base = sum(entry.samples for entry in self.shards[:self.shard])  # manifest index of its first sample
        skip_media = (lambda: self.replaying) if self.replaying else None
        return shard_samples(shard, self.faults, self._owns, skip_media, self.position, self.offset,
                             self.plan.reads, self.plan.checksums)

    def _owns(self, position: int) -> bool:
        """A broken shard does not shift the samples of the ones after it: ownership is by manifest index."""
        return self.keep is None or (self.base + position) % self.slots == self.keep

    # -- the cursor ---------------------------------------------------------------------------------------------

    def cursor(self) -> dict | None:
        """This stream's place, or None where a buffered pair's sample has no known byte to be read from again."""
        codes = self.codes[CODE * (self.drained or 0):]
        pending = array("q", [n for p in self.pending for n in p.code])
        if min(codes[2::CODE], default=0) < 0 or min(pending[2::CODE], default=0) < 0:
            return None
        return {"cycle": self.cycle, "empty_cycles": self.empty_cycles, "usable": self.usable,
                "shard": self.shard, "position": self.position, "offset": self.offset,
                "buffer": codes, "pending": pending, "draining": self.drained is not None,
                "rng": self.rng.getstate()}

    def _restore(self, cursor: dict) -> None:
        self.empty_cycles = cursor["empty_cycles"]
        self._begin_cycle(cursor["cycle"])
        version, state, gauss = cursor["rng"]
        self.rng.setstate((version, tuple(state), gauss))
        self.usable = cursor["usable"]
        self.shard, self.position, self.offset = cursor["shard"], cursor["position"], cursor["offset"]
        self.codes = array("q", cursor["buffer"])
        self.buffer = self.source.pairs_at(self.codes)
        self.pending = self.source.pairs_at(cursor["pending"])
        self.drained = 0 if cursor["draining"] else None
