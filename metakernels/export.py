"""``python -m metakernels.export``: a checkpoint's theta as a PEFT LoRA adapter directory.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors``, which
``PeftModel.from_pretrained(base_model, directory)`` loads (and ``model.init_adapter`` or
``evaluate --baseline`` read back). The command prints which run and step it exported.

A checkpoint trained with learned inner rates (``meta.inner_lr_mode``) also gets
``inner_lr.safetensors``: PEFT has no place for them. Its tensor ``inner_lr`` is [K, modules]
(per_layer_step, the modules in the order of its ``modules`` metadata) or [P] (per_parameter,
in the order of theta's slots: each module's A [in, r] then B [r, out], row-major); its
metadata says which.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .bank import slots_from_meta
from .checkpoint import load_checkpoint, resolve_checkpoint
from .cli import UserError, check_output_dir, command
from .peft_adapter import write_peft_adapter


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> tuple[Path, Path, dict]:
    """Writes the adapter of ``checkpoint`` (a run directory: its newest checkpoint) to
    ``out_dir``. Returns (the adapter directory, the checkpoint used, its metadata)."""
    ckpt = resolve_checkpoint(checkpoint)
    tensors, meta = load_checkpoint(ckpt)
    if "config" not in meta or "theta" not in tensors:
        raise UserError(f"{ckpt}: not a checkpoint of python -m metakernels.train (no config "
                        f"or theta in it)")
    slots, _, alpha = slots_from_meta(meta, ckpt)
    theta = tensors["theta"]
    if not bool(torch.isfinite(theta).all()):
        raise UserError(f"{ckpt}: theta has non-finite values; give a checkpoint of a run "
                        f"that did not diverge")
    model_cfg = meta["config"]["model"]
    out = write_peft_adapter(out_dir, theta, slots, alpha, base_model=model_cfg.get("path"),
                             fan_in_fan_out=model_cfg.get("family") == "gpt2"
                             and model_cfg.get("path") is None)
    mode = meta.get("inner_lr_mode", "fixed")
    if mode != "fixed":
        write_inner_rates(out, tensors["inner_lr"], mode, [s.name for s in slots])
    return out, ckpt, meta


def write_inner_rates(out: Path, values: torch.Tensor, mode: str, modules: list[str]) -> Path:
    """``out/inner_lr.safetensors``: the learned inner rates, written atomically."""
    from safetensors.torch import save_file

    tmp = out / ".inner_lr.safetensors.tmp"
    save_file({"inner_lr": values.detach().float().contiguous().cpu()}, str(tmp),
              metadata={"format": "pt", "inner_lr_mode": mode, "modules": json.dumps(modules),
                        "layout": "[K, modules]" if mode == "per_layer_step"
                        else "[P], theta's order: per module A [in, r] then B [r, out]"})
    os.replace(tmp, out / "inner_lr.safetensors")
    return out / "inner_lr.safetensors"


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m metakernels.export", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--output", required=True, help="directory for the PEFT adapter")
    args = p.parse_args(argv)
    check_output_dir(args.output, "--output")
    try:
        out, ckpt, meta = export_checkpoint(args.checkpoint, args.output)
    except UserError as e:
        raise UserError(f"--checkpoint {e}") from None
    slots, rank, alpha = slots_from_meta(meta, ckpt)
    run = meta.get("run_id", "unknown")
    print(f"wrote PEFT adapter (r={rank}, alpha={alpha:g}, {len(slots)} modules) of "
          f"{ckpt} (step {meta.get('step', '?')}, run {run}) to {out}"
          + (f", with its learned {meta['inner_lr_mode']} inner rates in inner_lr.safetensors"
             if meta.get("inner_lr_mode", "fixed") != "fixed" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
