"""Checkpoint folders on disk: tags, the COMPLETE marker, the ``latest``/``best`` pointers, staging and resolving.

A tag folder holds DeepSpeed's files for one step. It is written under a staging name, marked ``COMPLETE`` once
every rank has written its files, renamed to its tag, and only then named by the ``latest`` (or ``best``) pointer
file, which is replaced atomically: a crash at any moment leaves the pointers on complete checkpoints. This module
touches only the filesystem (no torch), so entry points can check paths before they import anything heavy.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from dsmoe.failures import RunError
from dsmoe.files import write_atomic

STAGING_PREFIX = ".partial-"  # a folder being written; never a valid tag


class CheckpointWriteError(RunError):
    def __init__(self, path: str | Path, cause: BaseException):
        self.path, self.cause = str(path), cause
        no_space = isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        what = "no space left on the device" if no_space else (
            cause.strerror if isinstance(cause, OSError) and cause.strerror else f"{type(cause).__name__}: {cause}")
        super().__init__(f"could not write {self.path}: {what}")


def complete_tag(ckpt_root: Path, pointer: str = "latest") -> str | None:
    """The tag a pointer file names, if that checkpoint is complete."""
    pointer_file = ckpt_root / pointer
    if not pointer_file.is_file():
        return None
    tag = pointer_file.read_text().strip()
    return tag if (ckpt_root / tag / "COMPLETE").is_file() else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """A run directory, a checkpoints directory or one tag directory -> (checkpoints dir, tag)."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        for pointer in ("best", "latest"):
            tag = complete_tag(root, pointer)
            if tag:
                return root, tag
    if (path / "COMPLETE").is_file():
        return path.parent, path.name
    raise FileNotFoundError(f"no complete checkpoint at {path} (looked for checkpoints/best, checkpoints/latest "
                            f"and a tag directory with a COMPLETE marker)")


def resume_point(spec: str | None, ckpt_root: Path) -> tuple[Path, str] | None:
    """Where a run continues from: nothing for ``none`` (or None), the newest complete checkpoint of ``ckpt_root``
    for ``auto`` (nothing when there is none yet), else the run, checkpoints or tag directory ``spec`` names."""
    if not spec or spec == "none":
        return None
    if spec == "auto":
        tag = complete_tag(ckpt_root)
        return (ckpt_root, tag) if tag else None
    return resolve_checkpoint(spec)


def is_portable(path: str | Path) -> bool:
    """Whether ``path`` names exported adapters (``dsmoe.portable``) rather than a DeepSpeed checkpoint."""
    return Path(path).suffix == ".safetensors"


def run_config_for(checkpoint: str | Path) -> Path | None:
    """The config a checkpoint was trained with: ``config.yaml`` of its run (given the run, checkpoints or tag
    directory), or ``<name>.yaml`` beside exported adapters; None when there is none."""
    path = Path(checkpoint)
    candidates = [path.with_suffix(".yaml")] if is_portable(path) else \
        [path / "config.yaml", path.parent / "config.yaml", path.parent.parent / "config.yaml"]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def check_checkpoint(path: str | Path) -> None:
    """Raise ``FileNotFoundError`` unless ``path`` is a portable adapters file or holds a complete checkpoint."""
    path = Path(path)
    if is_portable(path):
        if not path.is_file():
            raise FileNotFoundError(f"adapters file not found: {path}")
        return
    try:
        resolve_checkpoint(path)
    except FileNotFoundError as exc:
        runs = sorted(p for p in path.glob("*/checkpoints") if complete_tag(p) is not None) if path.is_dir() else []
        if runs:  # a method's stages (DASD: cla/, cma/) under one folder
            raise FileNotFoundError(f"{exc}; it holds the runs {', '.join(p.parent.name for p in runs)}: name "
                                    f"one, such as --checkpoint {runs[-1].parent}") from None
        raise


def _write(path: Path, text: str) -> None:
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise CheckpointWriteError(path, exc) from None


def write_pointer(root: Path, pointer: str, tag: str) -> None:
    _write(root / pointer, tag)


def publish(root: Path, staging: str, tag: str, marker: str) -> None:
    """Mark the staging folder complete (``COMPLETE`` holds ``marker``), rename it to ``tag`` and point ``latest``
    at it. A crash before the rename leaves only a staging folder, which ``remove_staging`` deletes later."""
    folder = root / staging
    try:
        _write(folder / "COMPLETE", marker)
        final = root / tag
        if final.exists():  # the same step saved again (a resumed run): the new copy replaces it
            old = root / f"{STAGING_PREFIX}replaced-{tag}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, final)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    write_pointer(root, "latest", tag)


def prune(root: Path, keep: int) -> None:
    """Keep ``keep`` step folders: those ``latest`` and ``best`` name (always, even when ``keep`` is 1), then the
    newest others; delete the rest."""
    pinned = {tag for tag in (complete_tag(root, "latest"), complete_tag(root, "best")) if tag}
    others = sorted((p for p in root.glob("step*") if p.is_dir() and p.name not in pinned), reverse=True)
    for old in others[max(0, keep - len(pinned)):]:
        shutil.rmtree(old, ignore_errors=True)


