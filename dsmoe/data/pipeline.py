"""The WebDataset pipelines: a training stream of (image, caption, person id) and an exactly-once eval pass.

Training: each rank x DataLoader-worker slot reads its own shards (or, with fewer shards than slots,
every shard keeping every n-th sample), expands each image to one pair per caption, shuffles in a
buffer, and yields a fixed number of batches per epoch, so every rank takes the same number of steps
(collectives never hang). All randomness derives from (seed, epoch, slot, sample key), so a resumed run continues
on the same data: from the cursor its checkpoint saved (``dsmoe.data.slot_stream``; nothing before it is read
again) or, without a usable one, by replaying the batches it already took without their images (it reads the tar
headers and captions and seeks over the media, read later only for pairs still in the shuffle buffer).
Shards are local files, URLs or pipe: commands (``dsmoe.data.location``), read by ``dsmoe.data.shard_reader``.

Evaluation: every image and caption of a split is read exactly once across all ranks.

Unusable samples (see ``dsmoe.data.bad_samples``) are skipped and travel with the batches as ``faults`` for the loop to
count. An image that does not decode is replaced by the next pair of the stream; its key goes into the known-bad
set that a resumed stream skips without decoding, so it replays exactly the batches the interrupted run took.
"""
from __future__ import annotations

import hashlib
import json
import random
import signal
import sys
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsmoe.data.bad_samples import SampleError, SampleFault
from dsmoe.data.shard_reader import load_media, sample_at, shard_samples
from dsmoe.data.slot_stream import CODE, Pair, SlotPlan, SlotStream, seeded
from dsmoe.data import location
from dsmoe.data.location import DEFAULT_READS, RemoteReads
from dsmoe.data.tar import UnscannableTar
from dsmoe.data.format import SOURCE_LANGUAGE, frame_member, read_split, sample_label
from dsmoe.data.text import CaptionEncoder
from dsmoe.data.transforms import NO_ERASE, decode_rgb, eval_transform, train_transform

