"""The WebDataset pipelines: a training stream of (image, caption, person id) and an exactly-once eval pass.

Training: each rank x DataLoader-worker slot reads its own shards (or, with fewer shards than slots,
every shard keeping every n-th sample), expands each image to one pair per caption, shuffles in a
buffer, and yields a fixed number of batches per epoch, so every rank takes the same number of steps
(collectives never hang). All randomness derives from (seed, epoch, slot, sample key), so a resumed run
replays the batches it already took without their images (it reads the tar headers and captions and seeks over
the media: ``MediaRef``, read later only for pairs still in the shuffle buffer) and continues on the same data.
Shards are local files, URLs or pipe: commands (``dsmoe.shards.location``).

Evaluation: every image and caption of a split is read exactly once across all ranks.

Unusable samples (see ``dsmoe.data.faults``) are skipped and travel with the batches as ``faults`` for the loop to
count. An image that does not decode is replaced by the next pair of the stream; its key goes into the known-bad
set that a resumed stream skips without decoding, so it replays exactly the batches the interrupted run took.
"""
from __future__ import annotations

import json
import random
import signal
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from dsmoe.data.faults import SampleError, SampleFault
from dsmoe.shards import location
from dsmoe.shards.tar import UnscannableTar, scan_members
from dsmoe.shards.format import SOURCE_LANGUAGE, frame_member, read_split, sample_label
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


def shard_samples(path: str, expected: int, faults: list[SampleFault], owns=lambda position: True,
                  skip_media: Callable[[], bool] | None = None) -> Iterator[tuple[int, dict]]:
    """(position, raw sample) of one shard (a local path, URL or pipe: command), in order; members are never
    unpickled. While ``skip_media()`` is true, a seekable shard's media members are not read: they are
    ``MediaRef``s, read later if needed (``load_media``).

    A remote shard that fails part-way is opened again (``location.RETRIES`` times) and read on from where it
    failed. Whatever else stops the tar short (truncation, garbage, an empty file) ends the shard: each of its
    ``expected`` samples not read becomes a fault, for the positions ``owns`` says are this reader's.
    """
    name = location.file_name(path)
    position, error, retries = 0, "", 0 if location.is_local(path) else location.RETRIES
    while True:
        try:
            with _members(path, skip_media) as members:
                for index, sample in enumerate(_grouped(members, name)):
                    if index >= position:  # after a retry: the samples before were already given
                        yield position, sample
                        position += 1
            break
        except UnscannableTar:
            skip_media = None  # not a whole tar as dsmoe writes them: read on through tarfile, which judges damage
        except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
            error = f" ({type(exc).__name__}: {str(exc).split(' @ ')[0]})"
            if retries == 0 or isinstance(exc, FileNotFoundError):
                break
            retries -= 1
            time.sleep(location.RETRY_WAIT)
    problem = f"unreadable: the tar ends after {position} of {expected} samples{error}"
    if position > expected and owns(expected):
        faults.append(SampleFault(name, expected, f"the shard holds {position} samples, its manifest {expected}"))
    faults.extend(SampleFault(name, p, problem) for p in range(position, expected) if owns(p))


@dataclass(frozen=True)
class MediaRef:
    """Where a member's bytes are in its shard: a resumed stream seeks past the media of the samples it skips."""

    address: str
    offset: int
    size: int


@contextmanager
def _members(path: str, skip_media: Callable[[], bool] | None) -> Iterator[Iterator[dict]]:
    """The tar members of a shard as ``{"fname", "data"}``, read through (or, with ``skip_media``, from a seekable
    file: header by header, the media's bytes left where they are while ``skip_media()``)."""
    seekable = location.open_random(path) if skip_media is not None else None
    if seekable is None:
        with location.open_stream(path) as stream:
            yield tar_file_iterator(stream)
        return
    with seekable:
        def members() -> Iterator[dict]:
            for name, offset, size, data in scan_members(seekable, lambda n: n.endswith(".json") or not skip_media()):
                yield {"fname": name, "data": MediaRef(path, offset, size) if data is None else data}
        yield members()


def load_media(media, files: dict) -> bytes | list[bytes]:
    """``media`` with every ``MediaRef`` read (``files``: address -> open seekable file, kept for later reads)."""
    if isinstance(media, list):
        return [load_media(item, files) for item in media]
    if not isinstance(media, MediaRef):
        return media
    if media.address not in files:
        files[media.address] = location.open_random(media.address)
    f = files[media.address]
    f.seek(media.offset)
    data = f.read(media.size)
    if len(data) != media.size:
        raise EOFError(f"{location.file_name(media.address)} ends inside a member")
    return data


