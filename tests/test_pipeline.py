"""Tests of caption encoding (dsmoe.data.text) and the WebDataset pipelines (dsmoe.data.pipeline)."""

from __future__ import annotations

import dataclasses
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from dsmoe.data.pipeline import (CaptionPairs, EvalImages, TrainStream, TrainStreamConfig, batches_per_epoch,
                                 eval_loader, train_loader)
from dsmoe.data.format import read_split
from dsmoe.shards.layouts.person import read_person_layout
from dsmoe.shards.writer import write_shards
from dsmoe.demo.people import make_synthetic_pedes
from dsmoe.data.text import CaptionEncoder
from dsmoe.data.transforms import CLIP_MEAN, normalize
from dsmoe.demo.models import train_tokenizer

NUM_IDS = {"train": 8, "val": 2, "test": 3}
IMAGE_SIZE = (32, 16)
TEXT_LENGTH = 48


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw_records(tmp_path_factory):
    root = make_synthetic_pedes(tmp_path_factory.mktemp("raw"), num_ids=NUM_IDS, images_per_id=2,
                                image_size=IMAGE_SIZE)
    return read_person_layout("cuhk-pedes", root)


@pytest.fixture(scope="module")
def shard_dir(raw_records, tmp_path_factory) -> str:
    """train: 16 images / 32 captions in shards of 5, 5, 5, 1; val: 1 shard; test: 2 shards."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(raw_records, out, dataset="cuhk-pedes", samples_per_shard=5)
    return str(out)


@pytest.fixture(scope="module")
def even_shard_dir(raw_records, tmp_path_factory) -> str:
    """The same data in four train shards of 4 samples each."""
    out = tmp_path_factory.mktemp("even-shards")
    write_shards(raw_records, out, dataset="cuhk-pedes", samples_per_shard=4)
    return str(out)


@pytest.fixture(scope="module")
def encoder(raw_records, tmp_path_factory) -> CaptionEncoder:
    captions = [c for r in raw_records for c in r.captions]
    tokenizer = train_tokenizer(captions, tmp_path_factory.mktemp("tok"))
    return CaptionEncoder(tokenizer, TEXT_LENGTH)


def _stream(shard_dir: str, *, rank: int = 0, world: int = 2, micro: int = 2, batches: int = 6,
            split: str = "train", **kw) -> TrainStreamConfig:
    return TrainStreamConfig(shard_dir=shard_dir, split=split, image_size=IMAGE_SIZE, micro_batch=micro,
                             batches_per_epoch=batches, rank=rank, world_size=world, seed=7,
                             **{"shuffle_buffer": 6, **kw})


def _take(cfg: TrainStreamConfig, encoder: CaptionEncoder, *, epoch: int = 0, start: int = 0,
          workers: int = 0, corruption: float = 0.0) -> list[dict]:
    return list(train_loader(cfg, CaptionPairs(encoder, corruption=corruption), epoch, start, workers))


def _pairs(batches: list[dict]) -> list[tuple]:
    """(pid, caption ids) per pair: captions of one person are distinct, so this names the caption pair."""
    return [(int(pid), tuple(ids.tolist())) for b in batches for pid, ids in zip(b["pid"], b["text"])]


def _tar_samples(shard_dir: str, split: str) -> dict[str, dict]:
    """key -> parsed json of every sample in the split's shards, read with tarfile."""
    manifest = json.loads((Path(shard_dir) / f"{split}.manifest.json").read_text())
    samples = {}
    for shard in manifest["shards"]:
        with tarfile.open(Path(shard_dir) / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "json":
                    assert key not in samples
                    samples[key] = json.loads(tar.extractfile(member).read())
    assert len(samples) == manifest["samples"]
    return samples


# ---------------------------------------------------------------- caption encoding


def _fallback_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """OpenAI-CLIP-like: no mask token, start/end tokens after the regular vocabulary, pad = eos."""
    vocab = {w: i for i, w in enumerate(words)}
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(words), len(words) + 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}",
                                                       special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token=eos)