def sample_content(sample: dict, need_media: bool) -> tuple[dict, bytes | list[bytes] | None]:
    """(parsed json, image bytes or a video's frame bytes) of a raw tar sample; ``SampleError`` says what is wrong."""
    if "json" not in sample:
        raise SampleError("no .json member")
    try:
        meta = json.loads(sample["json"])
    except ValueError as exc:
        raise SampleError(f"its .json does not parse: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("captions"), dict):
        raise SampleError("its .json has no captions")
    if "pid" not in meta and "image_id" not in meta:
        raise SampleError("its .json has neither pid nor image_id")
    if not need_media:
        return meta, None
    frames = int(meta.get("frames", 0))
    if frames:
        missing = [i for i in range(frames) if frame_member(i) not in sample]
        if missing:
            raise SampleError(f"video frames {missing} missing")
        return meta, [sample[frame_member(i)] for i in range(frames)]
    if "jpg" not in sample:
        raise SampleError("no .jpg member")
    return meta, sample["jpg"]


def _decode(media: bytes | list[bytes], transform) -> torch.Tensor:
    """uint8 [3, H, W] for an image, [N, 3, H, W] for a video's frames (the same transform for every frame)."""
    if isinstance(media, list):
        return torch.stack([transform(decode_rgb(frame)) for frame in media])
    return transform(decode_rgb(media))


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


@dataclass(frozen=True)
class DataCursor:
    """Where slot ``slot``'s stream is after a batch: the ``state`` a resumed ``TrainStream`` continues from
    (``cursors``); None where a buffered pair's sample cannot be read again from a known byte (a pipe: source, a
    damaged shard read through tarfile)."""

    slot: int
    state: dict | None


@dataclass
class TrainStreamConfig:
    shard_dir: str
    split: str
    image_size: tuple[int, int]
    micro_batch: int
    batches_per_epoch: int  # micro-batches per rank per epoch
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int = 2000
    augment: bool = True
    erasing_p: float = 0.5
    image_fit: str = "stretch"  # dsmoe.data.transforms.fitted
    load_images: bool = True
    reads: RemoteReads = field(default_factory=RemoteReads)
    checksums: bool = True


class CaptionPairs:
    """DM-Adapter's pairs: one per caption of ``language``; optional caption corruption."""

    def __init__(self, encoder: CaptionEncoder, language: str = SOURCE_LANGUAGE, corruption: float = 0.0):
        self.encoder, self.language, self.corruption = encoder, language, corruption
        self.languages = [language]

    def expand(self, meta: dict) -> list[tuple]:
        return list(enumerate(meta["captions"].get(self.language, [])))

    def collate(self, items: list[tuple], rng_for) -> dict:
        """``items``: (key, c, caption); ``rng_for(key, c)`` gives the per-pair random stream."""
        encoded = self.encoder.encode([caption for _, _, caption in items])
        ids = encoded.ids
        if self.corruption > 0:
            ids = torch.stack([self.encoder.corrupt(row, eot, rng_for(key, c), self.corruption)
                               for row, eot, (key, c, _) in zip(encoded.ids, encoded.eot.tolist(), items)])
        return {"text": ids, "eot": encoded.eot}


class TranslationPairs:
    """DASD's pairs: English caption c with caption c of each target language (translations align by index)."""

    def __init__(self, english: CaptionEncoder, target: CaptionEncoder, languages: list[str]):
        self.english, self.target, self.languages = english, target, list(languages)

    def expand(self, meta: dict) -> list[tuple]:
        captions = meta["captions"]
        english = captions.get(SOURCE_LANGUAGE, [])
        return [(f"{lang}{c}", (english[c], tgt, index))
                for index, lang in enumerate(self.languages)
                for c, tgt in enumerate(captions.get(lang, [])[:len(english)])]

    def collate(self, items: list[tuple], rng_for) -> dict:
        en = self.english.encode([payload[0] for _, _, payload in items])
        tgt = self.target.encode([payload[1] for _, _, payload in items])
        return {"en_text": en.ids, "en_eot": en.eot, "text": tgt.ids, "eot": tgt.eot,
                "language": torch.tensor([payload[2] for _, _, payload in items])}


class TrainStream(IterableDataset):
    """Micro-batches for one rank and one epoch, starting after ``start_batch`` already-taken batches.

    ``texts`` turns a sample's captions into training pairs and a batch of pairs into tensors (``CaptionPairs``
    for DM-Adapter, ``TranslationPairs`` for DASD).
    ``known_bad``: identities of samples found unusable so far (``FaultLog.known_bad``).
    ``cursors``: slot -> the ``DataCursor.state`` of the slot's last batch before ``start_batch``, as a checkpoint
    keeps them; a slot without a usable one replays its epoch up to ``start_batch``.
    Each batch carries its slot's ``DataCursor`` (``"cursor"``) and the faults found since the last (``"faults"``).
    """

    def __init__(self, cfg: TrainStreamConfig, texts, epoch: int, start_batch: int = 0,
                 known_bad: frozenset[str] = frozenset(), cursors: dict[int, dict] | None = None):
        super().__init__()
        self.cfg, self.texts, self.epoch, self.start_batch = cfg, texts, epoch, start_batch
        self.info = read_split(cfg.shard_dir, cfg.split, reads=cfg.reads)
        self._rows = {location.file_name(address): row for row, address in enumerate(self.info.shards)}
        self.known_bad_keys = set(known_bad)
        self.cursors = cursors or {}
        self.faults: list[SampleFault] = []  # images that did not decode since the last batch was yielded
        self._files: dict = {}  # shards opened to read media skipped over (load_media)

    def known_bad(self, key: str) -> bool:
        return key in self.known_bad_keys

    def sample_pairs(self, sample: dict, position: int) -> list[Pair]:
        """The training pairs of one raw sample; ``SampleError`` when it is unusable."""
        meta, media = sample_content(sample, self.cfg.load_images)
        label, key, shard = sample_label(meta), sample["__key__"], sample["__shard__"]
        row, start = self._rows[shard], sample["__start__"]
        if start is None:  # no byte to read the sample from again
            start = -1
        return [Pair(key, c, media, label, payload, shard, position, (row, position, start, index))
                for index, (c, payload) in enumerate(self.texts.expand(meta))]

    def pairs_at(self, codes) -> list[Pair]:
        """The pairs of a cursor's ``Pair.code``s (flat), their samples read again from the shards: captions and
        headers, the media left as ``MediaRef``s."""
        samples: dict[tuple[int, int], list[Pair]] = {}
        pairs = []
        for i in range(0, len(codes), CODE):
            row, position, start, index = codes[i:i + CODE]
            if (row, position) not in samples:
                sample = sample_at(self.info.shards[row], start, self._files, self.cfg.reads)
                samples[row, position] = self.sample_pairs(sample, position)
            pairs.append(samples[row, position][index])
        return pairs

    def identity(self, slot: int, slots: int) -> str:
        """A digest of what a slot's pair order depends on: a cursor saved under other settings is not used."""
        cfg = self.cfg
        settings = {"split": cfg.split, "seed": cfg.seed, "epoch": self.epoch, "slot": slot, "slots": slots,
                    "shuffle_buffer": cfg.shuffle_buffer, "micro_batch": cfg.micro_batch,
                    "load_images": cfg.load_images, "languages": list(self.texts.languages),
                    "shards": [[location.file_name(a), n] for a, n in zip(self.info.shards, self.info.shard_samples)]}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]

    def __iter__(self):
        worker, workers = _slot()
        cfg = self.cfg
        # The DataLoader takes batches from its workers round-robin starting at worker 0: in an epoch started
        # fresh, batch b comes from worker b % workers. A resumed loader's first batch is ``start_batch``, so its
        # worker w plays the part of the fresh loader's worker (w + start_batch) % workers (same data, same order).
        role = (worker + self.start_batch) % workers
        slot, slots = cfg.rank * workers + role, cfg.world_size * workers
        mine = range(role, cfg.batches_per_epoch, workers)
        taken = len(range(role, min(self.start_batch, cfg.batches_per_epoch), workers))
        identity = self.identity(slot, slots)
        saved = self.cursors.get(slot)
        try:
            pairs = None
            if saved is not None and saved["identity"] == identity and saved["batches"] == taken:
                pairs = self._restored(slot, slots, saved["stream"])
            if pairs is None:
                pairs = SlotStream(self, self._plan(), slot, slots, replaying=True)
                for _ in range(taken):  # the batches already taken, without reading or decoding any image
                    self._take(pairs, decode=False)
                pairs.replaying = False
            while taken < len(mine):
                batch = self._collate(*self._take(pairs, decode=cfg.load_images))
                taken += 1
                place = pairs.cursor()
                batch["cursor"] = DataCursor(slot, None if place is None else
                                             {"identity": identity, "batches": taken, "stream": place})
                batch["faults"] = pairs.faults + self.faults
                pairs.faults.clear()  # in place: an open shard reader appends its end-of-shard faults to this list
                self.faults.clear()
                yield batch
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def _plan(self) -> SlotPlan:
        cfg = self.cfg
        return SlotPlan(self.info.entries, cfg.seed, self.epoch, cfg.shuffle_buffer, cfg.reads, cfg.checksums,
                        cfg.shard_dir)

    def _restored(self, slot: int, slots: int, cursor: dict) -> SlotStream | None:
        try:
            return SlotStream(self, self._plan(), slot, slots, cursor)
        except (UnscannableTar, OSError, EOFError, IndexError, KeyError, TypeError, ValueError) as exc:  # the shards
            # changed since it was saved, or the cursor is not one
            print(f"[dsmoe] data slot {slot}: its saved place does not read ({type(exc).__name__}: {exc}); "
                  f"replaying the epoch's order up to it instead", file=sys.stderr, flush=True)
            return None

    def _take(self, pairs: Iterator[Pair], decode: bool) -> tuple[list[Pair], list[torch.Tensor], list[tuple]]:
        """The next micro-batch of usable pairs (their decoded uint8 images and erase boxes): a pair whose image does
        not decode is replaced by the next one, as are pairs of samples already known to be unusable."""
        taken, images, boxes = [], [], []
        while len(taken) < self.cfg.micro_batch:
            pair = next(pairs)
            if pair.key in self.known_bad_keys:  # found undecodable earlier in this batch or a recent one
                continue
            if decode:
                try:
                    image, box = self._decode_pair(pair)
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for undecodable images
                    self.known_bad_keys.add(pair.key)
                    self.faults.append(SampleFault(pair.shard, pair.position,
                                                   f"image does not decode ({type(exc).__name__}: {exc})", pair.key))
                    continue
                images.append(image)
                boxes.append(box)
            taken.append(pair)
        return taken, images, boxes

    def _decode_pair(self, pair: Pair) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        cfg = self.cfg
        media = load_media(pair.media, self._files, cfg.reads)  # read now if the stream skipped over it
        if not cfg.augment:
            return _decode(media, lambda img: eval_transform(img, cfg.image_size, cfg.image_fit)), NO_ERASE
        state = seeded(cfg.seed, self.epoch, pair.key, pair.c, "image").getstate()
        boxes = []

        def transform(img):  # every frame of a video gets the same augmentation
            rng = random.Random()
            rng.setstate(state)
            image, box = train_transform(img, cfg.image_size, rng, erasing_p=cfg.erasing_p, fit=cfg.image_fit)
            boxes.append(box)
            return image
        return _decode(media, transform), boxes[0]

    def _collate(self, pairs: list[Pair], images: list[torch.Tensor], boxes: list[tuple]) -> dict:
        cfg = self.cfg
        batch = self.texts.collate([(p.key, p.c, p.payload) for p in pairs],
                                   lambda key, c: seeded(cfg.seed, self.epoch, key, c, "text"))
        batch["pid"] = torch.tensor([p.label for p in pairs])
        if cfg.load_images:
            batch["image"] = torch.stack(images)  # uint8: normalised on the device (transforms.normalize)
            batch["erase"] = torch.tensor(boxes, dtype=torch.long)
        return batch


