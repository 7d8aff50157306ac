"""PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``):
written from a flat theta, read back into one. Safetensors only: no pickle is ever loaded."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .bank import AdapterBank, LoraSlot, peft_state_dict
from .errors import UserError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def is_peft_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file()


def write_peft_adapter(out_dir: str | Path, theta: torch.Tensor, slots: list[LoraSlot],
                       alpha: float, base_model: str | None = None,
                       fan_in_fan_out: bool = False) -> Path:
    """Writes the PEFT LoRA adapter directory of ``theta`` [P] laid out as ``slots``; the
    weights file is replaced atomically."""
    from peft import LoraConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = slots[0].rank
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=[s.name for s in slots], fan_in_fan_out=fan_in_fan_out,
                     base_model_name_or_path=base_model)
    cfg.save_pretrained(str(out))
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(peft_state_dict(theta.detach().float().cpu(), slots), str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    return out


def load_peft_adapter(path: str | Path, key: str = "model.init_adapter"
                      ) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory; ``key`` names the setting that gave it."""
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise UserError(f"{key}={path}: no {WEIGHTS} there (only safetensors adapters are "
                        f"loaded); give a PEFT LoRA adapter directory")
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise UserError(f"{key}={path}: {WEIGHTS} is not readable ({e}); give a PEFT LoRA "
                        f"adapter directory") from None


def read_peft_config(path: str | Path, key: str) -> dict:
    """``adapter_config.json`` of a plain LoRA adapter (the bank computes scale = alpha / rank:
    rsLoRA and DoRA are refused)."""
    file = Path(path) / CONFIG
    try:
        acfg = json.loads(file.read_text(encoding="utf-8"))
        int(acfg["r"]), float(acfg["lora_alpha"]), acfg["target_modules"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as e:
        raise UserError(f"{key}={path}: {CONFIG} is not a readable LoRA config ({e!r}); give "
                        f"a PEFT LoRA adapter directory") from None
    if acfg.get("use_rslora") or acfg.get("use_dora"):
        raise UserError(f"{key}={path}: rsLoRA/DoRA adapters are not supported (the bank "
                        f"computes scale = alpha / rank on plain LoRA)")
    return acfg


def peft_theta(path: str | Path, bank: AdapterBank, key: str) -> torch.Tensor:
    """The flat theta [P] (on the bank's device) of the adapter directory ``path``, which must
    adapt the bank's modules at its rank and alpha."""
    acfg = read_peft_config(path, key)
    if int(acfg["r"]) != bank.rank or not math.isclose(float(acfg["lora_alpha"]), bank.alpha):
        raise UserError(f"{key}={path}: the adapter has r={acfg['r']}, lora_alpha="
                        f"{acfg['lora_alpha']}; the bank has rank={bank.rank}, "
                        f"alpha={bank.alpha}; give an adapter with the same LoRA settings")
    try:
        return bank.flat_from_peft(load_peft_adapter(path, key)).detach().clone()
    except (KeyError, ValueError) as e:
        raise UserError(f"{key}={path}: {e.args[0]}; give an adapter of the same modules "
                        f"and rank") from None
