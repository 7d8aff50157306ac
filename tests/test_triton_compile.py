"""Every Triton kernel compiles for the GPUs it is meant for, on a machine without one.

The interpreter (``tests/ops/``) checks what the kernels compute, but it neither
type-checks like the compiler nor says whether a bf16 product reaches the tensor cores. Here
each variant a launcher can choose (``launch_configs()`` of every module in
``metakernels/ops/_triton``: kernels x dtypes x constexprs x num_warps/num_stages) is compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))`` down to a cubin
(ptxas from the triton wheel), and:
- fits the shared memory of a block on that architecture (``metadata.shared``);
- uses the tensor cores where the products are bf16/fp16 (``mma`` on sm_80; ``wgmma`` or
  ``mma`` on sm_90), and no TF32 where they are fp32 (``input_precision="ieee"``).
Pointers are compiled as 16-byte aligned, as a launch with freshly allocated tensors
specialises them. Each config is compiled with its integer arguments unspecialised (odd sizes
and strides) and once per kind of launch in its ``unit`` table as such a launch specialises
them: the strides that are 1 as constants, every other integer divisible by 16 (a launch on
contiguous tensors with sizes divisible by 16: the variant that vectorises its loads and so
takes the most shared memory).

The compiles run in two subprocesses (one per architecture, in parallel) without
``TRITON_INTERPRET``, which ``conftest.py`` sets for this process; triton's on-disk cache makes
reruns of unchanged kernels fast.
"""
import inspect
import json
import os
import subprocess
import sys
import time

ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # max shared memory per block (bytes), A100 / H100
SM90_SMEM_PER_SM, SMEM_RESERVED_PER_BLOCK = 228 * 1024, 1024  # what two blocks on an SM share
INT_ARGS = {"K", "N", "I", "J", "P", "T", "V", "NB", "D", "HALF", "n", "n1", "n2", "n_rows",
            "ignore_index"}  # other scalars are fp32
MODULES = ("multi_lora_linear", "segment_cross_entropy", "fused_update", "meta_reduce",
           "rms_norm", "swiglu", "rotary")


def _configs():
    import importlib
    for mod in MODULES:
        module = importlib.import_module(f"metakernels.ops._triton.{mod}")
        yield from module.launch_configs()


def _variants(cfg):
    """(variant name, the integer arguments that are the constant 1 or None: unspecialised)."""
    yield cfg.name, None
    for label, unit in cfg.unit.items():
        yield f"{cfg.name}@{label}", frozenset(unit)


def _dot_dtype(cfg) -> str | None:
    """"bf16"/"fp16"/"fp32" for a config with matrix products, else None."""
    dot = cfg.constexprs.get("DOT_DTYPE")
    return None if dot is None else str(dot)


def _compile_all(cc: int) -> None:
    """The worker: compiles every config for sm_<cc> and prints one JSON line per config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for cfg, (variant, unit) in ((c, v) for c in _configs() for v in _variants(c)):
        sig, attrs, constexprs = {}, {}, dict(cfg.constexprs)
        params = list(inspect.signature(cfg.kernel.fn).parameters)
        assert unit is None or unit <= set(params), f"{cfg.name}: unknown strides {unit}"
        for i, name in enumerate(params):
            if name in cfg.constexprs:
                sig[name] = "constexpr"
            elif unit is not None and name in unit:
                sig[name], constexprs[name] = "constexpr", 1
            elif name.endswith("_ptr"):
                sig[name] = cfg.ptr_types.get(name, "*fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name.startswith("stride") or name in INT_ARGS:
                sig[name] = "i32"
                if unit is not None:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "fp32"
        row = {"name": variant}
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(
                ASTSource(cfg.kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", cc, 32),
                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        except Exception as e:  # reported to the test that owns this config, with the message
            row["error"] = f"{type(e).__name__}: {e}"[-3000:]
        else:
            ptx = compiled.asm["ptx"]
            row.update(shared=compiled.metadata.shared, wgmma="wgmma" in ptx,
                       mma="mma.sync" in ptx or "wgmma" in ptx, tf32=".tf32" in ptx,
                       cubin=len(compiled.asm["cubin"]))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said aloud
    _compile_all(int(sys.argv[1]))
    sys.exit(0)


import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed: no kernels to compile")
import triton.backends  # noqa: E402

CONFIGS = list(_configs())
VARIANTS = [(cfg, name) for cfg in CONFIGS for name, _ in _variants(cfg)]


@pytest.fixture(scope="module")
def compiled():
    """{(cc, name): the worker's row}, both architectures compiled in parallel."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip(f"triton {triton.__version__} has no nvidia backend to compile with")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    procs = {cc: subprocess.Popen([sys.executable, os.path.abspath(__file__), str(cc)],
                                  cwd=root, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for cc in ARCHS}
    rows = {}
    for cc, proc in procs.items():
        out, err = proc.communicate(timeout=1800)  # cold cache, two shared cores: minutes
        assert proc.returncode == 0, f"the sm_{cc} compile worker failed:\n{err[-3000:]}"
        for line in out.splitlines():
            row = json.loads(line)
            rows[(cc, row["name"])] = row
    return rows


