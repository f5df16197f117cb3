"""The training reader (WebDataset shards -> uint8 batches, normalised once per batch) against a folder of JPEGs
read the way the field's person-retrieval code reads it (a map-style dataset: open each file, decode, augment and
normalise each image in the loader worker, tokenize its caption).

Both produce the same training pairs from the same synthetic CUHK-PEDES-layout dataset (3,000 images at 384x128,
two captions each), with the same augmentation (``dsmoe.data.transforms``) and caption encoding; pairs per second
include everything up to a normalised float batch in the training process.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.measure import report

SIZES = {"images": 3000, "image_size": [384, 128], "batch": 64}
QUICK_SIZES = {"images": 120, "image_size": [64, 32], "batch": 16}


def prepare(work: Path, sizes: dict) -> dict:
    """The raw dataset, its shards and a tokenizer (made once per size under ``work``)."""
    from dsmoe.demo.models import train_tokenizer
    from dsmoe.demo.people import make_synthetic_pedes
    from dsmoe.shards.layouts.person import read_person_layout
    from dsmoe.shards.writer import write_shards

    size = tuple(sizes["image_size"])
    base = work / f"reader-{sizes['images']}-{size[0]}x{size[1]}"
    root = make_synthetic_pedes(base / "raw", num_ids={"train": max(1, sizes["images"] // 3)}, images_per_id=3,
                                captions_per_image=2, image_size=size)
    records = read_person_layout("cuhk-pedes", root)
    shards = base / "shards"
    if not (shards / "train.manifest.json").exists():
        write_shards(records, shards, dataset="cuhk-pedes", samples_per_shard=500, workers=1)
    tokenizer = base / "tokenizer"
    if not tokenizer.exists():
        train_tokenizer([c for r in records for c in r.captions], tokenizer)
    return {"raw": str(root), "shards": str(shards), "tokenizer": str(tokenizer)}


class FolderPairs(Dataset):
    """(image, caption, person id) triples of a raw folder, each read, augmented and normalised on its own."""

    def __init__(self, root: str, size: tuple[int, int], encoder):
        from dsmoe.shards.layouts.person import read_person_layout

        self.items = [(r.image_path, c, r.pid) for r in read_person_layout("cuhk-pedes", Path(root))
                      for c in r.captions]
        self.size, self.encoder = size, encoder

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        import random

        from dsmoe.data.transforms import decode_rgb, normalize, train_transform

        path, caption, pid = self.items[index]
        image, box = train_transform(decode_rgb(Path(path).read_bytes()), self.size, random.Random(index))
        pixels = normalize(image[None], torch.tensor([box]))[0]  # per image, in the worker
        encoded = self.encoder.encode([caption])
        return pixels, encoded.ids[0], encoded.eot[0], pid


def reader_case(variant: str, options: dict) -> None:
    """``shards``, ``shards-unchecked`` (no sha256 of the shards against their manifest) or ``folder``, with
    ``options["workers"]`` DataLoader workers: pairs per second."""
    from dsmoe.data.pipeline import CaptionPairs, TrainStreamConfig, train_loader
    from dsmoe.data.text import CaptionEncoder, load_tokenizer
    from dsmoe.data.transforms import normalize

    torch.set_num_threads(options["threads"])
    paths, sizes, workers = options["paths"], options["sizes"], options["workers"]
    size, batch = tuple(sizes["image_size"]), sizes["batch"]
    encoder = CaptionEncoder(load_tokenizer(paths["tokenizer"]), 64)
    pairs = 0
    start = time.perf_counter()
    if variant.startswith("shards"):
        batches = 2 * sizes["images"] // batch  # every caption pair once
        cfg = TrainStreamConfig(shard_dir=paths["shards"], split="train", image_size=size, micro_batch=batch,
                                batches_per_epoch=batches, rank=0, world_size=1, seed=0, shuffle_buffer=1000,
                                augment=True, checksums=variant == "shards")
        for b in train_loader(cfg, CaptionPairs(encoder, "en"), 0, 0, workers):
            pixels = normalize(b["image"], b["erase"])
            pairs += len(pixels)
    else:
        loader = DataLoader(FolderPairs(paths["raw"], size, encoder), batch_size=batch, shuffle=True,
                            num_workers=workers, drop_last=True)
        for pixels, *_ in loader:
            pairs += len(pixels)
    seconds = time.perf_counter() - start
    report({"seconds": seconds, "pairs": pairs, "pairs_per_s": pairs / seconds})
