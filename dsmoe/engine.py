"""The training loop around a DeepSpeed engine: step, log, evaluate, checkpoint, resume."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import deepspeed
import torch
import torch.distributed as dist
import yaml
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups

from dsmoe import checkpoint as checkpoint_io
from dsmoe import safe_checkpoint
from dsmoe.checkpoint import complete_tag, resolve_checkpoint, write_text_atomic
from dsmoe.config import DeviceSupport, RunConfig, compose_ds_config, resolve_precision, to_dict
from dsmoe.distributed import flag_tensor
from dsmoe.data.faults import FaultLog, SampleFault, bad_sample_limit, summarize
from dsmoe.data.pipeline import TrainStreamConfig, batches_per_epoch, eval_loader, train_loader
from dsmoe.shards.format import read_split
from dsmoe.faults import RunError
from dsmoe.methods.base import Method, get_method
from dsmoe.portable import is_portable, load_portable
from dsmoe.preemption import REQUEUE, STOP, PreemptionWatch
from dsmoe.run_log import RunLogger



# ---------------------------------------------------------------------------------------------------------------
# model and optimiser


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def param_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict]:
    """Weights with decay; biases, norms and scalars with lr x bias_lr_factor and no decay."""
    decay, no_decay = [], []
    for name, p in trainable_parameters(model).items():
        (no_decay if p.ndim < 2 else decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": cfg.optim.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": cfg.optim.lr * cfg.optim.bias_lr_factor},
    ]


def lr_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float) -> float:
    """Linear warm-up from ``start_factor`` to 1, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_expert_placement(ep_size: int) -> None:
    """Experts were initialised assuming DeepSpeed's consecutive-rank expert-parallel groups."""
    if ep_size <= 1:
        return
    group = groups._get_expert_parallel_group(f"ep_size_{ep_size}")
    assert dist.get_rank(group=group) == dist.get_rank() % ep_size, "unexpected expert-parallel rank layout"


def load_checkpoint(engine, root: Path, tag: str, cfg: RunConfig, **kwargs):
    """``engine.load_checkpoint`` (trainable tensors only); when the saved tensors do not fit the model, one error
    that names the config values the checkpoint was trained with."""
    try:
        return engine.load_checkpoint(str(root), tag, load_module_strict=False, **kwargs)
    except (RuntimeError, FileNotFoundError) as exc:
        message = checkpoint_io.mismatch_message(root, tag, to_dict(cfg), exc)
        if message is None:
            raise
        raise RunError(message) from None