def _check_layout(encoder: CaptionEncoder, ids: torch.Tensor, eot: int) -> None:
    tok = encoder.tokenizer
    assert int(ids[0]) == tok.bos_token_id
    assert int(ids[eot]) == tok.eos_token_id
    assert tok.eos_token_id not in ids[:eot].tolist()
    assert all(int(i) == tok.pad_token_id for i in ids[eot + 1:])


def test_eot_is_the_end_of_text_position(encoder):
    captions = ["a man in a red top.", "", "woman " * 200]
    encoded = encoder.encode(captions)
    assert encoded.ids.shape == (3, TEXT_LENGTH) and encoded.ids.dtype == torch.long
    unpadded = len(encoder.tokenizer(captions[0])["input_ids"])
    assert encoded.eot.tolist() == [unpadded - 1, 1, TEXT_LENGTH - 1]
    for ids, eot in zip(encoded.ids, encoded.eot.tolist()):
        _check_layout(encoder, ids, eot)


def test_eot_with_pad_equal_to_eos():
    encoder = CaptionEncoder(_fallback_tokenizer(["a", "red", "top", "man"]), 8)
    encoded = encoder.encode(["a red top", "a man a man a man a man a man"])
    assert encoded.eot.tolist() == [4, 7]
    assert int(encoded.ids[0, 4]) == int(encoded.ids[0, 5]) == encoder.eos_id  # padding is eos too


def test_mask_id_fallback_below_the_special_tokens():
    words = ["a", "red", "top", "man"]
    encoder = CaptionEncoder(_fallback_tokenizer(words), 8)
    assert encoder.mask_id == len(words) - 1  # min(special ids) - 1
    assert encoder.mask_id not in encoder.regular_ids
    assert set(encoder.regular_ids) == {1, 2}  # as IRRA's corruption: id 0 is never drawn


def test_mask_id_of_a_tokenizer_with_a_mask_token(encoder):
    tok = encoder.tokenizer
    assert tok.mask_token_id is not None and encoder.mask_id == tok.mask_token_id
    assert not set(encoder.regular_ids) & set(tok.all_special_ids)


def test_tokenizers_without_usable_ids_are_refused():
    bos, eos = "<s>", "</s>"
    vocab = {bos: 0, eos: 1, "a": 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    no_room = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    with pytest.raises(ValueError, match="mask"):
        CaptionEncoder(no_room, 8)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, pad_token=bos)
    with pytest.raises(ValueError, match="eos"):
        CaptionEncoder(no_eos, 8)


def test_corruption_spares_bos_eot_and_padding(encoder):
    encoded = encoder.encode(["a woman in a long blue skirt and a black top carries a red handbag.", "a man."])
    original = encoded.ids.clone()
    for ids, eot in zip(encoded.ids, encoded.eot.tolist()):
        touched = torch.zeros_like(ids, dtype=torch.bool)
        for seed in range(100):
            out = encoder.corrupt(ids, eot, random.Random(seed), 0.5)
            assert out.shape == ids.shape
            assert torch.equal(out[0], ids[0]) and torch.equal(out[eot:], ids[eot:])
            _check_layout(encoder, out, eot)
            touched |= out != ids
        assert bool(touched[1:eot].all()), "every token between BOS and EOT can be corrupted"
    assert torch.equal(encoded.ids, original), "corrupt returns a copy"


def test_corruption_selects_at_least_one_token(encoder):
    encoded = encoder.encode(["a woman in a long blue skirt and a black top."])
    ids, eot = encoded.ids[0], int(encoded.eot[0])
    changed = []
    for seed in range(200):
        out = encoder.corrupt(ids, eot, random.Random(seed), 1e-9)  # almost never selected by the draw
        changed.append(int((out != ids).sum()))
    assert max(changed) == 1
    # one forced selection per caption, of which 90% are replaced (80% mask + 10% random)
    assert sum(changed) >= 150