def batches_per_epoch(shard_dir: str, split: str, global_batch: int, languages: tuple[str, ...] = (SOURCE_LANGUAGE,),
                      reads: RemoteReads = DEFAULT_READS) -> int:
    """Optimiser steps per epoch: every caption pair once (of each language), the last partial batch dropped."""
    captions = sum(read_split(shard_dir, split, language, reads).captions for language in languages)
    if captions < global_batch:
        raise ValueError(f"split '{split}' has {captions} captions in {list(languages)}, fewer than one global "
                         f"batch ({global_batch})")
    return captions // global_batch


def ignore_job_signals(_worker: int) -> None:
    """DataLoader workers leave Slurm's preemption signals and Ctrl-C to the training process."""
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def train_loader(cfg: TrainStreamConfig, texts, epoch: int, start_batch: int, workers: int,
                 known_bad: frozenset[str] = frozenset(), cursors: dict[int, dict] | None = None) -> DataLoader:
    stream = TrainStream(cfg, texts, epoch, start_batch, known_bad, cursors)
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      worker_init_fn=ignore_job_signals)


# ---------------------------------------------------------------------------------------------------------------
# evaluation


class EvalSample(NamedTuple):
    index: int  # the sample's position in the split (shard by shard), the order metrics see
    image: torch.Tensor  # uint8 [3, H, W] (or a video's frames [N, 3, H, W])
    label: int
    key: str
    captions: dict[str, list[str]]  # language -> captions