def remove_staging(root: Path) -> None:
    """Delete staging folders left by runs that died while saving."""
    for path in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def read_marker(root: Path, tag: str) -> dict:
    """The COMPLETE marker of a checkpoint (empty for checkpoints written before markers had content)."""
    try:
        return json.loads((root / tag / "COMPLETE").read_text() or "{}")
    except (OSError, ValueError):
        return {}


# Keys a resumed run may change without changing what is trained: how long, how often, where, how many ranks.
RUN_CONTROL = ("demo", "demo_dir", "wandb.", "tensorboard.", "data.workers", "data.max_bad_share", "data.max_bad_count",
               "data.remote.", "data.checksums",
               "adapter.ep_size", "train.max_steps", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.elastic_state", "train.eval_batch_size", "train.collective_timeout",
               "train.lost_rank_timeout", "train.threads_per_rank", "train.init_from", "train.eval_zero_shot",
               "train.output_dir")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _same(a, b) -> bool:
    if a == b:
        return True
    # a relative path saved by an older run and its absolute form now
    return isinstance(a, str) and isinstance(b, str) and Path(a).absolute() == Path(b).absolute()


def config_changes(saved: dict, now: dict) -> list[str]:
    """``key: saved -> now`` for every setting that differs, run-control keys (``RUN_CONTROL``) left out."""
    before, after = _flat(saved), _flat(now)
    changes = []
    for key in sorted(set(before) | set(after)):
        if key.startswith(RUN_CONTROL) or key in RUN_CONTROL:
            continue
        if key in before and key in after and _same(before[key], after[key]):
            continue
        changes.append(f"{key}: {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r}")
    return changes


DATA_CURSORS = "data_cursors_rank{rank}.json"
"""Each rank's file in a checkpoint folder: where each of its data slots' streams is (``dsmoe.data.slot_stream``),
with the epoch, batch, loader workers and world size it was saved at, and a checksum of all that."""


def write_data_cursors(folder: Path, rank: int, saved: dict) -> None:
    """``saved``: {"epoch", "batch", "workers", "world_size", "cursors": {slot: state}} (int arrays as lists)."""
    text = json.dumps({**saved, "sha256": _cursor_digest(saved)})
    try:
        (folder / DATA_CURSORS.format(rank=rank)).write_text(text)
    except OSError as exc:
        raise CheckpointWriteError(folder / DATA_CURSORS.format(rank=rank), exc) from None


def read_data_cursors(folder: Path, rank: int) -> dict | None:
    """What ``write_data_cursors`` wrote (None when the checkpoint has no such file); ``ValueError`` naming the file
    when it does not read back (cut short, edited, or not one)."""
    path = folder / DATA_CURSORS.format(rank=rank)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        digest = saved.pop("sha256", None)
        if digest != _cursor_digest(saved):
            raise ValueError("its checksum does not match its content")
        saved["cursors"] = {int(slot): state for slot, state in saved["cursors"].items()}
        for key in ("epoch", "batch", "workers", "world_size"):
            int(saved[key])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} does not read ({type(exc).__name__}: {exc})") from None
    return saved


def _cursor_digest(saved: dict) -> str:
    return hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()


SHAPE_SECTIONS = ("model", "adapter", "dasd", "dm_adapter")  # config sections that can shape trainable tensors
NOT_SHAPES = {"adapter.ep_size", "adapter.capacity_factor", "dasd.stage", "dasd.stages", "dasd.cla", "dasd.cma",
              "dasd.english", "dasd.consistency_weight", "dasd.adversarial_weight", "dasd.discriminator_lr",
              "dasd.fresh_discriminator", "dasd.logit_scale", "dm_adapter.image_scale", "dm_adapter.text_scale", "dm_adapter.logit_scale",
              "dm_adapter.lb_weight", "dm_adapter.caption_corruption"}


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def shape_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for the config values that shape the trainable tensors and differ."""
    before = {k: v for s in SHAPE_SECTIONS for k, v in _flatten(saved.get(s, {}), s).items() if k not in NOT_SHAPES}
    after = {k: v for s in SHAPE_SECTIONS for k, v in _flatten(current.get(s, {}), s).items() if k not in NOT_SHAPES}
    return [f"{k}: {before.get(k)!r} in the checkpoint, {after.get(k)!r} here" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]


def mismatch_message(root: Path, tag: str, current: dict, error: BaseException) -> str | None:
    """A one-line explanation when loading ``root/tag`` failed because its tensors do not fit this model (wrong
    sizes, missing expert files), else None."""
    text = str(error)
    sizes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
    missing_expert = isinstance(error, FileNotFoundError) and "_expert_" in text
    if not sizes and not missing_expert:
        return None
    what = "; ".join(f"{name}: {a} saved, {b} here" for name, a, b in sizes[:3]) if sizes else \
        f"an expert file is missing ({Path(getattr(error, 'filename', None) or text).name})"
    differences = shape_differences(read_marker(root, tag).get("config", {}), current)
    why = f" The run was trained with other values of {'; '.join(differences)}." if differences else ""
    return f"the checkpoint {root / tag} does not fit the model of this config ({what}).{why}"