def test_corruption_is_deterministic_and_mostly_masks(encoder):
    encoded = encoder.encode(["the woman wears a long blue skirt and a black top and carries a red handbag."])
    ids, eot = encoded.ids[0], int(encoded.eot[0])
    assert torch.equal(encoder.corrupt(ids, eot, random.Random(5), 0.15),
                       encoder.corrupt(ids, eot, random.Random(5), 0.15))
    outputs = [encoder.corrupt(ids, eot, random.Random(seed), 0.4) for seed in range(300)]
    assert len({tuple(o.tolist()) for o in outputs}) > 100, "different seeds must corrupt differently"
    replaced = torch.cat([o[o != ids] for o in outputs])
    selected_estimate = 0.4 * (eot - 1) * 300
    masks = int((replaced == encoder.mask_id).sum())
    assert masks / len(replaced) > 0.75
    assert 0.7 * 0.8 * selected_estimate < masks < 1.3 * 0.8 * selected_estimate
    others = replaced[replaced != encoder.mask_id]
    assert len(others) > 0 and not set(others.tolist()) & set(encoder.tokenizer.all_special_ids)
    assert torch.equal(encoder.corrupt(ids, eot, random.Random(1), 0.0), ids)


# ---------------------------------------------------------------- training stream


def test_read_split_missing_names_the_split_and_what_exists(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        read_split(shard_dir, "dev")
    message = str(err.value)
    assert "'dev'" in message
    for found in ("train.manifest.json", "val.manifest.json", "test.manifest.json"):
        assert found in message
    with pytest.raises(FileNotFoundError, match="none"):
        read_split(tmp_path / "empty", "train")


def test_read_split_counts(shard_dir):
    info = read_split(shard_dir, "train")
    assert len(info.shards) == 4 and info.samples == 16 and info.captions == 32
    assert batches_per_epoch(shard_dir, "train", 8) == 4
    assert batches_per_epoch(shard_dir, "train", 10) == 3
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batches_per_epoch(shard_dir, "train", 33)


@pytest.mark.parametrize("split,world,workers", [
    ("train", 2, 0),   # 4 shards, 2 slots
    ("train", 2, 1),
    ("train", 2, 2),   # 4 shards, 4 slots
    ("val", 2, 0),     # 1 shard, 2 slots
    ("test", 2, 2),    # 2 shards, 4 slots
    ("train", 3, 0),   # 4 shards, 3 slots: uneven shard counts per rank
])
def test_every_rank_yields_the_same_number_of_batches(shard_dir, encoder, split, world, workers):
    per_rank = []
    for rank in range(world):
        cfg = _stream(shard_dir, rank=rank, world=world, micro=3, batches=5, split=split)
        batches = _take(cfg, encoder, workers=workers)
        per_rank.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (3, 3, *IMAGE_SIZE) and batch["image"].dtype == torch.uint8
            assert batch["erase"].shape == (3, 4)
            assert batch["text"].shape == (3, TEXT_LENGTH) and batch["eot"].shape == (3,)
            assert batch["pid"].shape == (3,)
    assert per_rank == [5] * world


@pytest.mark.parametrize("workers,start", [(0, 1), (0, 4), (1, 3), (2, 2), (2, 3)])
def test_resume_continues_on_the_same_batches(shard_dir, encoder, workers, start):
    cfg = _stream(shard_dir, rank=1, micro=2, batches=7)
    fresh = _take(cfg, encoder, workers=workers, corruption=0.3)
    resumed = _take(cfg, encoder, start=start, workers=workers, corruption=0.3)
    assert len(fresh) == 7 and len(resumed) == 7 - start
    for i, (a, b) in enumerate(zip(fresh[start:], resumed)):
        for key in ("pid", "text", "eot", "image", "erase"):
            assert torch.equal(a[key], b[key]), f"batch {start + i}: {key} differs after resuming at {start}"


class _CountedFile:
    """A file whose reads add to ``counter``."""

    def __init__(self, f, counter: list[int]):
        self.f, self.counter = f, counter

    def read(self, *args):
        data = self.f.read(*args)
        self.counter[0] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_resumed_stream_seeks_over_the_images_it_skips(encoder, tmp_path, monkeypatch):
    from contextlib import contextmanager

    from dsmoe.data import location

    raw = make_synthetic_pedes(tmp_path / "raw", num_ids={"train": 6}, images_per_id=2, image_size=(256, 128))
    write_shards(read_person_layout("cuhk-pedes", raw), tmp_path / "shards", dataset="cuhk-pedes",
                 samples_per_shard=4)
    stream, random_access = location.open_stream, location.open_random
    counter = [0]

    @contextmanager
    def counted_stream(address, **kw):
        with stream(address, **kw) as f:
            yield _CountedFile(f, counter)

    monkeypatch.setattr(location, "open_stream", counted_stream)
    monkeypatch.setattr(location, "open_random", lambda *a, **kw: _CountedFile(random_access(*a, **kw), counter))
    cfg = TrainStreamConfig(shard_dir=str(tmp_path / "shards"), split="train", image_size=(64, 32), micro_batch=2,
                            batches_per_epoch=12, rank=0, world_size=1, seed=3, shuffle_buffer=3)
    fresh = list(TrainStream(cfg, CaptionPairs(encoder), epoch=0))
    read_fresh, counter[0] = counter[0], 0
    resumed = list(TrainStream(cfg, CaptionPairs(encoder), epoch=0, start_batch=10))
    for a, b in zip(fresh[10:], resumed, strict=True):
        for key in ("pid", "text", "image", "erase"):
            assert torch.equal(a[key], b[key])
    # the fresh stream read 12 images of ~10 kB; the resumed one headers, captions and the images it trained on
    images = 0
    for shard in (tmp_path / "shards").glob("train-*.tar"):
        with tarfile.open(shard) as tar:
            images += sum(m.size for m in tar.getmembers() if m.name.endswith(".jpg"))
    assert read_fresh >= images and counter[0] < 0.5 * read_fresh, (read_fresh, counter[0], images)


def _saved_cursors(batches: list[dict]) -> dict[int, dict]:
    """Each slot's cursor after its last batch of ``batches``, through JSON as a checkpoint keeps them."""
    cursors = {batch["cursor"].slot: batch["cursor"].state for batch in batches}
    return {int(slot): state for slot, state in json.loads(json.dumps(cursors, default=list)).items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_from_its_cursors_continues_on_the_same_batches(shard_dir, encoder, workers, monkeypatch):
    """At every batch of an epoch that drains its buffer and cycles its shards several times (4 slots of 1 shard
    each with 2 workers), the cursors give the rest of the epoch exactly; with one worker the resumed stream is
    seen entering its shard at the saved sample and byte, replaying nothing."""
    from dsmoe.data import slot_stream

    cfg = _stream(shard_dir, rank=1, micro=2, batches=9)
    fresh = _take(cfg, encoder, workers=workers, corruption=0.3)
    assert all(b["cursor"].state is not None for b in fresh)
    opened = []
    real = slot_stream.shard_samples

    def recorded(shard, faults, owns, skip_media, start, offset, *rest):
        opened.append((start, offset, skip_media))
        return real(shard, faults, owns, skip_media, start, offset, *rest)

    monkeypatch.setattr(slot_stream, "shard_samples", recorded)
    entered_mid_shard = 0
    for start in range(1, 9):
        cursors = _saved_cursors(fresh[:start])
        opened.clear()
        resumed = list(train_loader(cfg, CaptionPairs(encoder, corruption=0.3), 0, start, workers, cursors=cursors))
        assert len(resumed) == 9 - start
        for i, (a, b) in enumerate(zip(fresh[start:], resumed)):
            for key in ("pid", "text", "eot", "image", "erase"):
                assert torch.equal(a[key], b[key]), f"batch {start + i}: {key} differs after resuming at {start}"
            assert a["cursor"] == b["cursor"]
        if workers == 0:
            place = cursors[1]["stream"]  # rank 1's only slot (of 2)
            assert all(skip_media is None for *_, skip_media in opened)  # no replay
            if not place["draining"] and place["position"] > 0:
                assert opened[0][:2] == (place["position"], place["offset"]) and place["offset"] > 0
                entered_mid_shard += 1
    assert workers or entered_mid_shard >= 3


def test_a_cursor_saved_under_other_settings_is_not_used(shard_dir, encoder):
    saved = _take(_stream(shard_dir, rank=1, micro=2, batches=6), encoder)
    other = _stream(shard_dir, rank=1, micro=2, batches=6, shuffle_buffer=5)
    fresh = _take(other, encoder)
    resumed = list(train_loader(other, CaptionPairs(encoder), 0, 3, 0, cursors=_saved_cursors(saved[:3])))
    assert _pairs(resumed) == _pairs(fresh[3:]) != _pairs(saved[3:])


def test_a_cursor_that_no_longer_reads_falls_back_to_replaying(shard_dir, encoder, capfd):
    cfg = _stream(shard_dir, rank=1, micro=2, batches=6)
    fresh = _take(cfg, encoder)
    cursors = _saved_cursors(fresh[:3])
    codes = cursors[1]["stream"]["buffer"]
    codes[2] += 512  # the first buffered pair's sample as if the shard had changed: no sample begins there
    resumed = list(train_loader(cfg, CaptionPairs(encoder), 0, 3, 0, cursors=cursors))
    assert _pairs(resumed) == _pairs(fresh[3:])
    assert "data slot 1: its saved place does not read (UnscannableTar" in capfd.readouterr().err


def test_resume_past_the_end_yields_nothing(shard_dir, encoder):
    cfg = _stream(shard_dir, batches=3)
    assert list(TrainStream(cfg, CaptionPairs(encoder), epoch=0, start_batch=3)) == []
    assert list(TrainStream(cfg, CaptionPairs(encoder), epoch=0, start_batch=10)) == []


def test_stream_is_deterministic_and_epochs_differ(shard_dir, encoder):
    cfg = _stream(shard_dir, micro=4, batches=4)
    epoch0 = _take(cfg, encoder, epoch=0)
    again = _take(cfg, encoder, epoch=0)
    epoch1 = _take(cfg, encoder, epoch=1)
    assert _pairs(epoch0) == _pairs(again)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(epoch0, again))
    assert _pairs(epoch0) != _pairs(epoch1)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(epoch0, epoch1))
    other_seed = dataclasses.replace(cfg, seed=8)
    assert _pairs(_take(other_seed, encoder, epoch=0)) != _pairs(epoch0)