def _grouped(members: Iterator[dict], shard: str) -> Iterator[dict]:
    """Consecutive tar members sharing a key as one sample: ``{"__key__", "__shard__", ext: bytes, ...}``."""
    current: dict | None = None
    for member in members:
        key, ext = base_plus_ext(member["fname"])
        if key is None:
            continue
        if current is not None and key != current["__key__"]:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__shard__": shard}
        current[ext.lower()] = member["data"]
    if current is not None:
        yield current


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _rng(*parts) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


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
    corruption: float = 0.0
    language: str = SOURCE_LANGUAGE
    load_images: bool = True


class CaptionPairs:
    """DM-Adapter's pairs: one per caption of ``language``; optional caption corruption."""

    def __init__(self, encoder: CaptionEncoder, language: str = SOURCE_LANGUAGE, corruption: float = 0.0):
        self.encoder, self.language, self.corruption = encoder, language, corruption

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


class Pair(NamedTuple):
    """One training pair before decoding: where it comes from, its media bytes, label and text payload."""

    key: str
    c: object  # which caption of the sample (index, or language + index)
    media: bytes | list[bytes] | None
    label: int
    payload: object
    shard: str
    position: int


class TrainStream(IterableDataset):
    """Micro-batches for one rank and one epoch, starting after ``start_batch`` already-taken batches.

    ``texts`` turns a sample's captions into training pairs and a batch of pairs into tensors (``CaptionPairs``
    for DM-Adapter, ``TranslationPairs`` for DASD; a bare ``CaptionEncoder`` means ``CaptionPairs``).
    ``known_bad``: identities of samples found unusable so far (``FaultLog.known_bad``).
    """

    def __init__(self, cfg: TrainStreamConfig, texts, epoch: int, start_batch: int = 0,
                 known_bad: frozenset[str] = frozenset()):
        super().__init__()
        if isinstance(texts, CaptionEncoder):
            texts = CaptionPairs(texts, cfg.language, cfg.corruption)
        self.cfg, self.texts, self.epoch, self.start_batch = cfg, texts, epoch, start_batch
        self.info = read_split(cfg.shard_dir, cfg.split)
        self.known_bad = set(known_bad)
        self.faults: list[SampleFault] = []  # found since the last batch was yielded
        self._skipping = False  # taking the batches a resumed run already trained on: media are not read
        self._files: dict = {}  # shards opened to read media skipped over (load_media)

    def _pairs(self, slot: int, slots: int, cycle: int) -> Iterator[Pair]:
        shards = list(zip(self.info.shards, self.info.shard_samples))
        _rng(self.cfg.seed, self.epoch, cycle, "shards").shuffle(shards)
        if len(shards) >= slots:
            shards, keep = shards[slot::slots], None
        else:
            keep = slot
        base = 0  # manifest index of the shard's first sample: a broken shard does not shift the ones after it
        for path, expected in shards:
            def owns(position: int, base: int = base) -> bool:
                return keep is None or (base + position) % slots == keep

            skip_media = (lambda: self._skipping) if self._skipping else None
            for position, sample in shard_samples(path, expected, self.faults, owns, skip_media):
                if not owns(position):
                    continue
                try:
                    meta, media = sample_content(sample, self.cfg.load_images)
                except SampleError as exc:
                    self.faults.append(SampleFault(sample["__shard__"], position, str(exc), sample["__key__"]))
                    continue
                label = sample_label(meta)
                for c, payload in self.texts.expand(meta):
                    yield Pair(sample["__key__"], c, media, label, payload, sample["__shard__"], position)
            base += expected

    def _shuffled(self, slot: int, slots: int) -> Iterator[Pair]:
        """The slot's pairs in shuffled order, cycled; pairs of samples known to be unusable are left out."""
        cycle, empty_cycles = 0, 0
        while True:  # cycle the slot's data until the epoch's fixed length is reached
            rng = _rng(self.cfg.seed, self.epoch, slot, cycle, "buffer")
            buffer: list[Pair] = []
            usable = False
            for pair in self._pairs(slot, slots, cycle):
                buffer.append(pair)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    pair = buffer.pop(rng.randrange(len(buffer)))
                    if pair.key not in self.known_bad:
                        usable = True
                        yield pair
            rng.shuffle(buffer)
            for pair in buffer:
                if pair.key not in self.known_bad:
                    usable = True
                    yield pair
            empty_cycles = 0 if usable else empty_cycles + 1
            if empty_cycles > len(self.info.shards):  # each cycle deals the shards anew: give every shard a chance
                found = f" ({len(self.faults)} unusable samples, e.g. {self.faults[0]})" if self.faults else ""
                raise RuntimeError(f"data slot {slot} of {slots} received no usable samples from "
                                   f"{self.cfg.shard_dir}{found}")
            cycle += 1

    def __iter__(self):
        worker, workers = _slot()
        cfg = self.cfg
        # The DataLoader takes batches from its workers round-robin starting at worker 0: in an epoch started
        # fresh, batch b comes from worker b % workers. A resumed loader's first batch is ``start_batch``, so its
        # worker w plays the part of the fresh loader's worker (w + start_batch) % workers (same data, same order).
        role = (worker + self.start_batch) % workers
        slot, slots = cfg.rank * workers + role, cfg.world_size * workers
        mine = range(role, cfg.batches_per_epoch, workers)
        skip = len(range(role, min(self.start_batch, cfg.batches_per_epoch), workers))
        pairs = self._shuffled(slot, slots)
        self._skipping = True
        for _ in range(skip):  # the batches already taken, without reading or decoding any image
            self._take(pairs, decode=False)
        self._skipping = False
        try:
            for _ in range(len(mine) - skip):
                batch = self._collate(*self._take(pairs, decode=cfg.load_images))
                batch["faults"], self.faults = self.faults, []
                yield batch
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def _take(self, pairs: Iterator[Pair], decode: bool) -> tuple[list[Pair], list[torch.Tensor], list[tuple]]:
        """The next micro-batch of usable pairs (their decoded uint8 images and erase boxes): a pair whose image does
        not decode is replaced by the next one, as are pairs of samples already known to be unusable."""
        taken, images, boxes = [], [], []
        while len(taken) < self.cfg.micro_batch:
            pair = next(pairs)
            if pair.key in self.known_bad:  # found undecodable earlier in this batch or a recent one
                continue
            if decode:
                try:
                    image, box = self._decode_pair(pair)
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for undecodable images
                    self.known_bad.add(pair.key)
                    self.faults.append(SampleFault(pair.shard, pair.position,
                                                   f"image does not decode ({type(exc).__name__}: {exc})", pair.key))
                    continue
                images.append(image)
                boxes.append(box)
            taken.append(pair)
        return taken, images, boxes

    def _decode_pair(self, pair: Pair) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        cfg = self.cfg
        media = load_media(pair.media, self._files)  # read now if the stream skipped over it
        if not cfg.augment:
            return _decode(media, lambda img: eval_transform(img, cfg.image_size)), NO_ERASE
        state = _rng(cfg.seed, self.epoch, pair.key, pair.c, "image").getstate()
        boxes = []

        def transform(img):  # every frame of a video gets the same augmentation
            rng = random.Random()
            rng.setstate(state)
            image, box = train_transform(img, cfg.image_size, rng, erasing_p=cfg.erasing_p)
            boxes.append(box)
            return image
        return _decode(media, transform), boxes[0]

    def _collate(self, pairs: list[Pair], images: list[torch.Tensor], boxes: list[tuple]) -> dict:
        cfg = self.cfg
        batch = self.texts.collate([(p.key, p.c, p.payload) for p in pairs],
                                   lambda key, c: _rng(cfg.seed, self.epoch, key, c, "text"))
        batch["pid"] = torch.tensor([p.label for p in pairs])
        if cfg.load_images:
            batch["image"] = torch.stack(images)  # uint8: normalised on the device (transforms.normalize)
            batch["erase"] = torch.tensor(boxes, dtype=torch.long)
        return batch


