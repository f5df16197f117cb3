"""Assets of the embedded demo: a synthetic CUHK-PEDES-layout dataset, its shards, and a tiny CLIP.

No weights or datasets can be downloaded where the demo must run, so the demo builds everything from
configs: the dataset in the real raw layout (``reid_raw.json`` + ``imgs/``), converted by the shard
converter (``dsmoe.shards``); a word-level tokenizer trained on the training captions with ``tokenizers``;
and a small ``CLIPModel`` built from a ``CLIPConfig``, briefly pre-trained contrastively on generic
"web" pairs (other people, captions naming only the top's colour) and saved with ``save_pretrained``.
Like OpenAI's CLIP on CUHK-PEDES, that backbone knows something but not the retrieval task: its zero-shot
score is low and the adapters have to learn the rest (trousers, bags, hats). Each step is cached.

The DASD demo (``dsmoe.demo.multi30k``) writes a Multi30K layout with two made-up target languages and a tiny
"mBERT" beside the same kind of CLIP.
"""
from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

from dsmoe.config import ModelConfig, RunConfig
from dsmoe.demo.models import build_tiny_mbert, ensure_tiny_clip
from dsmoe.demo.multi30k import DEMO_LANGUAGES, make_synthetic_multi30k
from dsmoe.demo.people import STAMP_NAME, make_synthetic_pedes
from dsmoe.methods.dasd.config import DASDConfig

PERSON_DEMO_PEOPLE = {"train": 384, "val": 24, "test": 24}
"""People of the DM-Adapter demo's splits: enough training people that the adapters generalise to unseen ones
within a few epochs (with 96 they memorise them)."""
MADE_FROM = ".made_from"
"""Beside the demo's shards and CLIP: the stamp of the raw set they were built from."""


def _make_shards(*args: str) -> None:
    """The shard converter, as a user runs it (in this process)."""
    from dsmoe.shards.cli import main

    if main(list(args)) != 0:
        raise RuntimeError(f"writing the demo's shards failed (python -m dsmoe.shards {' '.join(args)})")


def prepare_demo_once(cfg: RunConfig) -> None:
    """``prepare_demo`` by the first process of a launch that gets here; the others wait for it (a file lock, so
    no collective has to wait minutes), then find the assets ready."""
    demo_dir = Path(cfg.demo_dir)
    demo_dir.mkdir(parents=True, exist_ok=True)
    with open(demo_dir / ".prepare.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[dsmoe] waiting for another process to prepare the demo assets in {demo_dir}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        prepare_demo(cfg)


def prepare_demo(cfg: RunConfig) -> None:
    """Create (once) the assets of the demo recipe ``cfg`` under ``cfg.demo_dir``."""
    if cfg.method == "dasd":
        prepare_dasd_demo(cfg)
    else:
        prepare_person_demo(cfg.demo_dir, cfg.model)


def prepare_person_demo(demo_dir: str | Path, model: ModelConfig,
                        people: dict[str, int] = PERSON_DEMO_PEOPLE) -> None:
    """The DM-Adapter demo: synthetic CUHK-PEDES layout (``people`` per split), its shards, the tiny CLIP."""
    demo_dir = Path(demo_dir)
    raw = make_synthetic_pedes(demo_dir / "raw", num_ids=people, progress=True)
    shards, clip = demo_dir / "shards", Path(model.clip)
    if _needs_building(shards, "test.manifest.json", raw, demo_dir):
        _make_shards("--dataset", "cuhk-pedes", "--root", str(raw), "--out", str(shards), "--samples-per-shard", "64",
                     "--resize", f"{model.image_size[0]}x{model.image_size[1]}")
        _mark_made_from(shards, raw)
    if _needs_building(clip, "config.json", raw, demo_dir):
        records = json.loads((Path(raw) / "reid_raw.json").read_text())
        ensure_tiny_clip(clip, [c for r in records if r["split"] == "train" for c in r["captions"]])
        _mark_made_from(clip, raw)


def _needs_building(folder: Path, built: str, raw: Path, demo_dir: Path) -> bool:
    """Whether the demo must build ``folder`` (holding ``built`` once made) from ``raw``; a stale one (made from
    another raw set, or before this mark existed) is removed. A model folder outside ``demo_dir`` (one the user
    named) is left as it is."""
    if not (folder / built).is_file():
        return True
    mark = folder / MADE_FROM
    if mark.is_file() and mark.read_text() == (raw / STAMP_NAME).read_text():
        return False
    if not folder.resolve().is_relative_to(demo_dir.resolve()):
        return False
    print(f"[dsmoe] {folder} was built from another version of the demo's data: building it again", flush=True)
    shutil.rmtree(folder)
    return True


def _mark_made_from(folder: Path, raw: Path) -> None:
    (folder / MADE_FROM).write_text((raw / STAMP_NAME).read_text())


def prepare_dasd_demo(cfg: RunConfig) -> None:
    """The DASD demo: synthetic Multi30K layout (en + xx + yy), its shards, the tiny CLIP and the tiny "mBERT"."""
    demo_dir = Path(cfg.demo_dir)
    raw = make_synthetic_multi30k(demo_dir / "raw")
    shards = demo_dir / "shards"
    if not (shards / "test.manifest.json").is_file():
        _make_shards("--dataset", "multi30k", "--root", str(raw), "--out", str(shards), "--task", "1",
                     "--languages", ",".join(["en", *DEMO_LANGUAGES]), "--samples-per-shard", "64",
                     "--resize", f"{cfg.model.image_size[0]}x{cfg.model.image_size[1]}")
    task = raw / "data" / "task1" / "raw"
    english = (task / "train.en").read_text().splitlines()
    ensure_tiny_clip(Path(cfg.model.clip), english)
    mbert = Path(DASDConfig.of(cfg).tokenizer)
    if not (mbert / "config.json").is_file():
        build_tiny_mbert(mbert, [line for lang in DEMO_LANGUAGES for line in (task / f"train.{lang}").read_text()
                                 .splitlines()])