def _epoch_pairs(shard_dir: str, encoder: CaptionEncoder, world: int, micro: int, workers: int = 0):
    batches = batches_per_epoch(shard_dir, "train", world * micro)
    return [_pairs(_take(_stream(shard_dir, rank=r, world=world, micro=micro, batches=batches), encoder,
                         workers=workers)) for r in range(world)]


def _all_pairs(shard_dir: str, encoder: CaptionEncoder) -> set[tuple]:
    samples = _tar_samples(shard_dir, "train")
    captions = [(s["pid"], c) for s in samples.values() for c in s["captions"]["en"]]
    encoded = encoder.encode([c for _, c in captions])
    return {(int(pid), tuple(ids.tolist())) for (pid, _), ids in zip(captions, encoded.ids)}


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_takes_every_pair_once_with_even_shards(even_shard_dir, encoder, workers):
    everything = _all_pairs(even_shard_dir, encoder)
    assert len(everything) == read_split(even_shard_dir, "train").captions == 32
    ranks = _epoch_pairs(even_shard_dir, encoder, world=2, micro=4, workers=workers)
    taken = [p for rank in ranks for p in rank]
    assert len(taken) == 32
    assert set(taken) == everything, "every caption pair exactly once over the epoch"
    assert not set(ranks[0]) & set(ranks[1])