def batches_per_epoch(shard_dir: str, split: str, global_batch: int, languages: tuple[str, ...] = (SOURCE_LANGUAGE,)) -> int:
    """Optimiser steps per epoch: every caption pair once (of each language), the last partial batch dropped."""
    captions = sum(read_split(shard_dir, split, language).captions for language in languages)
    if captions < global_batch:
        raise ValueError(f"split '{split}' has {captions} captions in {list(languages)}, fewer than one global "
                         f"batch ({global_batch})")
    return captions // global_batch


def ignore_job_signals(_worker: int) -> None:
    """DataLoader workers leave Slurm's preemption signals and Ctrl-C to the training process."""
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def train_loader(cfg: TrainStreamConfig, texts, epoch: int, start_batch: int, workers: int,
                 known_bad: frozenset[str] = frozenset()) -> DataLoader:
    stream = TrainStream(cfg, texts, epoch, start_batch, known_bad)
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

    def __init__(self, shard_dir: str, split: str, image_size: tuple[int, int], rank: int, world_size: int):
        super().__init__()
        self.info = read_split(shard_dir, split)
        self.image_size, self.rank, self.world_size = image_size, rank, world_size

    def __iter__(self):
        worker, workers = _slot()
        base = 0
        for k, (path, expected) in enumerate(zip(self.info.shards, self.info.shard_samples)):
            if k % self.world_size == self.rank and (k // self.world_size) % workers == worker:
                yield from self._shard(path, expected, base)
            base += expected

    def _shard(self, path, expected: int, base: int):
        faults: list[SampleFault] = []
        for position, sample in shard_samples(path, expected, faults):
            yield from faults
            faults.clear()
            try:
                meta, media = sample_content(sample, need_media=True)
                image = _decode(media, lambda img: eval_transform(img, self.image_size))
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
                batch_size: int, workers: int) -> DataLoader:
    dataset = EvalImages(shard_dir, split, image_size, rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate_eval,
                      worker_init_fn=ignore_job_signals)
