"""A bf16 base through the trainer: ``model.dtype=bfloat16`` runs the cpu backend's bf16 kernels
(the fused layers, attention and the LoRA products on bf16 activations) over the fp32 bank."""
import json

import pytest
import torch

from metakernels import backend, train
from metakernels.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")

SMALL = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
         "meta.meta_batch_size=3", "data.support_size=2", "data.query_size=2",
         "meta.num_inner_steps=2", "trainer.log_every=1", "trainer.progress_bar=false",
         "trainer.backend=cpu", "trainer.total_steps=3", "trainer.save_every=3"]


def test_trainer_on_a_bf16_base_runs_the_bf16_kernels(tmp_path, monkeypatch):
    from torch.profiler import ProfilerActivity, profile
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    args = SMALL + ["model.dtype=bfloat16", f"trainer.output_dir={tmp_path}",
                    "trainer.experiment_name=bf16"]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        assert train.main(args) == 0
    calls = {e.key.split("::")[1] for e in prof.key_averages() if e.key.startswith("metakernels::")}
    # every kernel of the step ran (the bf16 inputs did not fall back to the torch forms)
    assert {"rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd", "rotary_fwd",
            "rotary_bwd", "attention_fwd", "attention_bwd", "multi_lora_linear_fwd",
            "multi_lora_linear_bwd"} <= calls, calls
    # ...and no bf16 SDPA
    assert not any("scaled_dot_product" in e.key for e in prof.key_averages())
    run = tmp_path / "bf16"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["stage2/meta_loss"] for r in rows if "stage2/meta_loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    tensors, _ = load_checkpoint(latest_checkpoint(run))
    assert tensors["theta"].dtype == torch.float32