def test_one_epoch_takes_nearly_every_pair_with_uneven_shards(shard_dir, encoder):
    everything = _all_pairs(shard_dir, encoder)
    ranks = _epoch_pairs(shard_dir, encoder, world=2, micro=4)
    taken = [p for rank in ranks for p in rank]
    assert len(taken) == 32 and set(taken) <= everything
    # the slot holding the 5- and 1-sample shards (12 pairs) has to cycle for its last 4 pairs
    assert len(set(taken)) >= 28
    for rank in ranks:
        first_pass = rank[:12]
        assert len(set(first_pass)) == len(first_pass), "no pair twice before a slot's data is used up"


def test_train_pairs_keep_image_caption_and_pid_together(shard_dir, encoder):
    samples = _tar_samples(shard_dir, "train")
    by_image = {}
    for sample in EvalImages(shard_dir, "train", IMAGE_SIZE, 0, 1):
        by_image[sample.image.numpy().tobytes()] = (sample.key, sample.label)
    assert len(by_image) == 16
    cfg = _stream(shard_dir, micro=4, batches=4, augment=False)
    for batch in _take(cfg, encoder):
        for image, pid, ids in zip(batch["image"], batch["pid"], batch["text"]):
            key, image_pid = by_image[image.numpy().tobytes()]
            assert int(pid) == image_pid == samples[key]["pid"]
            caption_ids = encoder.encode(samples[key]["captions"]["en"]).ids
            assert any(torch.equal(ids, c) for c in caption_ids), "the caption belongs to the same image"