class EvalImages(IterableDataset):
    """This reader's share of a split, whole shards at a time: shard k goes to rank k % world, and within the rank
    to loader worker (k // world) % workers, so every shard is read once. Yields an ``EvalSample`` for each usable
    sample and a ``SampleFault`` for each other."""

    def __init__(self, shard_dir: str, split: str, image_size: tuple[int, int], rank: int, world_size: int,
                 reads: RemoteReads = DEFAULT_READS, checksums: bool = True, image_fit: str = "stretch"):
        super().__init__()
        self.info = read_split(shard_dir, split, reads=reads)
        self.image_size, self.rank, self.world_size = image_size, rank, world_size
        self.reads, self.checksums, self.image_fit = reads, checksums, image_fit

    def __iter__(self):
        worker, workers = _slot()
        base = 0
        for k, shard in enumerate(self.info.entries):
            if k % self.world_size == self.rank and (k // self.world_size) % workers == worker:
                yield from self._shard(shard, base)
            base += shard.samples

    def _shard(self, shard, base: int):
        faults: list[SampleFault] = []
        for position, sample in shard_samples(shard, faults, reads=self.reads, checksum=self.checksums):
            yield from faults
            faults.clear()
            try:
                meta, media = sample_content(sample, need_media=True)
                image = _decode(media, lambda img: eval_transform(img, self.image_size, self.image_fit))
            except Exception as exc:  # noqa: BLE001 - SampleError, or PIL's many types for undecodable images
                reason = str(exc) if isinstance(exc, SampleError) else \
                    f"image does not decode ({type(exc).__name__}: {exc})"
                yield SampleFault(sample["__shard__"], position, reason, sample["__key__"])
                continue
            captions = {lang: list(texts) for lang, texts in meta["captions"].items()}
            yield EvalSample(base + position, image, sample_label(meta), sample["__key__"], captions)
        yield from faults


def _collate_eval(items: list) -> dict:
    faults = [i for i in items if isinstance(i, SampleFault)]
    samples = [i for i in items if not isinstance(i, SampleFault)]
    images = torch.stack([s.image for s in samples]) if samples else None
    return {"image": images, "index": torch.tensor([s.index for s in samples], dtype=torch.long),
            "pid": torch.tensor([s.label for s in samples], dtype=torch.long), "key": [s.key for s in samples],
            "captions": [s.captions for s in samples], "faults": faults}


def eval_loader(shard_dir: str, split: str, image_size: tuple[int, int], rank: int, world_size: int,
                batch_size: int, workers: int, reads: RemoteReads = DEFAULT_READS, checksums: bool = True,
                image_fit: str = "stretch") -> DataLoader:
    dataset = EvalImages(shard_dir, split, image_size, rank, world_size, reads, checksums, image_fit)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate_eval,
                      worker_init_fn=ignore_job_signals)
