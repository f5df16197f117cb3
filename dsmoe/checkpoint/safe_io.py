"""DeepSpeed checkpoints read safely, written with errors that name the file, and loaded with an explanation when
they do not fit the model (the folders and pointers around them are ``dsmoe.checkpoint``'s).

DeepSpeed reads every checkpoint file with ``torch.load(weights_only=False)``, which runs whatever a pickle in the
file asks for. ``SafeCheckpointEngine`` replaces the engine's checkpoint engine: it loads with
``weights_only=True``, allowing only the few plain DeepSpeed classes its checkpoints hold, and refuses anything
else. It also writes through Python's file objects, so a full disk raises ``OSError`` (ENOSPC) and the error names
the file instead of ``basic_ios::clear: iostream error``.
"""
from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from dsmoe.checkpoint.folder import CheckpointWriteError, mismatch_message
from dsmoe.config import RunConfig, to_dict
from dsmoe.failures import RunError


def _safe_globals() -> list:
    """DeepSpeed classes that its own checkpoints pickle (plain data: an enum, a dataclass, loss scalers)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def load_safely(path: str | Path, map_location=None):
    """``torch.load`` that never executes code from the file: tensors, containers and DeepSpeed's data classes."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).strip().splitlines()[0]
        raise RunError(f"refusing to load {path}: it holds Python objects that only a full unpickling could build, "
                       f"and that can run arbitrary code ({detail}). dsmoe loads only tensors, plain containers and "
                       f"DeepSpeed's own checkpoint classes; a checkpoint written by dsmoe never needs more. Was "
                       f"this file written by another program, or replaced?") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with safe loading and saving errors that name the file."""

    def load(self, path: str, map_location=None):
        return load_safely(path, map_location)

    def save(self, state_dict, path: str):
        try:
            with open(path, "wb") as fh:
                torch.save(state_dict, fh, _use_new_zipfile_serialization=self.zipfile_serialization)
                fh.flush()
                os.fsync(fh.fileno())
        except (OSError, RuntimeError) as exc:
            raise CheckpointWriteError(path, write_error_cause(exc, path)) from None


def write_error_cause(exc: BaseException, path: str | Path) -> BaseException:
    """torch.save may wrap the OSError of a failed write in a RuntimeError; a full disk is the usual cause."""
    if isinstance(exc, OSError):
        return exc
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        return cause
    if "No space left on device" in str(exc):  # safetensors' Rust writer names the OS error only in its message
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    try:
        if os.statvfs(Path(path).parent).f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    except OSError:
        pass
    return exc


def install(engine) -> None:
    """Make a DeepSpeed engine read and write its checkpoints through ``SafeCheckpointEngine``."""
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


def load_checkpoint(engine, root: Path, tag: str, cfg: RunConfig, **kwargs):
    """``engine.load_checkpoint`` (trainable tensors only); when the saved tensors do not fit the model, one error
    that names the config values the checkpoint was trained with."""
    try:
        return engine.load_checkpoint(str(root), tag, load_module_strict=False, **kwargs)
    except (RuntimeError, FileNotFoundError) as exc:
        message = mismatch_message(root, tag, to_dict(cfg), exc)
        if message is None:
            raise
        raise RunError(message) from None