def test_augmented_images_are_normalised_crops(shard_dir, encoder):
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)

    def erased(batches):  # random erasing sets a block to CLIP's mean in normalised units (the release's fill)
        return sum(bool((img == mean).all(dim=0).any()) for b in batches for img in normalize(b["image"], b["erase"]))

    always = _take(_stream(shard_dir, micro=4, batches=2, augment=True, erasing_p=1.0), encoder)
    never = _take(_stream(shard_dir, micro=4, batches=2, augment=True, erasing_p=0.0), encoder)
    plain = _take(_stream(shard_dir, micro=4, batches=2, augment=False), encoder)
    for batch in always + never + plain:
        assert batch["image"].shape == (4, 3, *IMAGE_SIZE) and batch["image"].dtype == torch.uint8
    assert erased(always) >= 6 and erased(never) == 0
    assert all((b["erase"] == 0).all() for b in never + plain)
    # augmentation (flip, pad-and-crop) changes the pixels of the same pairs
    assert _pairs(never) == _pairs(plain)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(never, plain))


# ---------------------------------------------------------------- evaluation pass


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_images_cover_the_split_exactly_once(shard_dir, world):
    samples = _tar_samples(shard_dir, "test")
    keys = []
    for rank in range(world):
        for sample in EvalImages(shard_dir, "test", IMAGE_SIZE, rank, world):
            assert sample.image.shape == (3, *IMAGE_SIZE) and sample.image.dtype == torch.uint8
            assert sample.label == samples[sample.key]["pid"] and sample.captions == samples[sample.key]["captions"]
            keys.append((sample.index, sample.key))
    # every sample once, with its index in the split (shard by shard, in the manifest's order)
    assert [key for _, key in sorted(keys)] == list(samples) and sorted(i for i, _ in keys) == list(range(6))


def test_eval_loader_with_workers_covers_the_split_exactly_once(shard_dir):
    samples = _tar_samples(shard_dir, "test")
    keys = []
    for rank in range(2):
        for batch in eval_loader(shard_dir, "test", IMAGE_SIZE, rank, 2, batch_size=2, workers=2):
            assert batch["image"].shape[1:] == (3, *IMAGE_SIZE)
            assert len(batch["key"]) == len(batch["pid"]) == len(batch["captions"]) == batch["image"].shape[0]
            for key, pid, captions in zip(batch["key"], batch["pid"].tolist(), batch["captions"]):
                assert pid == samples[key]["pid"] and captions == samples[key]["captions"]
            keys.extend(batch["key"])
    assert sorted(keys) == sorted(samples) and len(keys) == 6


