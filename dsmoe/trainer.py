"""The training loop: step, log, evaluate, checkpoint, resume, stop for preemption, and the final test."""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from dsmoe.checkpoint.manager import CheckpointManager
from dsmoe.config import RunConfig, to_dict
from dsmoe.data.bad_samples import FaultLog, bad_sample_limit, summarize
from dsmoe.data.pipeline import TrainStreamConfig, batches_per_epoch, train_loader
from dsmoe.data.transforms import normalize
from dsmoe.distributed import flag_tensor
from dsmoe.engine import build_training_engine, device_for, expert_parallel_size
from dsmoe.evaluator import EvaluationStopped, Evaluator, format_results
from dsmoe.failures import RunError
from dsmoe.files import write_atomic
from dsmoe.methods.registry import get_method
from dsmoe.methods.base import Method
from dsmoe.moe.routing_counts import RoutingCounts
from dsmoe.optim import lr_schedule, whole_model_trainable
from dsmoe.preemption import REQUEUE, STOP, PreemptionWatch
from dsmoe.provenance import run_facts
from dsmoe.run_log import Pace, RunLogger, peak_memory, step_line
from dsmoe.data.format import read_split

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
        self.ds_config = ds_config
        self.method: Method = get_method(cfg)
        self.steps_per_epoch = batches_per_epoch(cfg.data.shards, cfg.data.train_split, cfg.train.batch_size,
                                                 self.method.train_languages(), cfg.data.remote)
        self.micro_batches_per_epoch = self.steps_per_epoch * cfg.train.grad_accum
        total_steps = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total_steps, cfg.train.max_steps or total_steps)
        built = build_training_engine(cfg, self.method.build(), ds_config,
                                      lr_schedule(cfg.optim, self.steps_per_epoch, total_steps), portable_init)
        self.engine, self.optimizer, self.scheduler = built.engine, built.optimizer, built.scheduler
        self.model, self.dtype = built.model, built.dtype
        self.ep_size = expert_parallel_size(cfg)
        self.trainable_count = whole_model_trainable(self.model, self.ep_size)
        self.trainable_on_rank = built.trainable_parameters
        self.checkpoints = CheckpointManager(self.engine, cfg, rank, world_size, self.ep_size, self.facts)
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
        self.checkpoints.remove_staging()

    def resume(self, spec: str | None) -> bool:
        """Continue from the checkpoint ``spec`` names (``dsmoe.checkpoint.folder.resume_point``); False when there
        is nothing to continue from."""
        restored = self.checkpoints.restore(spec, self.allow_config_change, self.log.info)
        if restored is None:
            return False
        client = restored.client
        self.progress = Progress(**client["progress"])
        self.method.load_state_dict(client.get("method", {}))
        self.faults.load_state_dict(client.get("bad_samples", []))
        self.data_cursors = restored.data_cursors
        self.log.info(f"resumed from {restored.path}: epoch {self.progress.epoch}, batch {self.progress.batch}, "
                      f"step {self.engine.global_steps}{restored.data_note}")
        dropped = self.log.cut_after(self.engine.global_steps)
        if dropped:
            self.log.info(f"metrics.jsonl: dropped {dropped} records logged after step {self.engine.global_steps} "
                          f"by the interrupted run (they are logged again from there)")
        return True

    def init_from(self, path: str) -> None:
        """Start from another run's trainable weights (e.g. DASD's CMA from its CLA run); optimiser state fresh."""
        source, method_state = self.checkpoints.load_weights(path)
        carried = self.method.load_initial_state(method_state)
        self.started_from = str(source)
        self.log.info(f"initialised the trainable weights{f' and {carried}' if carried else ''} from {source}")

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save(self, tag: str) -> None:
        """A checkpoint of the whole run at ``tag`` (every rank; ``dsmoe.checkpoint.manager``)."""
        self._merge_faults()
        client = {"progress": self.progress.__dict__, "global_step": self.engine.global_steps,
                  "method": self.method.state_dict(), "bad_samples": self.faults.state_dict()}
        self.checkpoints.save(tag, client, self.data_cursors)

    # -- the loop -----------------------------------------------------------------------------------------------

    def stream_config(self) -> TrainStreamConfig:
        cfg = self.cfg
        return TrainStreamConfig(
            shard_dir=cfg.data.shards, split=cfg.data.train_split, image_size=cfg.model.image_size,
            micro_batch=cfg.micro_batch(self.world_size), batches_per_epoch=self.micro_batches_per_epoch,
            rank=self.rank, world_size=self.world_size, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            augment=cfg.data.augment, erasing_p=cfg.data.random_erasing, image_fit=cfg.data.image_fit,
            load_images=self.method.load_images,
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
            elif self.checkpoints.latest() != f"step{self.engine.global_steps:08d}":
                self.save(f"step{self.engine.global_steps:08d}")
        bar.close()
        return self.finish()

    def stop_for_preemption(self, request: int, save: bool = True) -> dict:
        """Save where we are (every rank; ``save`` False: the latest checkpoint already holds it), then requeue the
        Slurm job if the warning signal asked for it; after SIGTERM or SIGINT the outcome carries the exit code the
        process should end with."""
        tag = f"step{self.engine.global_steps:08d}"
        if save and self.checkpoints.latest() != tag:
            self.save(tag)
        tag = self.checkpoints.latest()
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
            self.checkpoints.mark_best(tag)

    def finish(self) -> dict:
        """Test the selected model (best on val, else the last) and write results.json."""
        cfg, prog = self.cfg, self.progress
        step = self.engine.global_steps  # the run's last step (loading the best checkpoint moves the engine's)
        selection = "last step (no validation split)" if not cfg.data.val_split else "last step (not validated)"
        if cfg.data.val_split and prog.best_tag:
            selection = f"best validation {self.method.selection_metric} ({prog.best_tag})"
            if prog.best_tag != self.checkpoints.latest():
                self.checkpoints.load_selected(prog.best_tag)
        test = self.evaluate(cfg.data.test_split)
        results = {"model_selection": selection, "zero_shot": prog.zero_shot, "test": test,
                   "start_label": "untrained" if not self.started_from else "at start",
                   "validation": prog.history, "trained": self.method.describe(),
                   "trainable_parameters": self.trainable_count,
                   "world_size": self.world_size, "ep_size": cfg.adapter.ep_size, "run": self.facts,
                   "config": to_dict(cfg)}
        self.log.metrics({"event": "test", "split": cfg.data.test_split, "step": step, **test})
        self.method.on_finish(self.model, self.run_dir, self.rank)
        if self.rank == 0:
            write_atomic(self.run_dir / "results.json", json.dumps(results, indent=2))
            self.log.info(format_results(results, self.method.report_metrics, self.run_dir))
        self.log.close()
        return results