def test_config_names_are_unique():
    names = [c.name for c in CONFIGS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("cc", list(ARCHS), ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("cfg,variant", VARIANTS, ids=[name for _, name in VARIANTS])
def test_kernel_compiles(cfg, variant, cc, compiled):
    row = compiled.get((cc, variant))
    assert row is not None, f"{variant} was not compiled for sm_{cc}"
    assert "error" not in row, f"{variant} does not compile for sm_{cc}: {row['error']}"
    assert row["cubin"] > 0
    assert row["shared"] <= ARCHS[cc], (
        f"{variant} needs {row['shared']} bytes of shared memory; sm_{cc} has {ARCHS[cc]}")
    dot = _dot_dtype(cfg)
    if dot in ("bf16", "fp16"):
        assert row["mma"], f"{variant}: {dot} products do not use the tensor cores on sm_{cc}"
    if dot == "fp32":
        assert not row["mma"] and not row["tf32"], f"{variant}: fp32 products must be IEEE fp32"
    if dot is None:
        assert not row["mma"], f"{variant} has no matrix product, yet its PTX has one"


def _lora_config(kernel, blocks: dict, stages: int, dtype):
    """The ``multi_lora_linear`` config a launch with these blocks and stages compiles."""
    from metakernels.ops._triton import multi_lora_linear as tri_lora
    want = dict(blocks, DOT_DTYPE=tri_lora._DOT_DTYPE[dtype])
    found = [c for c in CONFIGS if c.kernel is kernel and c.num_stages == stages
             and {k: v for k, v in c.constexprs.items() if k != "ACCUMULATE"} == want]
    assert found, f"no listed config has blocks {blocks} and {stages} stages"
    return found[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_multi_lora_linear_stages_are_listed(dtype):
    """The stages a launcher picks, with its blocks, are a compiled config, for ranks 1-200."""
    import torch
    from metakernels.ops._triton import multi_lora_linear as tri_lora
    dtype = getattr(torch, dtype)
    for r in range(1, 201):
        _lora_config(tri_lora._sgmv_kernel, tri_lora._expand_blocks(r, dtype),
                     tri_lora._expand_stages(r, dtype), dtype)
        for rows in (1, 4096):
            blocks = tri_lora._shrink_blocks(rows, 32, r, dtype)
            _lora_config(tri_lora._sgmv_kernel, blocks, tri_lora._shrink_stages(blocks, dtype),
                         dtype)
        for role in ("dA", "dB"):
            blocks = tri_lora._outer_blocks(role, r, dtype)
            _lora_config(tri_lora._segment_outer_kernel, blocks,
                         tri_lora._outer_stages(role, blocks, dtype), dtype)


@pytest.mark.parametrize("rank", [64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rank64_kernels_fit_two_blocks_per_sm90(dtype, rank, compiled):
    """At rank 64 and above every LoRA kernel a launch picks (every compiled variant of it)
    leaves room for two blocks per SM on sm_90: one pipelined stage too many puts the expand,
    whose rank loop has one step, at one block per SM."""
    import torch
    from metakernels.ops._triton import multi_lora_linear as tri_lora
    dtype = getattr(torch, dtype)
    picked = [_lora_config(tri_lora._sgmv_kernel, tri_lora._expand_blocks(rank, dtype),
                           tri_lora._expand_stages(rank, dtype), dtype)]
    for rows in (16, 4096):
        blocks = tri_lora._shrink_blocks(rows, 32, rank, dtype)
        picked.append(_lora_config(tri_lora._sgmv_kernel, blocks,
                                   tri_lora._shrink_stages(blocks, dtype), dtype))
    for role in ("dA", "dB"):
        blocks = tri_lora._outer_blocks(role, rank, dtype)
        picked.append(_lora_config(tri_lora._segment_outer_kernel, blocks,
                                   tri_lora._outer_stages(role, blocks, dtype), dtype))
    for cfg in picked:
        for variant, _ in _variants(cfg):
            shared = compiled[(90, variant)]["shared"]
            assert 2 * (shared + SMEM_RESERVED_PER_BLOCK) <= SM90_SMEM_PER_SM, (
                f"{variant} takes {shared} bytes of shared memory: one block per SM on sm_90")