def test_each_eval_shard_is_read_by_one_worker_of_one_rank(shard_dir, monkeypatch):
    """Readers take whole shards (every worker of every rank reading every shard's bytes would multiply the I/O)."""
    import dsmoe.data.pipeline as pipeline

    opened: dict[str, list] = {}
    real_shard_samples = pipeline.shard_samples

    def counting(shard, *args, **kwargs):
        opened.setdefault(Path(shard.address).name, []).append(reader)
        return real_shard_samples(shard, *args, **kwargs)

    monkeypatch.setattr(pipeline, "shard_samples", counting)
    shards = read_split(shard_dir, "train").shards
    for world, workers in ((1, 1), (2, 1), (2, 2), (3, 2)):
        opened.clear()
        indices = []
        for rank in range(world):
            for worker in range(workers):
                reader = (rank, worker)
                monkeypatch.setattr(pipeline, "_slot", lambda w=worker: (w, workers))
                indices += [s.index for s in EvalImages(shard_dir, "train", IMAGE_SIZE, rank, world)]
        assert sorted(indices) == list(range(16)), (world, workers)
        assert sorted(opened) == sorted(Path(str(s)).name for s in shards)
        assert all(len(readers) == 1 for readers in opened.values()), opened
        if world * workers <= len(shards):  # as many busy readers as there can be
            assert len({r for readers in opened.values() for r in readers}) == world * workers


def test_the_scanning_reader_gives_what_tarfile_gives_even_for_foreign_or_cut_tars(shard_dir, tmp_path, monkeypatch):
    """dsmoe's USTAR shards are scanned header by header, streamed or seeking over the media, from the start or from
    a sample's saved byte; a tar with other members (here a pax header for a long key, as Python's tarfile writes)
    is read through tarfile; a tar cut anywhere, or with a header that does not read, gives the samples and faults
    that reading it through tarfile alone gives, however it is entered."""
    import io

    from dsmoe.data import shard_reader
    from dsmoe.data.shard_reader import MediaRef, load_media, shard_samples
    from dsmoe.data.format import ShardEntry
    from dsmoe.data.location import DEFAULT_READS
    from dsmoe.data.tar import UnscannableTar

    original = read_split(shard_dir, "train").shards[0]
    foreign = tmp_path / "foreign.tar"
    with tarfile.open(original) as source, tarfile.open(foreign, "w", format=tarfile.PAX_FORMAT) as out:
        for number, member in enumerate(source.getmembers()):
            data = source.extractfile(member).read()
            if number >= 4:  # the third sample on gets a key too long for a USTAR name
                member.name = "k" * 120 + member.name
            out.addfile(member, io.BytesIO(data))
    data = Path(original).read_bytes()
    damaged = {f"cut{n}": data[:n] for n in range(300, len(data), 397)}  # in headers, captions and images
    damaged["garbage"] = data[:2048] + b"x" * 512 + data[2560:]  # a header that does not read
    for name, content in damaged.items():
        (tmp_path / f"{name}.tar").write_bytes(content)

    def read(path, files=None, **kw) -> tuple[list, list]:
        samples, faults = [], []
        for position, sample in shard_samples(ShardEntry(path, 5), faults, **kw):
            samples.append((position, sample["__key__"], sample.get("json"), load_media(sample.get("jpg"), files)))
        return samples, [f.position for f in faults]

    paths = (original, str(foreign), *(str(tmp_path / f"{name}.tar") for name in damaged))
    sample_ends = {path: [s["__end__"] for _, s in shard_samples(ShardEntry(path, 5), [])] for path in paths}
    assert len(sample_ends[original]) == 5 and None not in sample_ends[original]
    assert all(end is None for end in sample_ends[str(foreign)][2:])  # through tarfile: no byte places
    with monkeypatch.context() as m:
        def unscannable(*args, **kw):
            raise UnscannableTar("the reference reads through tarfile")
            yield
        m.setattr(shard_reader, "scan_members", unscannable)
        reference = {path: read(path) for path in paths}
    for path in paths:
        streamed, files = read(path), {}
        sought = read(path, files, skip_media=lambda: True)
        assert streamed == reference[path] == sought, path
        for start, offset in enumerate([0, *sample_ends[path][:-1]]):  # entered at each sample, as a cursor does
            entered = read(path, files, start=start, offset=offset)
            assert entered[0] == reference[path][0][start:], (path, start)
            assert entered[1] == reference[path][1], (path, start)
        if path in (original, str(foreign)):
            assert len(streamed[0]) == 5 and not streamed[1]
    with shard_reader._members(ShardEntry(original, 5), lambda: True, 0, True, DEFAULT_READS, True) as (members, _):
        assert all(isinstance(m["data"], MediaRef) for m in members if m["fname"].endswith(".jpg"))
