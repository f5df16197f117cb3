"""The WebDataset pipelines: a training stream of (image, caption, person id) and an exactly-once eval pass.

Training: each rank x DataLoader-worker slot reads its own shards (or, with fewer shards than slots,
every shard keeping every n-th sample), expands each image to one pair per caption, shuffles in a
buffer, and yields a fixed number of batches per epoch, so every rank takes the same number of steps
(collectives never hang). All randomness derives from (seed, epoch, slot, sample key), so a resumed run
skips the batches it already took (before any image is decoded) and continues on the same data.

Evaluation: every image and caption of a split is read exactly once across all ranks.
"""
from __future__ import annotations

import hashlib
import json
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsmoe.data.text import CaptionEncoder
from dsmoe.data.transforms import decode_rgb, eval_transform, train_transform

LANGUAGE = "en"


@dataclass(frozen=True)
class SplitInfo:
    shards: list[Path]
    samples: int
    captions: int


def read_split(shard_dir: str | Path, split: str, language: str = LANGUAGE) -> SplitInfo:
    """The shards and counts of ``split`` from its manifest."""
    shard_dir = Path(shard_dir)
    manifest_path = shard_dir / f"{split}.manifest.json"
    if not manifest_path.is_file():
        found = sorted(p.name for p in shard_dir.glob("*.manifest.json")) if shard_dir.is_dir() else []
        raise FileNotFoundError(f"no manifest for split '{split}' in {shard_dir} (found: {found or 'none'}); "
                                f"write the shards with tools/make_shards.py")
    manifest = json.loads(manifest_path.read_text())
    shards = [shard_dir / s["name"] for s in manifest["shards"]]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{manifest_path} lists shards that do not exist: {missing[:3]}")
    return SplitInfo(shards=shards, samples=int(manifest["samples"]),
                     captions=int(manifest["captions"].get(language, 0)))


