"""The training loop: step, log, evaluate, checkpoint, resume, stop for preemption, and the final test."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from dsmoe import checkpoint as checkpoints
from dsmoe import checkpoint_engine
from dsmoe.checkpoint import complete_tag, is_portable, resolve_checkpoint
from dsmoe.config import ConfigError, RunConfig, to_dict
from dsmoe.data.faults import FaultLog, bad_sample_limit, summarize
from dsmoe.data.pipeline import TrainStreamConfig, batches_per_epoch, train_loader
from dsmoe.data.transforms import normalize
from dsmoe.distributed import flag_tensor
from dsmoe.engine import build_training_engine, device_for, expert_parallel_size
from dsmoe.evaluation import EvaluationStopped, Evaluator, format_results
from dsmoe.faults import RunError
from dsmoe.files import write_atomic
from dsmoe.methods import get_method
from dsmoe.methods.base import Method
from dsmoe.moe.routing_counts import RoutingCounts
from dsmoe.optim import warmup_steps, whole_model_trainable
from dsmoe.preemption import REQUEUE, STOP, PreemptionWatch
from dsmoe.provenance import config_changes, run_facts
from dsmoe.run_log import Pace, RunLogger, peak_memory, step_line
from dsmoe.shards.format import read_split

DATA_CURSORS = "data_cursors_rank{rank}.json"
"""Each rank's file in a checkpoint folder: where each of its data slots' streams is (``dsmoe.data.slot_stream``)."""


def _cursor_digest(cursors: dict) -> str:
    """The checksum a data cursor file carries: a file cut short or edited by hand is not read as a place."""
    return hashlib.sha256(json.dumps(cursors, sort_keys=True).encode()).hexdigest()


@dataclass
class Progress:
    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` already taken by each rank
    best_score: float = -1.0
    best_tag: str | None = None
    zero_shot: dict | None = None
    history: list = field(default_factory=list)
    pending_val: bool = False  # the epoch's validation was stopped by a signal: the resumed run does it first


class Trainer:
    """One run of a method on ``rank`` of ``world_size``, with ``ds_config`` composed for it (``dsmoe.ds_config``).

    ``portable_init``: exported adapters to start from (loaded before the engine starts); other starting weights
    (``train.init_from`` naming a run or checkpoint) are loaded by ``init_from`` after it.
    """

    def __init__(self, cfg: RunConfig, ds_config: dict, rank: int, world_size: int, local_rank: int,
                 portable_init: str | None = None, allow_config_change: bool = False):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.allow_config_change = allow_config_change
        self.facts = run_facts(world_size) if rank == 0 else {}  # rank 0 writes the markers and results.json
        self.device = device_for(local_rank)
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.ds_config = ds_config
        self.method: Method = get_method(cfg)
        self.steps_per_epoch = batches_per_epoch(cfg.data.shards, cfg.data.train_split, cfg.train.batch_size,
                                                 self.method.train_languages(), cfg.data.remote)
        self.micro_batches_per_epoch = self.steps_per_epoch * cfg.train.grad_accum
        total_steps = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total_steps, cfg.train.max_steps or total_steps)
        built = build_training_engine(cfg, self.method.build(), ds_config, total_steps,
                                      warmup_steps(cfg.optim, self.steps_per_epoch, total_steps), portable_init)
        self.engine, self.optimizer, self.scheduler = built.engine, built.optimizer, built.scheduler
        self.model, self.dtype = built.model, built.dtype
        self.ep_size = expert_parallel_size(cfg)
        self.trainable_count = whole_model_trainable(self.model, self.ep_size)
        self.trainable_on_rank = built.trainable_parameters
        self.evaluator = Evaluator(cfg, self.engine, self.device, stop_request=lambda: self.preemption.state)
        self.progress = Progress()
        self.started_from = portable_init
        self.log = RunLogger(self.run_dir, rank, cfg)
        self.preemption = PreemptionWatch()
        self.routing = RoutingCounts()
        if portable_init:
            self.log.info(f"initialised the trainable weights from {portable_init} (exported adapters: all "
                          f"{self.trainable_count:,} trainable parameters)")
        train = read_split(cfg.data.shards, cfg.data.train_split, reads=cfg.data.remote)
        self.faults = FaultLog(cfg.data.train_split, train.samples,
                               bad_sample_limit(cfg.data.max_bad_share, cfg.data.max_bad_count, train.samples))
        self.data_cursors: dict[int, dict | None] = {}  # slot -> its stream's place after its last batch taken

    def evaluate(self, split: str) -> dict[str, float]:
        metrics = self.evaluator.evaluate(self.method, split)
        incomplete = self.evaluator.completeness(split)
        if incomplete:
            self.log.info(f"WARNING: split '{split}' was scored without {incomplete['incomplete']['missing_samples']} "
                          f"unusable samples; its scores are not comparable with the full split's:\n  "
                          + "\n  ".join(incomplete["incomplete"]["reasons"]))
        return {**metrics, **incomplete}

    # -- set-up -------------------------------------------------------------------------------------------------

    def write_run_files(self) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            write_atomic(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))
            checkpoints.remove_staging(self.ckpt_root)

    def resume(self, spec: str | None) -> bool:
        """Continue from ``checkpoints.resume_point(spec)``; False when there is nothing to continue from."""
        point = checkpoints.resume_point(spec, self.ckpt_root)
        if point is None:
            if spec == "auto":
                self.log.info("resume auto: no complete checkpoint yet, starting fresh")
            return False
        root, tag = point
        marker = checkpoints.read_marker(root, tag)
        changes = config_changes(marker["config"], to_dict(self.cfg)) if "config" in marker else []
        if changes and not self.allow_config_change:
            raise ConfigError(f"{root / tag} was trained with other settings:\n  " + "\n  ".join(changes)
                              + "\nresume with --allow-config-change to continue with the new ones, or start a "
                                "new run (another train.output_dir)")
        if changes:
            self.log.info("WARNING: continuing with changed settings:\n  " + "\n  ".join(changes))
        layout = {"world_size": self.world_size, "ep_size": self.ep_size}
        saved = {k: marker.get(k, layout[k]) for k in layout}
        same = saved == layout
        if not same:
            self.log.info(f"WARNING: {root / tag} was saved with {saved}, this run has {layout}: loading the weights "
                          f"(experts resharded) and progress; the optimiser state restarts and the data order changes")
        _, client = checkpoint_engine.load_checkpoint(self.engine, root, tag, self.cfg, load_optimizer_states=same)
        if client is None or "progress" not in client:
            raise RunError(f"checkpoint {root / tag} could not be loaded or has no training progress")
        self.progress = Progress(**client["progress"])
        self.method.load_state_dict(client.get("method", {}))
        self.faults.load_state_dict(client.get("bad_samples", []))
        self.data_cursors, data = self._read_data_cursors(root / tag, same)
        self.log.info(f"resumed from {root / tag}: epoch {self.progress.epoch}, batch {self.progress.batch}, "
                      f"step {self.engine.global_steps}{data}")
        dropped = self.log.cut_after(self.engine.global_steps)
        if dropped:
            self.log.info(f"metrics.jsonl: dropped {dropped} records logged after step {self.engine.global_steps} "
                          f"by the interrupted run (they are logged again from there)")
        return True

    def _read_data_cursors(self, folder: Path, same_layout: bool) -> tuple[dict[int, dict | None], str]:
        """This rank's saved stream places where they fit this run (else none: the epoch's order is replayed up to
        the saved batch), and what that means for the log."""
        prog = self.progress
        if not prog.batch:
            return {}, ""
        replay = "the epoch's order is replayed up to there"
        path = folder / DATA_CURSORS.format(rank=self.rank)
        if not path.exists():
            return {}, f"; no saved data stream places: {replay}"
        try:
            saved = json.loads(path.read_text())
            digest = saved.pop("sha256", None)
            if digest != _cursor_digest(saved):
                raise ValueError("its checksum does not match its content")
            cursors = {int(slot): state for slot, state in saved["cursors"].items()}
            at = (saved["epoch"], saved["batch"], saved["workers"], saved["world_size"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"[dsmoe] rank {self.rank}: WARNING: {path} does not read ({type(exc).__name__}: {exc}); {replay} "
                  f"instead", file=sys.stderr, flush=True)
            return {}, f"; {replay}"
        if not same_layout:
            return {}, ""  # said above: the data order changes
        if at[2] != self.cfg.data.workers:
            self.log.info(f"WARNING: data.workers was {at[2]} in {folder}, is {self.cfg.data.workers} here: the data "
                          f"order changes from here (the rest of epoch {prog.epoch} is taken in the order of "
                          f"{self.cfg.data.workers} workers per rank: some of its pairs may be seen twice, others "
                          f"not at all)")
            return {}, "; data order changed (data.workers)"
        if at[:2] != (prog.epoch, prog.batch):
            return {}, f"; its data stream places are of another batch: {replay}"
        places = sum(state is not None for state in cursors.values())
        if not places:
            return {}, f"; no usable data stream places: {replay}"
        return cursors, f"; the data continues from {places} saved stream places"
    def init_from(self, path: str) -> None:
        """Start from another run's trainable weights (e.g. DASD's CMA from its CLA run); optimiser state fresh."""
        if is_portable(path):
            raise AssertionError("portable files are loaded before deepspeed.initialize (Trainer portable_init)")
        root, tag = resolve_checkpoint(path)
        checkpoint_engine.load_checkpoint(self.engine, root, tag, self.cfg, load_optimizer_states=False,
                                          load_lr_scheduler_states=False, load_module_only=True)
        self.started_from = str(root / tag)
        self.log.info(f"initialised the trainable weights from {root / tag}")

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save(self, tag: str) -> None:
        """Save on every rank into a staging folder; when every rank has written its files, mark it complete, give
        it its name and move the ``latest`` pointer. A failed write removes the staging folder."""
        self._merge_faults()
        state = {"progress": self.progress.__dict__, "global_step": self.engine.global_steps,
                 "method": self.method.state_dict(), "bad_samples": self.faults.state_dict()}
        staging = checkpoints.STAGING_PREFIX + tag
        try:
            self.engine.save_checkpoint(str(self.ckpt_root), staging, client_state=state, save_latest=False,
                                        exclude_frozen_parameters=True)
            cursors = json.loads(json.dumps(  # a cursor's int arrays as lists
                {"epoch": self.progress.epoch, "batch": self.progress.batch, "workers": self.cfg.data.workers,
                 "world_size": self.world_size, "cursors": self.data_cursors}, default=list))
            (self.ckpt_root / staging / DATA_CURSORS.format(rank=self.rank)).write_text(
                json.dumps({**cursors, "sha256": _cursor_digest(cursors)}))
        except BaseException:
            shutil.rmtree(self.ckpt_root / staging, ignore_errors=True)
            raise
        dist.barrier()
        if self.rank == 0:
            marker = {"time": time.time(), "progress": self.progress.__dict__, "global_step": self.engine.global_steps,
                      "world_size": self.world_size, "ep_size": self.ep_size, "config": to_dict(self.cfg),
                      "run": self.facts}
            checkpoints.publish(self.ckpt_root, staging, tag, json.dumps(marker))
            checkpoints.prune(self.ckpt_root, self.cfg.train.keep_checkpoints)
        dist.barrier()

    def mark_best(self, tag: str) -> None:
        if self.rank == 0:
            checkpoints.write_pointer(self.ckpt_root, "best", tag)
            checkpoints.prune(self.ckpt_root, self.cfg.train.keep_checkpoints)
        dist.barrier()

    # -- the loop -----------------------------------------------------------------------------------------------

    def stream_config(self) -> TrainStreamConfig:
        cfg = self.cfg
        return TrainStreamConfig(
            shard_dir=cfg.data.shards, split=cfg.data.train_split, image_size=cfg.model.image_size,
            micro_batch=cfg.micro_batch(self.world_size), batches_per_epoch=self.micro_batches_per_epoch,
            rank=self.rank, world_size=self.world_size, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            augment=cfg.data.augment, erasing_p=cfg.data.random_erasing, load_images=self.method.load_images,
            reads=cfg.data.remote, checksums=cfg.data.checksums)

    def train(self) -> dict:
        """Train to the end and test; a stop or requeue signal saves where the run is and ends it early (the
        outcome says how: ``dsmoe.train.run``)."""
        try:
            return self._train()
        except EvaluationStopped as stopped:  # nothing was trained since the last save (a validation saved it)
            return self.stop_for_preemption(stopped.request, save=False)

    def _train(self) -> dict:
        cfg, prog = self.cfg, self.progress
        held = ("" if self.ep_size == 1 else
                f" (each rank holds {self.trainable_on_rank:,}: 1/{self.ep_size} of the experts)")
        self.log.info(f"trainable parameters: {self.trainable_count:,}{held}; {self.steps_per_epoch} steps per epoch; "
                      f"world size {self.world_size}, ep_size {cfg.adapter.ep_size}, ds config zero stage "
                      f"{self.ds_config.get('zero_optimization', {}).get('stage', 0)}, dtype {self.dtype}, "
                      f"{torch.get_num_threads()} CPU threads per rank")
        if cfg.train.eval_zero_shot and prog.zero_shot is None:
            prog.zero_shot = self.evaluate(cfg.data.test_split)
            self.log.metrics({"event": "zero_shot", "split": cfg.data.test_split, "step": self.engine.global_steps,
                              **prog.zero_shot})
        if prog.pending_val:
            self._validate_and_save()
        stream = self.stream_config()
        stopped = False
        total = self.total_steps
        pace = Pace(cfg.train.batch_size, total)
        bar = self.log.progress(total=total, initial=self.engine.global_steps, desc="training")
        while prog.epoch < cfg.train.epochs and not stopped:
            loader = train_loader(stream, self.method.train_texts(), prog.epoch, prog.batch, cfg.data.workers,
                                  self.faults.known_bad(), dict(self.data_cursors))
            waiting = time.perf_counter()
            for batch in loader:
                arrived = time.perf_counter()
                self.faults.add(batch.pop("faults"))
                cursor = batch.pop("cursor")
                self.data_cursors[cursor.slot] = cursor.state
                if "image" in batch:  # uint8 from the reader: normalised (and erased) here, on the device
                    batch["image"] = normalize(batch.pop("image"), batch.pop("erase"), device=self.device,
                                               dtype=self.dtype)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out = self.engine(batch)
                self.routing.add(self.model.expert_counts())
                self.method.backward(self.engine, out)
                self.engine.step()
                prog.batch += 1
                step = self.engine.global_steps
                boundary = prog.batch % cfg.train.grad_accum == 0
                pace.add(arrived - waiting, time.perf_counter() - arrived, int(boundary))
                if boundary:
                    bar.update(1)
                    request, bad_samples = self._agree()
                    self._check_faults(bad_samples, log_now=step % cfg.train.log_every == 0)
                if boundary and step % cfg.train.log_every == 0:
                    self._log_step(out, step, bad_samples, pace.figures(step), bar)
                if boundary and cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self.save(f"step{step:08d}")
                if boundary and request:
                    bar.close()
                    return self.stop_for_preemption(request)
                if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
                    stopped = True
                    break
                waiting = time.perf_counter()  # logging and saving are not waiting for data
            if not stopped:
                prog.epoch, prog.batch = prog.epoch + 1, 0
                self.data_cursors = {}
                self._end_of_epoch()
            elif complete_tag(self.ckpt_root) != f"step{self.engine.global_steps:08d}":
                self.save(f"step{self.engine.global_steps:08d}")
        bar.close()
        return self.finish()

    def stop_for_preemption(self, request: int, save: bool = True) -> dict:
        """Save where we are (every rank; ``save`` False: the latest checkpoint already holds it), then requeue the
        Slurm job if the warning signal asked for it; after SIGTERM or SIGINT the outcome carries the exit code the
        process should end with."""
        tag = f"step{self.engine.global_steps:08d}"
        if save and complete_tag(self.ckpt_root) != tag:
            self.save(tag)
        tag = complete_tag(self.ckpt_root)
        kept = f"saved {tag}" if save else f"the latest checkpoint is {tag or 'none yet'}"
        step = self.engine.global_steps
        if request == REQUEUE and self.rank == 0:
            # log first: the requeue starts ending this job at once
            outcome = f"requeue requested for Slurm job {os.environ.get('SLURM_JOB_ID', '(not under Slurm)')}"
            self.log.metrics({"event": "preempted", "step": step, "outcome": outcome})
            self.log.info(f"preempted at step {step}: {kept}; {self.preemption.requeue()}")
        outcome = {"preempted": True, "checkpoint": tag}
        if request != REQUEUE:
            name = signal.Signals(self.preemption.stop_signal or signal.SIGTERM).name
            if self.rank == 0:
                self.log.metrics({"event": "preempted", "step": step, "outcome": f"stopped on {name}"})
                self.log.info(f"stopped on {name} at step {step}: {kept}; `--resume auto` continues from it")
            outcome["exit_code"] = self.preemption.exit_code()
        self.log.close()
        return outcome

    def _agree(self) -> tuple[int, int]:
        """The loop's one collective per optimiser step: (the strongest preemption request any rank received, the
        number of distinct unusable training samples found by all ranks)."""
        state = self.preemption.state
        flags = flag_tensor(int(state == STOP), int(state == REQUEUE), len(self.faults.found))
        if dist.is_initialized():
            dist.all_reduce(flags)
        stop, requeue, found = flags.tolist()
        return (REQUEUE if requeue else STOP if stop else 0), len(self.faults.known) + found

    def _check_faults(self, total: int, log_now: bool) -> None:
        """Report newly found unusable samples at log steps; stop every rank once there are too many."""
        over = self.faults.over_limit(total)
        if total > len(self.faults.known) and (log_now or over):
            self._merge_faults()
        if over:
            raise RunError(self.faults.limit_message(total))

    def _merge_faults(self) -> None:
        """Every rank learns what the others found (a collective); rank 0 reports the new ones."""
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, self.faults.found)
        new = self.faults.merge(gathered)
        if new:
            total, limit = len(self.faults.known), self.faults.limit
            self.log.info(f"skipped {len(new)} unusable training samples ({total} so far, the run stops past "
                          f"{limit}):\n  " + "\n  ".join(summarize(new)))
            self.log.metrics({"event": "bad_samples", "split": self.faults.split, "step": self.engine.global_steps,
                              "new": len(new), "total": total, "limit": limit, "reasons": summarize(new)})

    def _log_step(self, out: dict, step: int, bad_samples: int, pace: dict, bar) -> None:
        scalars, lr = self.method.scalars(out), self.scheduler.get_last_lr()[0]
        record = {"step": step, "epoch": self.progress.epoch, **scalars, "lr": lr,
                  "samples_per_s": round(pace["samples_per_s"], 3), "step_s": round(pace["step_s"], 4),
                  "data_wait": round(pace["data_wait"], 4)}
        if bad_samples:
            record["bad_samples"] = bad_samples
        if self.engine.fp16_enabled():  # dynamic loss scaling: steps with inf/nan gradients are skipped
            record.update(loss_scale=float(self.optimizer.loss_scale), skipped_steps=self.engine.skipped_steps)
        self.log.metrics(record, routing=self.routing.take())
        if "loss" in scalars:
            bar.set_postfix_str(f"loss {scalars['loss']:.4f}")
        self.log.step_line(step_line(step, self.total_steps, self.progress.epoch, self.cfg.train.epochs, scalars,
                                     lr, pace, peak_memory(self.device)))

    def _end_of_epoch(self) -> None:
        cfg, prog = self.cfg, self.progress
        due = prog.epoch % cfg.train.eval_every == 0 or prog.epoch == cfg.train.epochs
        prog.pending_val = bool(cfg.data.val_split) and due
        self._validate_and_save()

    def _validate_and_save(self) -> None:
        """Validate (when due), checkpoint and mark the best. A signal during the validation saves the checkpoint
        with the validation still due, then ends the run (``EvaluationStopped``)."""
        cfg, prog = self.cfg, self.progress
        tag = f"step{self.engine.global_steps:08d}"
        if prog.pending_val:
            try:
                val = self.evaluate(cfg.data.val_split)
            except EvaluationStopped:
                self.save(tag)
                raise
            prog.pending_val = False
            prog.history.append({"epoch": prog.epoch, "step": self.engine.global_steps, **val})
            self.log.metrics({"event": "val", "split": cfg.data.val_split, "epoch": prog.epoch,
                              "step": self.engine.global_steps, **val})
            score = val[self.method.selection_metric]
            if score > prog.best_score:
                prog.best_score, prog.best_tag = score, tag
        self.save(tag)
        if cfg.data.val_split and prog.best_tag == tag:
            self.mark_best(tag)

    def finish(self) -> dict:
        """Test the selected model (best on val, else the last) and write results.json."""
        cfg, prog = self.cfg, self.progress
        step = self.engine.global_steps  # the run's last step (loading the best checkpoint moves the engine's)
        selection = "last step (no validation split)" if not cfg.data.val_split else "last step (not validated)"
        if cfg.data.val_split and prog.best_tag:
            selection = f"best validation {self.method.selection_metric} ({prog.best_tag})"
            if prog.best_tag != complete_tag(self.ckpt_root, "latest"):
                checkpoint_engine.load_checkpoint(self.engine, self.ckpt_root, prog.best_tag, cfg,
                                                  load_optimizer_states=False, load_lr_scheduler_states=False)
        test = self.evaluate(cfg.data.test_split)
        results = {"model_selection": selection, "zero_shot": prog.zero_shot, "test": test,
                   "start_label": "untrained" if not self.started_from else "at start",
                   "validation": prog.history, "trainable_parameters": self.trainable_count,
                   "world_size": self.world_size, "ep_size": cfg.adapter.ep_size, "run": self.facts,
                   "config": to_dict(cfg)}
        self.log.metrics({"event": "test", "split": cfg.data.test_split, "step": step, **test})
        self.method.on_finish(self.model, self.run_dir, self.rank)
        if self.rank == 0:
            write_atomic(self.run_dir / "results.json", json.dumps(results, indent=2))
            self.log.info(format_results(results, self.method.report_metrics))
        self.log.close()
        return results


