"""How the commands report a mistake in what they were given.

A user error (an unknown or ill-typed config key, a model or task path that does not exist, data
that does not load, a file that is not a checkpoint, an export target that cannot be written)
is one line on stderr, ``error: <message>``, where the message names the setting and what to
do, and exit status 2 (what argparse gives a bad command line). Any other exception is a bug
and keeps its traceback.

The path checks here run before anything is loaded, so a wrong path fails in a second rather
than after the model is built, and never reaches a library that would read it as a Hub id.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import EXIT_USER_ERROR, UserError


def command(main: Callable[[Optional[Sequence[str]]], int]):
    """Wraps a command's ``main(argv) -> int``: a user error (``UserError``, which
    ``ConfigError`` and ``DataError`` are) prints ``error: <message>`` on stderr and returns 2;
    every other exception propagates with its traceback."""

    @functools.wraps(main)
    def run(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR

    return run


# what a local Hugging Face model directory holds besides config.json
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "spiece.model")


def check_model_path(path: Optional[str], key: str = "model.path") -> None:
    """``path`` must be a local Hugging Face model directory (None: the built-in tiny model):
    a config.json that parses, weights and a tokenizer."""
    if path is None:
        return
    fix = f"give the directory that holds the model's config.json, weights and tokenizer, " \
          f"or {key}=null for the built-in tiny model"
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{key}={path}: no such directory (models are loaded from a local "
                        f"directory; nothing is downloaded); {fix}")
    config = p / "config.json"
    if not config.is_file():
        raise UserError(f"{key}={path}: no config.json there, so not a Hugging Face model "
                        f"directory; {fix}")
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{key}={path}: config.json does not parse ({e}); {fix}") from None
    if not any(any(p.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"{key}={path}: no weights there (no {', '.join(WEIGHT_PATTERNS)} "
                        f"file); {fix}")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{key}={path}: no tokenizer there (none of "
                        f"{', '.join(TOKENIZER_FILES)}); {fix}")


def check_device(device: str, backend: str, key: str = "trainer") -> None:
    """``trainer.device`` must name a device of this machine and ``trainer.backend`` (unless
    ``auto``) one that runs there."""
    import torch

    from . import backend as _backend

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"{key}.device={device}: not a device; give cpu, cuda or cuda:N") \
            from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"{key}.device={device}: metakernels trains on cpu or cuda; give "
                        f"{key}.device=cpu or cuda")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{key}.device={device}: no CUDA GPU is visible on this machine; "
                            f"give {key}.device=cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"{key}.device={device}: this machine has {count} CUDA GPU(s); "
                            f"give cuda:0 to cuda:{count - 1}")
    if backend != "auto" and not _backend.available(backend, dev):
        need = {"cpu": "the built C++ extension and CPU tensors",
                "triton": "triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)"}
        raise UserError(f"{key}.backend={backend}: cannot run on {device} here (it needs "
                        f"{need.get(backend, backend)}); give {key}.backend=auto")


def check_run_root(cfg) -> None:
    """The run directory (``trainer.output_dir`` / ``trainer.experiment_name``) must be
    creatable."""
    check_output_dir(cfg.trainer.output_dir, "trainer.output_dir")
    if cfg.run_dir.exists() and not cfg.run_dir.is_dir():
        raise UserError(f"trainer.experiment_name={cfg.trainer.experiment_name}: {cfg.run_dir} "
                        f"is a file, not a run directory; give another name")


def check_adapter_path(path: Optional[str], key: str = "model.init_adapter") -> None:
    """``path`` must be a PEFT LoRA adapter directory with safetensors weights (None: none)."""
    if path is None:
        return
    if not (Path(path) / "adapter_model.safetensors").is_file():
        raise UserError(f"{key}={path}: no adapter_model.safetensors there; give a PEFT LoRA "
                        f"adapter directory (python -m metakernels.export writes one), or "
                        f"{key}=null to start from PEFT's init")


def check_task_dir(tasks: str, key: str = "data.tasks") -> None:
    """``tasks`` must be ``builtin`` (or ``builtin:...``) or an existing directory (its
    contents are checked when the tasks are loaded)."""
    if tasks == "builtin" or tasks.startswith("builtin:"):
        return
    if not Path(tasks).is_dir():
        raise UserError(f"{key}={tasks}: no such directory; give a directory written by "
                        f"python -m metakernels.prepare, or {key}=builtin for the built-in tasks")


def check_paths(cfg) -> None:
    """The config's paths (``model.path``, ``model.init_adapter``, ``data.tasks``, the run
    directory) and its device and backend, before anything is loaded."""
    check_model_path(cfg.model.path)
    check_adapter_path(cfg.model.init_adapter)
    check_task_dir(cfg.data.tasks)
    check_device(cfg.trainer.device, cfg.trainer.backend)
    check_run_root(cfg)


def check_output_dir(path: str, flag: str) -> None:
    """``path`` must be an existing directory or one that can be created. Nothing is left
    behind: a probe directory is created in the nearest existing ancestor and removed (an
    access check alone says yes to root on a read-only file system)."""
    p = Path(path)
    sep = "=" if not flag.startswith("-") else " "
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag}{sep}{path}: a file is there, not a directory; give a new or "
                        f"existing directory")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag}{sep}{path}: {parent} is a file, so the directory cannot be "
                        f"created; give another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".metakernels-probe-", dir=parent))
    except OSError as e:
        raise UserError(f"{flag}{sep}{path}: {parent} is not writable ({e.strerror}); give a "
                        f"writable directory") from None
