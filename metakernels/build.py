"""Building what a run needs from its config: the tokenizer, the tasks, the frozen base and its
adapter bank. Shared by every command (train, evaluate, the distributed loader) so that a
checkpoint is always rebuilt the way it was trained."""
from __future__ import annotations

from pathlib import Path

import torch

from . import backend as _backend
from .bank import AdapterBank
from .cli import check_model_path
from .config import Config
from .errors import UserError
from .lora import inject, linear_module_names, unmatched_targets

# the names model.dtype takes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_kernel_choices(cfg: Config) -> None:
    """``trainer.backend`` and ``trainer.gemm`` for this process (``auto`` leaves the
    environment's choice, or the automatic one)."""
    _backend.configure(backend=cfg.trainer.backend, gemm=cfg.trainer.gemm)


def build_tokenizer(cfg: Config):
    from .data.tokenizer import load_tokenizer
    from .models import load_gguf_tokenizer

    check_model_path(cfg.model.path)
    if cfg.model.gguf_file is not None:
        return load_gguf_tokenizer(cfg.model.gguf_file)
    return load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def build_tasks(cfg: Config, tokenizer, split: str = "train"):
    """The training (or held-out) tasks named by ``data.tasks``."""
    from .data.loader import DataError, load_task_dir
    from .data.tasks import builtin_tasks

    d = cfg.data
    if d.tasks == "builtin" or d.tasks.startswith("builtin:"):
        return builtin_tasks(split, *d.tasks.split(":", 1)[1:])
    root = Path(d.tasks)
    if split != "train":
        root = root.parent / f"{root.name}_{split}" if not (root / split).is_dir() else root / split
    try:
        return load_task_dir(root, tokenizer, max_length=d.max_length, truncation=d.truncation,
                             apply_chat_template=d.apply_chat_template, prompt_key=d.prompt_key,
                             response_key=d.response_key, skip_bad=d.skip_bad_rows)
    except DataError as e:
        if split == "train":  # the held-out split is optional: its caller handles DataError
            raise UserError(f"data.tasks={d.tasks}: {e}") from None
        raise


def build_model(cfg: Config, vocab_size: int):
    """The frozen base: a local checkpoint (``model.path``), a GGUF checkpoint dequantized
    (``model.gguf_file``) or a tiny random model."""
    m = cfg.model
    attn = "eager" if cfg.meta.algorithm == "maml" else m.attn_implementation
    if m.gguf_file is not None:
        from .models import load_gguf

        model = load_gguf(m.gguf_file, DTYPES[m.dtype], attn)
    elif m.path is not None:
        from transformers import AutoModelForCausalLM

        check_model_path(m.path)
        model = AutoModelForCausalLM.from_pretrained(
            m.path, dtype=DTYPES[m.dtype], trust_remote_code=m.trust_remote_code,
            attn_implementation=attn, local_files_only=True)
    else:
        from .models import build_tiny_model

        model = build_tiny_model(m.family, seed=cfg.trainer.seed, dtype=DTYPES[m.dtype],
                                 vocab_size=vocab_size, hidden_size=m.hidden_size,
                                 num_layers=m.num_layers, num_heads=m.num_heads,
                                 num_kv_heads=m.num_kv_heads,
                                 intermediate_size=m.intermediate_size,
                                 initializer_range=m.initializer_range,
                                 attn_implementation=attn)
    if m.fused_layers:
        from .fused import apply_fused_layers

        apply_fused_layers(model)
    return model.to(cfg.trainer.device).eval()


def build_bank(cfg: Config, model, num_tasks: int) -> AdapterBank:
    """Injects the config's LoRA adapters (``model.target_modules``, rank, alpha, dropout)
    into ``model`` and returns their bank."""
    m = cfg.model
    targets = m.target_modules if m.target_modules != ["all-linear"] else "all-linear"
    check_target_modules(model, targets)
    return inject(model, targets, rank=m.lora_rank, alpha=m.lora_alpha, num_tasks=num_tasks,
                  dropout=m.lora_dropout)


def check_target_modules(model, targets) -> None:
    """Every name of ``model.target_modules`` (or its regex) must match a linear module of
    ``model``: a name that matches nothing is a typo that would silently train fewer
    adapters."""
    unmatched = unmatched_targets(model, targets)
    if unmatched:
        raise UserError(f"model.target_modules: {unmatched} match no linear module of the model "
                        f"(its linear modules are named {linear_module_names(model)}); give "
                        f"names from that list, a regex over full module names, or all-linear")
