"""Adapter-only checkpoints: one safetensors file (no pickle) per step, written atomically.

``<run>/checkpoints/step_<N>/checkpoint.safetensors`` holds ``theta`` [P], the outer optimizer's
state tensors and the RNG states; its metadata holds the config, the step, the scheduler and the
sampler state as JSON. A checkpoint directory is written under a temporary name, fsynced and
renamed, so a kill mid-write leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

FILE = "checkpoint.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor],
                    meta: dict, keep: int = 2) -> Path:
    """Writes ``step``'s checkpoint atomically and keeps the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    path = tmp / FILE
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"metakernels": json.dumps(meta)})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of ``run_dir``, or None."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint directory or file."""
    return _read_checkpoint(path, with_tensors=True)


def checkpoint_meta(path: str | Path) -> dict:
    """The metadata of a checkpoint directory or file, without reading its tensors."""
    return _read_checkpoint(path, with_tensors=False)[1]


def _read_checkpoint(path: str | Path, with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    file = path / FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file}: no such checkpoint file; give a run directory "
                        f"(runs/<experiment_name>) or one of its checkpoints/step_* directories")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("metakernels", "{}"))
        return (load_file(str(file)) if with_tensors else {}), meta
    except (SafetensorError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: not a readable checkpoint ({e}); give a checkpoint that "
                        f"python -m metakernels.train wrote") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its newest checkpoint), a checkpoint directory or file."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"{path}: the run has no complete checkpoint yet (one is written "
                            f"every trainer.save_every steps and at the end)")
        return ckpt
    if path.exists():
        return path
    raise UserError(f"{path}: no such run directory or checkpoint; give a run directory "
                    f"(runs/<experiment_name>) or one of its checkpoints/step_* directories")
