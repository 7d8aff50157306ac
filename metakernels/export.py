"""``python -m metakernels.export``: a checkpoint's theta as a PEFT LoRA adapter directory.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors``, which
``PeftModel.from_pretrained(base_model, directory)`` loads (and ``model.init_adapter`` or
``evaluate --baseline`` read back). The command prints which run and step it exported.
"""
from __future__ import annotations

import argparse
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
    return out, ckpt, meta


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
          f"{ckpt} (step {meta.get('step', '?')}, run {run}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