@dataclass
class Progress:
    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` already taken by each rank
    best_score: float = -1.0
    best_tag: str | None = None
    zero_shot: dict | None = None
    history: list = field(default_factory=list)


def device_for(local_rank: int) -> torch.device:
    return torch.device(get_accelerator().device_name(local_rank)) if torch.cuda.is_available() \
        else torch.device("cpu")


def engine_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() \
        else torch.float32


class Evaluator:
    """Features of a split's images and captions with every rank in lockstep, gathered on all ranks."""

    def __init__(self, cfg: RunConfig, engine, device: torch.device):
        self.cfg, self.engine, self.device = cfg, engine, device
        self.model = engine.module
        self.dtype = engine_dtype(engine)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.missing: dict[str, dict[str, SampleFault]] = {}  # split -> unusable samples (every rank's)

    def _lockstep(self, batches: Iterable[dict], dummy: dict) -> Iterator[tuple[dict, bool]]:
        """Yield (batch, real) until every rank is done; a finished rank runs ``dummy`` so MoE collectives match."""
        iterator = iter(batches)
        while True:
            batch = next(iterator, None)
            flag = flag_tensor(0 if batch is None else 1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() == 0:
                return
            yield (batch, True) if batch is not None else (dummy, False)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}

    @torch.no_grad()
    def features(self, split: str, language: str, encode: Callable[[list[str]], dict],
                 text_forward: Callable[[dict], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(image features, image labels, caption features, caption labels) of every sample of ``split``.

        ``encode`` turns captions into a batch of tensors and ``text_forward`` that batch into features; each
        caption's label is its image's (person id, or image id for image-text data).
        """
        cfg = self.cfg
        self.engine.eval()
        h, w = cfg.model.image_size
        images, image_labels, captions, caption_labels = [], [], [], []
        loader = eval_loader(cfg.data.eval_shards or cfg.data.shards, split, cfg.model.image_size, self.rank,
                             self.world_size, cfg.train.eval_batch_size, cfg.data.workers, language)
        dummy_image = {"image": torch.zeros(1, 3, h, w), "pid": torch.zeros(1, dtype=torch.long), "captions": []}
        faults: list[SampleFault] = []
        for batch, real in self._lockstep(loader, dummy_image):
            if real:
                faults += batch["faults"]
                if batch["image"] is None:  # nothing usable in this batch: the dummy keeps MoE collectives matched
                    batch, real = dummy_image, False
            feats = self.model.encode_image(batch["image"].to(self.device, self.dtype)).float().cpu()
            if real:
                images.append(feats)
                image_labels.append(batch["pid"])
                for label, caps in zip(batch["pid"].tolist(), batch["captions"]):
                    captions.extend(caps)
                    caption_labels.extend([label] * len(caps))
        size = cfg.train.eval_batch_size
        chunks = ((captions[i:i + size], caption_labels[i:i + size]) for i in range(0, len(captions), size))
        texts, text_labels = [], []
        for (chunk, labels), real in self._lockstep(chunks, ([""], [0])):
            feats = text_forward(self._to_device(encode(chunk))).float().cpu()
            if real:
                texts.append(feats)
                text_labels.append(torch.tensor(labels))
        self.engine.train()
        local = [_cat(images, 1), _cat(image_labels), _cat(texts, 1), _cat(text_labels), faults]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        self._check_missing(split, [f for g in gathered for f in g[4]])
        return tuple(torch.cat([g[i] for g in gathered if g[i].numel()]) for i in range(4))

    def _check_missing(self, split: str, faults: list[SampleFault]) -> None:
        """Remember the split's unusable samples; past the run's limit, stop (on every rank alike)."""
        data = self.cfg.data
        self.missing[split] = {f.identity: f for f in faults}
        samples = read_split(data.eval_shards or data.shards, split).samples
        limit = bad_sample_limit(data.max_bad_share, data.max_bad_count, samples)
        if len(faults) > limit:
            raise RunError(f"{len(faults)} of {samples} samples of the evaluation split '{split}' are unusable, more "
                           f"than the limit of {limit} (data.max_bad_share / data.max_bad_count):\n  "
                           + "\n  ".join(summarize(faults)))

    def completeness(self, split: str) -> dict:
        """What the last evaluation of ``split`` left out: scores over fewer queries are not comparable."""
        faults = self.missing.get(split, {})
        if not faults:
            return {}
        return {"incomplete": {"missing_samples": len(faults), "reasons": summarize(faults.values())}}


def _cat(parts: list[torch.Tensor], width: int | None = None) -> torch.Tensor:
    if parts:
        return torch.cat(parts)
    return torch.zeros(0, width) if width is not None else torch.zeros(0, dtype=torch.long)


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict, rank: int, world_size: int, local_rank: int,
                 portable_init: str | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = device_for(local_rank)
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.ds_config = compose_ds_config(ds_config, cfg, world_size, DeviceSupport.detect())
        self.method: Method = get_method(cfg)
        self.steps_per_epoch = batches_per_epoch(cfg.data.shards, cfg.data.train_split, cfg.train.batch_size,
                                                 self.method.train_languages())
        self.micro_batches_per_epoch = self.steps_per_epoch * cfg.train.grad_accum
        total_steps = self.steps_per_epoch * cfg.train.epochs
        warmup = round(cfg.optim.warmup_ratio * total_steps) if cfg.optim.warmup_ratio is not None \
            else round(cfg.optim.warmup_epochs * self.steps_per_epoch)

        model = self.method.build()
        if portable_init:  # exported adapters: each rank takes its experts, whatever the exporting run's layout
            load_portable(model, portable_init)
        self.trainable_count = sum(p.numel() for p in trainable_parameters(model).values())
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg), config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, warmup, total_steps, cfg.optim.warmup_start_factor)))
        safe_checkpoint.install(self.engine)
        self.ep_size = cfg.adapter.ep_size if cfg.adapter.router != "dense" else 1
        check_expert_placement(self.ep_size)
        self.model = self.engine.module
        self.dtype = engine_dtype(self.engine)
        self.evaluator = Evaluator(cfg, self.engine, self.device)
        self.progress = Progress()
        self.started_from = portable_init
        self.log = RunLogger(self.run_dir, rank, cfg, enabled_wandb=cfg.wandb.enabled)
        self.preemption = PreemptionWatch()
        train = read_split(cfg.data.shards, cfg.data.train_split)
        self.faults = FaultLog(cfg.data.train_split, train.samples,
                               bad_sample_limit(cfg.data.max_bad_share, cfg.data.max_bad_count, train.samples))

    def evaluate(self, split: str) -> dict[str, float]:
        metrics = self.method.evaluate(self.evaluator, split)
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
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            checkpoint_io.remove_staging(self.ckpt_root)

    def resume(self, spec: str | None) -> bool:
        """``auto``: the newest complete checkpoint of this run, if any; otherwise a path."""
        if not spec:
            return False
        if spec == "auto":
            tag = complete_tag(self.ckpt_root)
            if tag is None:
                self.log.info("resume auto: no complete checkpoint yet, starting fresh")
                return False
            root = self.ckpt_root
        else:
            root, tag = resolve_checkpoint(spec)
        marker = checkpoint_io.read_marker(root, tag)
        layout = {"world_size": self.world_size, "ep_size": self.ep_size}
        saved = {k: marker.get(k, layout[k]) for k in layout}
        same = saved == layout
        if not same:
            self.log.info(f"WARNING: {root / tag} was saved with {saved}, this run has {layout}: loading the weights "
                          f"(experts resharded) and progress; the optimiser state restarts and the data order changes")
        _, client = load_checkpoint(self.engine, root, tag, self.cfg, load_optimizer_states=same)
        if client is None or "progress" not in client:
            raise RunError(f"checkpoint {root / tag} could not be loaded or has no training progress")
        self.progress = Progress(**client["progress"])
        self.method.load_state_dict(client.get("method", {}))
        self.faults.load_state_dict(client.get("bad_samples", []))
        self.log.info(f"resumed from {root / tag}: epoch {self.progress.epoch}, batch {self.progress.batch}, "
                      f"step {self.engine.global_steps}")
        return True

    def init_from(self, path: str) -> None:
        """Start from another run's trainable weights (e.g. DASD's CMA from its CLA run); optimiser state fresh."""
        if is_portable(path):
            raise AssertionError("portable files are loaded before deepspeed.initialize (Trainer portable_init)")
        root, tag = resolve_checkpoint(path)
        load_checkpoint(self.engine, root, tag, self.cfg, load_optimizer_states=False,
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
        staging = checkpoint_io.STAGING_PREFIX + tag
        try:
            self.engine.save_checkpoint(str(self.ckpt_root), staging, client_state=state, save_latest=False,
                                        exclude_frozen_parameters=True)
        except BaseException:
            shutil.rmtree(self.ckpt_root / staging, ignore_errors=True)
            raise
        dist.barrier()
        if self.rank == 0:
            marker = {"time": time.time(), "progress": self.progress.__dict__, "global_step": self.engine.global_steps,
                      "world_size": self.world_size, "ep_size": self.ep_size, "config": to_dict(self.cfg)}
            checkpoint_io.publish(self.ckpt_root, staging, tag, json.dumps(marker))
            self._prune()
        dist.barrier()

    def _prune(self) -> None:
        keep = {complete_tag(self.ckpt_root, "latest"), complete_tag(self.ckpt_root, "best")}
        steps = sorted(p for p in self.ckpt_root.glob("step*") if p.is_dir())
        for old in steps[:-max(1, self.cfg.train.keep_checkpoints)]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def mark_best(self, tag: str) -> None:
        if self.rank == 0:
            checkpoint_io.write_pointer(self.ckpt_root, "best", tag)
        dist.barrier()

    # -- the loop -----------------------------------------------------------------------------------------------

    def stream_config(self) -> TrainStreamConfig:
        cfg = self.cfg
        return TrainStreamConfig(
            shard_dir=cfg.data.shards, split=cfg.data.train_split, image_size=cfg.model.image_size,
            micro_batch=cfg.micro_batch(self.world_size), batches_per_epoch=self.micro_batches_per_epoch,
            rank=self.rank, world_size=self.world_size, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            augment=cfg.data.augment, erasing_p=cfg.data.random_erasing, load_images=self.method.load_images)

    def train(self) -> dict:
        cfg, prog = self.cfg, self.progress
        self.log.info(f"trainable parameters: {self.trainable_count:,}; {self.steps_per_epoch} steps per epoch; "
                      f"world size {self.world_size}, ep_size {cfg.adapter.ep_size}, ds config zero stage "
                      f"{self.ds_config.get('zero_optimization', {}).get('stage', 0)}, dtype {self.dtype}")
        if cfg.train.eval_zero_shot and prog.zero_shot is None:
            prog.zero_shot = self.evaluate(cfg.data.test_split)
            self.log.metrics({"event": "zero_shot", "split": cfg.data.test_split, **prog.zero_shot})
        stream = self.stream_config()
        stopped = False
        while prog.epoch < cfg.train.epochs and not stopped:
            loader = train_loader(stream, self.method.train_texts(), prog.epoch, prog.batch, cfg.data.workers,
                                  self.faults.known_bad())
            bar = self.log.progress(total=self.micro_batches_per_epoch, initial=prog.batch,
                                    desc=f"epoch {prog.epoch + 1}/{cfg.train.epochs}")
            for batch in loader:
                self.faults.add(batch.pop("faults"))
                batch = {k: v.to(self.device, dtype=self.dtype) if k == "image" else v.to(self.device)
                         for k, v in batch.items()}
                out = self.engine(batch)
                self.method.backward(self.engine, out)
                self.engine.step()
                prog.batch += 1
                bar.update(1)
                step = self.engine.global_steps
                boundary = prog.batch % cfg.train.grad_accum == 0
                if boundary:
                    request, bad_samples = self._agree()
                    self._check_faults(bad_samples, log_now=step % cfg.train.log_every == 0)
                if boundary and step % cfg.train.log_every == 0:
                    self._log_step(out, step, bad_samples)
                if boundary and cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self.save(f"step{step:08d}")
                if boundary and request:
                    return self.stop_for_preemption(request)
                if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
                    stopped = True
                    break
            bar.close()
            if not stopped:
                prog.epoch, prog.batch = prog.epoch + 1, 0
                self._end_of_epoch()
            elif complete_tag(self.ckpt_root) != f"step{self.engine.global_steps:08d}":
                self.save(f"step{self.engine.global_steps:08d}")
        return self.finish()

    def stop_for_preemption(self, request: int) -> dict:
        """Save where we are (every rank), then requeue the Slurm job if the warning signal asked for it."""
        tag = f"step{self.engine.global_steps:08d}"
        if complete_tag(self.ckpt_root) != tag:
            self.save(tag)
        step = self.engine.global_steps
        if request == REQUEUE and self.rank == 0:
            # log first: the requeue starts ending this job at once
            outcome = f"requeue requested for Slurm job {os.environ.get('SLURM_JOB_ID', '(not under Slurm)')}"
            self.log.metrics({"event": "preempted", "step": step, "outcome": outcome})
            self.log.info(f"preempted at step {step}: saved {tag}; {self.preemption.requeue()}")
        elif request != REQUEUE:
            self.log.metrics({"event": "preempted", "step": step, "outcome": "stopped on SIGTERM"})
        self.log.close()
        return {"preempted": True, "checkpoint": tag}

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

    def _log_step(self, out: dict, step: int, bad_samples: int) -> None:
        record = {"step": step, "epoch": self.progress.epoch, **self.method.scalars(out),
                  "lr": self.scheduler.get_last_lr()[0]}
        if bad_samples:
            record["bad_samples"] = bad_samples
        if self.engine.fp16_enabled():  # dynamic loss scaling: steps with inf/nan gradients are skipped
            record.update(loss_scale=float(self.optimizer.loss_scale), skipped_steps=self.engine.skipped_steps)
        self.log.metrics(record, routing=self.model.expert_counts())

    def _end_of_epoch(self) -> None:
        cfg, prog = self.cfg, self.progress
        tag = f"step{self.engine.global_steps:08d}"
        last = prog.epoch == cfg.train.epochs
        if cfg.data.val_split and (prog.epoch % cfg.train.eval_every == 0 or last):
            val = self.evaluate(cfg.data.val_split)
            prog.history.append({"epoch": prog.epoch, "step": self.engine.global_steps, **val})
            self.log.metrics({"event": "val", "epoch": prog.epoch, **val})
            score = val[self.method.selection_metric]
            if score > prog.best_score:
                prog.best_score, prog.best_tag = score, tag
        self.save(tag)
        if cfg.data.val_split and prog.best_tag == tag:
            self.mark_best(tag)

    def finish(self) -> dict:
        """Test the selected model (best on val, else the last) and write results.json."""
        cfg, prog = self.cfg, self.progress
        selection = "last step (no validation split)" if not cfg.data.val_split else "last step (not validated)"
        if cfg.data.val_split and prog.best_tag:
            selection = f"best validation {self.method.selection_metric} ({prog.best_tag})"
            if prog.best_tag != complete_tag(self.ckpt_root, "latest"):
                load_checkpoint(self.engine, self.ckpt_root, prog.best_tag, cfg, load_optimizer_states=False,
                                load_lr_scheduler_states=False)
        test = self.evaluate(cfg.data.test_split)
        results = {"model_selection": selection, "zero_shot": prog.zero_shot, "test": test,
                   "start_label": "untrained" if not self.started_from else "at start",
                   "validation": prog.history, "trainable_parameters": self.trainable_count,
                   "world_size": self.world_size, "ep_size": cfg.adapter.ep_size}
        self.log.metrics({"event": "test", **test})
        self.method.on_finish(self.model, self.run_dir, self.rank)
        if self.rank == 0:
            write_text_atomic(self.run_dir / "results.json", json.dumps(results, indent=2))
            self.log.info(format_results(results, self.method.report_metrics))
        self.log.close()
        return results


def format_results(results: dict, keys: tuple[str, ...]) -> str:
    rows = [(results.get("start_label", "untrained"), results.get("zero_shot")), ("trained", results["test"])]
    width = max(8, *(len(k) + 2 for k in keys))
    lines = [f"{'test split':<12}" + "".join(f"{k:>{width}}" for k in keys)]
    for name, metrics in rows:
        if metrics:
            lines.append(f"{name:<12}" + "".join(f"{metrics[k]:{width}.2f}" for k in keys))
    lines.append(f"model selection: {results['model_selection']}")
    return "\n".join(lines)


def load_for_inference(cfg: RunConfig, checkpoint: str | Path, ep_size: int | None = None):
    """A model built from ``cfg`` holding the weights of a DeepSpeed checkpoint (run, checkpoints or tag directory)
    or of a portable ``.safetensors`` file, wrapped in a DeepSpeed engine without optimiser.

    Any world size works: when it does not fit the saved ep_size (or ``ep_size`` asks), experts are resharded.
    """
    world_size = dist.get_world_size()
    if ep_size is not None:
        cfg.adapter.ep_size = ep_size
    elif cfg.adapter.router != "dense" and world_size % cfg.adapter.ep_size:
        cfg.adapter.ep_size = 1
    method = get_method(cfg)
    model = method.build()
    if is_portable(checkpoint):
        load_portable(model, checkpoint)
        source = str(checkpoint)
    device = DeviceSupport.detect()
    # bf16 inference where training would use it on this GPU; fp32 on CPUs
    precision = "bf16" if device.cuda and device.bf16 and resolve_precision(cfg, device) == "bf16" else "fp32"
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "bf16": {"enabled": precision == "bf16"}, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    safe_checkpoint.install(engine)
    if not is_portable(checkpoint):
        root, tag = resolve_checkpoint(checkpoint)
        load_checkpoint(engine, root, tag, cfg, load_optimizer_states=False, load_lr_scheduler_states=False,
                        load_module_only=True)
        source = str(root / tag)
    return method, engine, source


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str | Path, split: str, local_rank: int) -> dict[str, float]:
    """Score ``split`` with a saved run's adapters (any world size / ep_size)."""
    method, engine, source = load_for_inference(cfg, checkpoint)
    metrics = method.evaluate(Evaluator(cfg, engine, device_for(local_rank)), split)
    return {"checkpoint": source, "split": split, **metrics}
