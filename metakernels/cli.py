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
import os
import sys
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


def check_model_path(path: Optional[str], key: str = "model.path") -> None:
    """``path`` must be a local Hugging Face model directory (None: the built-in tiny model)."""
    if path is None:
        return
    fix = f"give the directory that holds the model's config.json, or {key}=null for the " \
          f"built-in tiny model"
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key}={path}: no such directory (models are loaded from a local "
                        f"directory; nothing is downloaded); {fix}")
    if not (p / "config.json").is_file():
        raise UserError(f"{key}={path}: no config.json there, so not a Hugging Face model "
                        f"directory; {fix}")


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
    """The config's input paths (``model.path``, ``model.init_adapter``, ``data.tasks``)."""
    check_model_path(cfg.model.path)
    check_adapter_path(cfg.model.init_adapter)
    check_task_dir(cfg.data.tasks)


def check_output_dir(path: str, flag: str) -> None:
    """``path`` must be an existing directory or one that can be created; nothing is created
    here, so a command that fails later leaves no empty directory behind."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: a file is there, not a directory; give a new or "
                        f"existing directory")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, so the directory cannot be "
                        f"created; give another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable; give a writable directory")
