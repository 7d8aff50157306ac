"""``python -m metakernels.export``: a checkpoint's theta as a PEFT LoRA adapter directory.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors``, which
``PeftModel.from_pretrained(base_model, directory)`` loads. A checkpoint trained with learned
inner rates (``meta.inner_lr_mode``) also gets ``inner_lr.safetensors``: PEFT has no place for
them. Its tensor ``inner_lr`` is [K, modules] (per_layer_step, the modules in the order of its
``modules`` metadata) or [P] (per_parameter, in the order of theta's slots: each module's A
[in, r] then B [r, out], row-major); its metadata says which. ``load_peft_adapter`` reads such a
directory back (to start a run from an SFT adapter: ``model.init_adapter``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import latest_checkpoint, load_checkpoint
from .cli import UserError, check_output_dir, command


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


def peft_tensors(theta: torch.Tensor, slots, prefix: str = "base_model.model.") -> dict:
    out = {}
    off = 0
    for name, fin, fout, r in slots:
        a = theta[off:off + fin * r].view(fin, r).T.contiguous()
        off += fin * r
        b = theta[off:off + r * fout].view(r, fout).T.contiguous()
        off += r * fout
        out[f"{prefix}{name}.lora_A.weight"] = a
        out[f"{prefix}{name}.lora_B.weight"] = b
    if off != theta.numel():
        raise ValueError(f"theta has {theta.numel()} values but the adapter layout covers {off}")
    return out


def write_peft_adapter(out_dir: str | Path, theta: torch.Tensor, slots, rank: int, alpha: float,
                       base_model: str | None = None, fan_in_fan_out: bool = False) -> Path:
    """Writes a PEFT LoRA adapter directory. ``slots``: (module name, in, out, rank) per module."""
    from peft import LoraConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=[s[0] for s in slots], fan_in_fan_out=fan_in_fan_out,
                     base_model_name_or_path=base_model)
    cfg.save_pretrained(str(out))
    tmp = out / ".adapter_model.safetensors.tmp"
    save_file(peft_tensors(theta.detach().float().cpu(), slots), str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, out / "adapter_model.safetensors")
    return out


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    ckpt = resolve_checkpoint(checkpoint)
    tensors, meta = load_checkpoint(ckpt)
    if not {"config", "slots", "rank", "alpha"} <= meta.keys() or "theta" not in tensors:
        raise UserError(f"{ckpt}: not a checkpoint of python -m metakernels.train (no adapter "
                        f"layout in its metadata)")
    model_cfg = meta["config"]["model"]
    slots = [(n, fin, fout, meta["rank"]) for n, fin, fout in meta["slots"]]
    out = write_peft_adapter(out_dir, tensors["theta"], slots, meta["rank"], meta["alpha"],
                             base_model=model_cfg.get("path"),
                             fan_in_fan_out=model_cfg.get("family") == "gpt2"
                             and model_cfg.get("path") is None)
    mode = meta.get("inner_lr_mode", "fixed")
    if mode != "fixed":
        tmp = out / ".inner_lr.safetensors.tmp"
        save_file({"inner_lr": tensors["inner_lr"].float().contiguous()}, str(tmp),
                  metadata={"format": "pt", "inner_lr_mode": mode,
                            "modules": json.dumps([s[0] for s in slots]),
                            "layout": "[K, modules]" if mode == "per_layer_step"
                            else "[P], theta's order: per module A [in, r] then B [r, out]"})
        os.replace(tmp, out / "inner_lr.safetensors")
    return out


def load_peft_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory (safetensors only: no pickle is loaded)."""
    path = Path(path)
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors (only safetensors "
                                f"adapters are loaded)")
    return load_file(str(file))


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m metakernels.export", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--output", required=True, help="directory for the PEFT adapter")
    args = p.parse_args(argv)
    check_output_dir(args.output, "--output")
    try:
        out = export_checkpoint(args.checkpoint, args.output)
    except UserError as e:
        raise UserError(f"--checkpoint {e}") from None
    cfg = json.loads((out / "adapter_config.json").read_text())
    print(f"wrote PEFT adapter (r={cfg['r']}, alpha={cfg['lora_alpha']}, "
          f"{len(cfg['target_modules'])} modules) to {out}"
          + (" with its learned inner rates (inner_lr.safetensors)"
             if (out / "inner_lr.safetensors").is_file() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