def sample_label(meta: dict) -> int:
    """The retrieval label of a sample: the person id, or (image-text data) a stable 63-bit hash of the image id."""
    if "pid" in meta:
        return int(meta["pid"])
    digest = hashlib.blake2b(str(meta["image_id"]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _media(sample: dict, meta: dict) -> bytes | list[bytes] | None:
    """The image bytes of a sample, or the list of its frames' bytes for a video (json ``frames``: N)."""
    frames = int(meta.get("frames", 0))
    if frames:
        return [sample[f"frame{i:02d}.jpg"] for i in range(frames)]
    return sample.get("jpg")


def _decode(media: bytes | list[bytes], transform) -> torch.Tensor:
    """[3, H, W] for an image, [N, 3, H, W] for a video's frames (the same transform for every frame)."""
    if isinstance(media, list):
        return torch.stack([transform(decode_rgb(frame)) for frame in media])
    return transform(decode_rgb(media))


def _raw_samples(shards: list[Path]) -> Iterator[dict]:
    """Raw tar samples (bytes per member) in shard order; members are never unpickled."""
    yield from wds.tarfile_to_samples()(iter([{"url": str(p)} for p in shards]))


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
    language: str = LANGUAGE
    load_images: bool = True


class CaptionPairs:
    """DM-Adapter's pairs: one per caption of ``language``; optional caption corruption."""

    def __init__(self, encoder: CaptionEncoder, language: str = LANGUAGE, corruption: float = 0.0):
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
        english = captions.get(LANGUAGE, [])
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
    for DM-Adapter, ``TranslationPairs`` for DASD; a bare ``CaptionEncoder`` means ``CaptionPairs``).
    """

    def __init__(self, cfg: TrainStreamConfig, texts, epoch: int, start_batch: int = 0):
        super().__init__()
        if isinstance(texts, CaptionEncoder):
            texts = CaptionPairs(texts, cfg.language, cfg.corruption)
        self.cfg, self.texts, self.epoch, self.start_batch = cfg, texts, epoch, start_batch
        self.info = read_split(cfg.shard_dir, cfg.split)

    def _pairs(self, slot: int, slots: int, cycle: int) -> Iterator[tuple]:
        shards = list(self.info.shards)
        _rng(self.cfg.seed, self.epoch, cycle, "shards").shuffle(shards)
        if len(shards) >= slots:
            shards, keep = shards[slot::slots], None
        else:
            keep = slot
        for index, sample in enumerate(_raw_samples(shards)):
            if keep is not None and index % slots != keep:
                continue
            meta = json.loads(sample["json"])
            label = sample_label(meta)
            media = _media(sample, meta) if self.cfg.load_images else None
            for c, payload in self.texts.expand(meta):
                yield sample["__key__"], c, media, label, payload

    def _shuffled(self, slot: int, slots: int) -> Iterator[tuple]:
        cycle = 0
        while True:  # cycle the slot's data until the epoch's fixed length is reached
            rng = _rng(self.cfg.seed, self.epoch, slot, cycle, "buffer")
            buffer: list[tuple] = []
            produced = False
            for pair in self._pairs(slot, slots, cycle):
                produced = True
                buffer.append(pair)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            if not produced:
                raise RuntimeError(f"data slot {slot} of {slots} received no samples from {self.cfg.shard_dir}")
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
        for _ in range(skip * cfg.micro_batch):
            next(pairs)
        for _ in range(len(mine) - skip):
            yield self._collate([next(pairs) for _ in range(cfg.micro_batch)])

    def _collate(self, pairs: list[tuple]) -> dict:
        cfg = self.cfg
        batch = self.texts.collate([(key, c, payload) for key, c, _, _, payload in pairs],
                                   lambda key, c: _rng(cfg.seed, self.epoch, key, c, "text"))
        batch["pid"] = torch.tensor([p[3] for p in pairs])
        if cfg.load_images:
            images = []
            for key, c, media, _, _ in pairs:
                if cfg.augment:
                    state = _rng(cfg.seed, self.epoch, key, c, "image").getstate()

                    def transform(img, state=state):  # every frame of a video gets the same augmentation
                        rng = random.Random()
                        rng.setstate(state)
                        return train_transform(img, cfg.image_size, rng, erasing_p=cfg.erasing_p)
                else:
                    def transform(img):
                        return eval_transform(img, cfg.image_size)
                images.append(_decode(media, transform))
            batch["image"] = torch.stack(images)
        return batch


def batches_per_epoch(shard_dir: str, split: str, global_batch: int, languages: tuple[str, ...] = (LANGUAGE,)) -> int:
    """Optimiser steps per epoch: every caption pair once (of each language), the last partial batch dropped."""
    captions = sum(read_split(shard_dir, split, language).captions for language in languages)
    if captions < global_batch:
        raise ValueError(f"split '{split}' has {captions} captions in {list(languages)}, fewer than one global "
                         f"batch ({global_batch})")
    return captions // global_batch


def ignore_job_signals(_worker: int) -> None:
    """DataLoader workers leave Slurm's preemption signals to the training process."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader(cfg: TrainStreamConfig, texts, epoch: int, start_batch: int, workers: int) -> DataLoader:
    stream = TrainStream(cfg, texts, epoch, start_batch)
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      worker_init_fn=ignore_job_signals)


# ---------------------------------------------------------------------------------------------------------------
# evaluation


class EvalImages(IterableDataset):
    """This rank's share of a split (sample i goes to rank i % world): (image, pid, key, captions)."""

    def __init__(self, shard_dir: str, split: str, image_size: tuple[int, int], rank: int, world_size: int,
                 language: str = LANGUAGE):
        super().__init__()
        self.info = read_split(shard_dir, split)
        self.image_size, self.rank, self.world_size, self.language = image_size, rank, world_size, language

    def __iter__(self):
        worker, workers = _slot()
        for index, sample in enumerate(_raw_samples(self.info.shards)):
            if index % self.world_size != self.rank or (index // self.world_size) % workers != worker:
                continue
            meta = json.loads(sample["json"])
            image = _decode(_media(sample, meta), lambda img: eval_transform(img, self.image_size))
            yield image, sample_label(meta), sample["__key__"], list(meta["captions"].get(self.language, []))


def _collate_eval(items: list[tuple]) -> dict:
    return {"image": torch.stack([i[0] for i in items]), "pid": torch.tensor([i[1] for i in items]),
            "key": [i[2] for i in items], "captions": [i[3] for i in items]}


def eval_loader(shard_dir: str, split: str, image_size: tuple[int, int], rank: int, world_size: int,
                batch_size: int, workers: int, language: str = LANGUAGE) -> DataLoader:
    dataset = EvalImages(shard_dir, split, image_size, rank, world_size, language)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate_eval,
                      worker_init_fn=ignore_job_signals)
