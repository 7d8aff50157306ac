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
specialises them (the variant that vectorises and pipelines its loads, so the one with the most
shared memory); integer arguments unspecialised.

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
INT_ARGS = {"K", "N", "I", "J", "P", "T", "V", "NB", "ignore_index"}  # other scalars are fp32
MODULES = ("multi_lora_linear", "segment_cross_entropy", "fused_update", "meta_reduce")


def _configs():
    import importlib
    for mod in MODULES:
        module = importlib.import_module(f"metakernels.ops._triton.{mod}")
        yield from module.launch_configs()


def _dot_dtype(cfg) -> str | None:
    """"bf16"/"fp16"/"fp32" for a config with matrix products, else None."""
    dot = cfg.constexprs.get("DOT_DTYPE")
    return None if dot is None else str(dot)


def _compile_all(cc: int) -> None:
    """The worker: compiles every config for sm_<cc> and prints one JSON line per config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for cfg in _configs():
        sig, attrs = {}, {}
        for i, name in enumerate(inspect.signature(cfg.kernel.fn).parameters):
            if name in cfg.constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = cfg.ptr_types.get(name, "*fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name.startswith("stride") or name in INT_ARGS:
                sig[name] = "i32"
            else:
                sig[name] = "fp32"
        row = {"name": cfg.name}
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(
                ASTSource(cfg.kernel, signature=sig, constexprs=cfg.constexprs, attrs=attrs),
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
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"the sm_{cc} compile worker failed:\n{err[-3000:]}"
        for line in out.splitlines():
            row = json.loads(line)
            rows[(cc, row["name"])] = row
    return rows


def test_config_names_are_unique():
    names = [c.name for c in CONFIGS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("cc", list(ARCHS), ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_kernel_compiles(cfg, cc, compiled):
    row = compiled.get((cc, cfg.name))
    assert row is not None, f"{cfg.name} was not compiled for sm_{cc}"
    assert "error" not in row, f"{cfg.name} does not compile for sm_{cc}: {row['error']}"
    assert row["cubin"] > 0
    assert row["shared"] <= ARCHS[cc], (
        f"{cfg.name} needs {row['shared']} bytes of shared memory; sm_{cc} has {ARCHS[cc]}")
    dot = _dot_dtype(cfg)
    if dot in ("bf16", "fp16"):
        assert row["mma"], f"{cfg.name}: {dot} products do not use the tensor cores on sm_{cc}"
    if dot == "fp32":
        assert not row["mma"] and not row["tf32"], f"{cfg.name}: fp32 products must be IEEE fp32"
    if dot is None:
        assert not row["mma"], f"{cfg.name} has no matrix product, yet its PTX has one"
