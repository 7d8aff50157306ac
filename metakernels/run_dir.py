"""What a run directory may hold, checked before a run starts.

``<trainer.output_dir>/<trainer.experiment_name>/`` holds one run: its ``config.yaml``,
``metrics.jsonl``, plots and ``checkpoints/step_<N>/`` (the newest two), every checkpoint
tagged with the run's id. A new run refuses a directory that holds another run's checkpoints
or metrics unless ``trainer.overwrite=true`` (which replaces them); ``trainer.resume=true``
continues the run there only with the checkpoint's settings, apart from those that cannot
change what is trained (``FREE_ON_RESUME``) and those listed in ``trainer.resume_changes``.
"""
from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

from .checkpoint import checkpoint_meta, latest_checkpoint
from .config import Config, config_from_dict, setting_names
from .errors import UserError

# where the run lives and is logged, how long it runs, how the same math is computed and how it
# is validated: a resume takes these from the new config without a word
FREE_ON_RESUME = frozenset({
    "trainer.total_steps", "trainer.output_dir", "trainer.experiment_name", "trainer.log_every",
    "trainer.save_every", "trainer.resume", "trainer.overwrite", "trainer.resume_changes",
    "trainer.loggers", "trainer.progress_bar", "trainer.backend", "trainer.gemm",
    "trainer.device", "trainer.max_nonfinite_steps", "trainer.eval_every", "trainer.eval_shots",
    "trainer.eval_seeds", "trainer.eval_query_size", "trainer.collective_timeout_s",
    "meta.task_chunk"})
# what theta and the sampler's saved state mean: the base, the adapters, the tasks, the
# algorithm, the meta-batch and the seed; a resume never changes these
FIXED_PREFIXES = ("model.", "data.")
FIXED_ON_RESUME = frozenset({"meta.algorithm", "meta.meta_batch_size", "trainer.seed"})


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def holds_a_run(run: Path) -> bool:
    """True when ``run`` has a complete checkpoint or a metrics log."""
    return latest_checkpoint(run) is not None or (run / "metrics.jsonl").is_file()


def _is_fixed(key: str) -> bool:
    return key.startswith(FIXED_PREFIXES) or key in FIXED_ON_RESUME


def config_changes(cfg: Config, saved: dict) -> list[tuple[str, object, object]]:
    """(key, the checkpoint's value, this config's value) for every setting that differs."""
    theirs = config_from_dict(saved)
    out = []
    for key in setting_names(cfg):
        section, name = key.split(".")
        a = getattr(getattr(theirs, section), name)
        b = getattr(getattr(cfg, section), name)
        if a != b:
            out.append((key, a, b))
    return out


def check_resume_config(cfg: Config, saved: dict, ckpt: Path) -> None:
    """Refuses a resume whose config differs from the checkpoint's in a setting that changes
    what is trained, unless the setting is listed in ``trainer.resume_changes``."""
    changes = [c for c in config_changes(cfg, saved) if c[0] not in FREE_ON_RESUME]
    fixed = [c for c in changes if _is_fixed(c[0])]
    unlisted = [c for c in changes if not _is_fixed(c[0])
                and c[0] not in cfg.trainer.resume_changes]

    def show(cs):
        return ", ".join(f"{k}={b!r} (the checkpoint has {a!r})" for k, a, b in cs)

    if fixed:
        raise UserError(f"trainer.resume=true: {show(fixed)}; a resumed run keeps the "
                        f"checkpoint's model, data, algorithm, meta-batch and seed ({ckpt}); "
                        f"use the checkpoint's settings, or another trainer.experiment_name "
                        f"for a new run")
    if unlisted:
        keys = ",".join(k for k, _, _ in unlisted)
        raise UserError(f"trainer.resume=true: {show(unlisted)}; use the checkpoint's "
                        f"settings, or change them knowingly with "
                        f"trainer.resume_changes=[{keys}]")


def prepare_run_dir(cfg: Config) -> Path | None:
    """Checks ``cfg.run_dir`` against ``trainer.resume`` and ``trainer.overwrite`` before
    anything is built. Returns the checkpoint to resume from, or None for a run from step 0."""
    run, tr = cfg.run_dir, cfg.trainer
    if tr.resume:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            if os.environ.get("RANK", "0") == "0":
                print(f"trainer.resume=true: no checkpoint in {run}; starting from step 0",
                      file=sys.stderr, flush=True)
            return None
        meta = checkpoint_meta(ckpt)   # the tensors are read once, by Trainer.resume
        if "config" not in meta:
            raise UserError(f"trainer.resume=true: {ckpt} has no config in its metadata; give "
                            f"another trainer.experiment_name for a new run")
        check_resume_config(cfg, meta["config"], ckpt)
        return ckpt
    if holds_a_run(run) and not tr.overwrite:
        ckpt = latest_checkpoint(run)
        what = f"checkpoints up to {ckpt.name}" if ckpt is not None else "a metrics.jsonl"
        raise UserError(f"trainer.experiment_name={tr.experiment_name}: {run} holds another run "
                        f"({what}); give another trainer.experiment_name, trainer.resume=true "
                        f"to continue it, or trainer.overwrite=true to replace it")
    return None


def clear_run(run: Path) -> None:
    """Removes another run's checkpoints and metrics from ``run`` (``trainer.overwrite``)."""
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    for name in ("metrics.jsonl", "loss_curve.png"):
        (run / name).unlink(missing_ok=True)
