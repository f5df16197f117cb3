"""Saving and restoring a run's whole state: the DeepSpeed engine's files, the client state (the loop's progress, the
method's own state, the unusable samples found), each rank's data cursors, and the COMPLETE marker that says what
the checkpoint is (config, layout, the code that wrote it). The trainer asks for a save or a restore; what a
checkpoint folder holds and how it is named is decided here and in ``folder``.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from dsmoe.checkpoint import elastic, folder, safe_io
from dsmoe.config import RunConfig, to_dict
from dsmoe.failures import RunError
from dsmoe.schema import ConfigError

REPLAY = "the epoch's order is replayed up to there"


@dataclass
class Restored:
    """What a resumed run continues from."""

    path: Path  # the checkpoint folder
    client: dict  # the loop's state as ``CheckpointManager.save`` was given it
    data_cursors: dict[int, dict | None]  # this rank's saved stream places that fit this run (else none: replay)
    data_note: str  # what the resume line says about the data stream


class CheckpointManager:
    """The checkpoints of the run in ``cfg.train.output_dir`` (``<output_dir>/checkpoints``), for ``engine`` on
    ``rank`` of ``world_size`` with experts over ``ep_size`` ranks. ``facts``: the run's provenance (rank 0's)."""

    def __init__(self, engine, cfg: RunConfig, rank: int, world_size: int, ep_size: int, facts: dict):
        self.engine, self.cfg, self.rank = engine, cfg, rank
        self.world_size, self.ep_size, self.facts = world_size, ep_size, facts
        self.root = Path(cfg.train.output_dir) / "checkpoints"

    def latest(self) -> str | None:
        return folder.complete_tag(self.root)

    def remove_staging(self) -> None:
        """Staging folders left by a run that died while saving (rank 0, before anything is saved)."""
        if self.rank == 0:
            folder.remove_staging(self.root)

    # -- saving --------------------------------------------------------------------------------------------------

    def save(self, tag: str, client: dict, data_cursors: dict[int, dict | None]) -> None:
        """Save on every rank into a staging folder; when every rank has written its files, mark it complete, give
        it its name and move the ``latest`` pointer. A failed write removes the staging folder. ``client`` holds
        ``progress`` (with ``epoch`` and ``batch``) and whatever else the loop restores."""
        progress = client["progress"]
        staging = folder.STAGING_PREFIX + tag
        try:
            self.engine.save_checkpoint(str(self.root), staging, client_state=client, save_latest=False,
                                        exclude_frozen_parameters=True)
            if self.cfg.train.elastic_state:
                elastic.save_state(self.root / staging, self.engine, self.rank)
            cursors = json.loads(json.dumps(  # a cursor's int arrays as lists
                {"epoch": progress["epoch"], "batch": progress["batch"], "workers": self.cfg.data.workers,
                 "world_size": self.world_size, "cursors": data_cursors}, default=list))
            folder.write_data_cursors(self.root / staging, self.rank, cursors)
        except BaseException:
            if not (self.root / staging).exists():  # another rank failed first and removed it: its error is the
                time.sleep(1.0)  # cause, this one (a vanished folder) the consequence; let the cause be reported
            shutil.rmtree(self.root / staging, ignore_errors=True)
            raise
        dist.barrier()
        if self.rank == 0:
            marker = {"time": time.time(), "progress": progress, "global_step": self.engine.global_steps,
                      "world_size": self.world_size, "ep_size": self.ep_size, "config": to_dict(self.cfg),
                      "run": self.facts}
            folder.publish(self.root, staging, tag, json.dumps(marker))
            folder.prune(self.root, self.cfg.train.keep_checkpoints)
        dist.barrier()

    def mark_best(self, tag: str) -> None:
        if self.rank == 0:
            folder.write_pointer(self.root, "best", tag)
            folder.prune(self.root, self.cfg.train.keep_checkpoints)
        dist.barrier()

    # -- restoring ----------------------------------------------------------------------------------------------

    def restore(self, spec: str | None, allow_config_change: bool, say: Callable[[str], None]) -> Restored | None:
        """Load what ``folder.resume_point(spec)`` names (None when there is nothing to continue from): weights,
        optimiser state and schedule where the layout is the same (else the weights, resharded, with a warning),
        the client state and this rank's data cursors. Settings that change what is trained must be those the
        checkpoint was trained with unless ``allow_config_change``; ``say`` reports on rank 0."""
        point = folder.resume_point(spec, self.root)
        if point is None:
            if spec == "auto":
                say("resume auto: no complete checkpoint yet, starting fresh")
            return None
        root, tag = point
        marker = folder.read_marker(root, tag)
        changes = folder.config_changes(marker["config"], to_dict(self.cfg)) if "config" in marker else []
        if changes and not allow_config_change:
            raise ConfigError(f"{root / tag} was trained with other settings:\n  " + "\n  ".join(changes)
                              + "\nresume with --allow-config-change to continue with the new ones, or start a "
                                "new run (another train.output_dir)")
        if changes:
            say("WARNING: continuing with changed settings:\n  " + "\n  ".join(changes))
        layout = {"world_size": self.world_size, "ep_size": self.ep_size}
        saved = {k: marker.get(k, layout[k]) for k in layout}
        same = saved == layout
        _, client = safe_io.load_checkpoint(self.engine, root, tag, self.cfg, load_optimizer_states=same)
        if client is None or "progress" not in client:
            raise RunError(f"checkpoint {root / tag} could not be loaded or has no training progress")
        if not same:
            if elastic.has_state(root / tag) and elastic.supported(self.engine):
                kept = f"the optimiser state too ({elastic.restore_state(root / tag, self.engine)})"
            else:
                kept = "the optimiser state restarts (the checkpoint has no optimizer_state folder, or this run's " \
                       "optimiser keeps its state in a layout dsmoe.checkpoint.elastic does not know)"
            say(f"WARNING: {root / tag} was saved with {saved}, this run has {layout}: loaded the weights (experts "
                f"resharded), the progress and learning-rate schedule, and {kept}; the data stream replays in this "
                f"layout's order")
        cursors, note = self._data_cursors(root / tag, client["progress"], same, say)
        return Restored(root / tag, client, cursors, note)

    def _data_cursors(self, path: Path, progress: dict, same_layout: bool,
                      say: Callable[[str], None]) -> tuple[dict[int, dict | None], str]:
        """This rank's saved stream places where they fit this run (else none: the epoch's order is replayed up to
        the saved batch), and what that means for the log."""
        if not progress["batch"]:
            return {}, ""
        try:
            saved = folder.read_data_cursors(path, self.rank)
        except ValueError as exc:
            print(f"[dsmoe] rank {self.rank}: WARNING: {exc}; {REPLAY} instead", file=sys.stderr, flush=True)
            return {}, f"; {REPLAY}"
        if saved is None:
            return {}, f"; no saved data stream places: {REPLAY}"
        if not same_layout:
            return {}, ""  # said already: the data order changes
        workers = self.cfg.data.workers
        if saved["workers"] != workers:
            say(f"WARNING: data.workers was {saved['workers']} in {path}, is {workers} here: the data order changes "
                f"from here (the rest of epoch {progress['epoch']} is taken in the order of {workers} workers per "
                f"rank: some of its pairs may be seen twice, others not at all)")
            return {}, "; data order changed (data.workers)"
        if (saved["epoch"], saved["batch"]) != (progress["epoch"], progress["batch"]):
            return {}, f"; its data stream places are of another batch: {REPLAY}"
        places = sum(state is not None for state in saved["cursors"].values())
        if not places:
            return {}, f"; no usable data stream places: {REPLAY}"
        return saved["cursors"], f"; the data continues from {places} saved stream places"

    def load_weights(self, path: str | Path) -> tuple[Path, dict]:
        """Another run's trainable weights (DASD's CMA from its CLA run, ``train.init_from``), optimiser state and
        schedule fresh; returns the checkpoint folder read and that run's method state (for
        ``Method.load_initial_state``)."""
        if folder.is_portable(path):
            raise AssertionError("portable files are loaded before deepspeed.initialize (Trainer portable_init)")
        root, tag = folder.resolve_checkpoint(path)
        _, client = safe_io.load_checkpoint(self.engine, root, tag, self.cfg, load_optimizer_states=False,
                                            load_lr_scheduler_states=False, load_module_only=True)
        return root / tag, (client or {}).get("method", {})

    def load_selected(self, tag: str) -> None:
        """The weights of this run's checkpoint ``tag`` (the best on validation) for the final test."""
        safe_io.load_checkpoint(self.engine, self.root, tag, self.cfg, load_optimizer_states=False,
                                load_lr_scheduler_states=False)
