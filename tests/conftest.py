import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from metakernels import Example, pack_tasks  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


def random_tasks(sizes, vocab, min_len=4, max_len=12, seed=0):
    """Per-task lists of random examples with a random prompt/response split."""
    rng = random.Random(seed)
    tasks = []
    for n in sizes:
        exs = []
        for _ in range(n):
            L = rng.randint(min_len, max_len)
            ids = [rng.randrange(1, vocab) for _ in range(L)]
            p = rng.randint(1, L - 1)
            exs.append(Example(tuple(ids), tuple([0] * p + [1] * (L - p))))
        tasks.append(exs)
    return tasks


def random_batch(sizes, vocab, seed=0, **kw):
    return pack_tasks(random_tasks(sizes, vocab, seed=seed, **kw), pad_id=0)


# ---------------------------------------------------------------------------------------------
# Tolerances, derived from the computation, so that they hold on any CPU (the order in which a
# GEMM library sums depends on the instruction sets it finds: AMX, AVX-512, AVX2).
#
# A result stored in ``dtype`` and computed in ``compute`` precision errs by
#   - its rounding to ``dtype`` and a few rounded steps before it (an elementwise function such
#     as exp or rsqrt within an ulp or two): ROUNDINGS * u(dtype) of the element, and of the
#     largest value where those steps cancel;
#   - its sums: n terms of random sign summed in ANY order (sequential, blocked, pairwise, split
#     across threads) err by about u(compute) * sqrt(n) of the result's scale (a standard
#     deviation; a worst-case order reaches u * n only for adversarial terms). SUM_SIGMAS
#     standard deviations cover the largest of the thousands of elements a test checks. For a
#     chain of sums (a product of products, as dB = (x A)^T dy) n is the sum of their lengths:
#     the relative errors of the stages add in quadrature.
# Both are measured against the largest magnitude of the fp64 reference (the "scale"). A wrong
# segment, task, sign or missing term errs by O(1) of the scale, far above these.
# ---------------------------------------------------------------------------------------------
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24,
                 torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
ROUNDINGS = 4
SUM_SIGMAS = 8


def tolerance(dtype: torch.dtype, reduction: int = 1,
              compute: torch.dtype = torch.float32) -> tuple[float, float]:
    """(rtol, atol relative to the reference's largest magnitude) for a result stored in
    ``dtype``, computed in ``compute`` by chains of sums of ``reduction`` terms in all."""
    u = UNIT_ROUNDOFF[dtype]
    summed = SUM_SIGMAS * UNIT_ROUNDOFF[compute] * math.sqrt(max(1, reduction))
    return ROUNDINGS * u, ROUNDINGS * u + summed


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None,
                 reduction: int = 1, compute: torch.dtype = torch.float32,
                 equal_nan: bool = False) -> None:
    """``got`` against a high-precision reference ``want`` within ``tolerance`` (``dtype``:
    the precision ``got`` was stored in; default its own)."""
    rtol, atol = tolerance(got.dtype if dtype is None else dtype, reduction, compute)
    want = want.double()
    finite = want[torch.isfinite(want)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(scale, 1e-6),
                               equal_nan=equal_nan)


# A whole forward/backward or meta-step of the tiny test models (widths <= 64, intermediate
# <= 256, vocabularies <= 128, sequences <= 16, two layers, a few inner steps) computed two ways
# in fp32 (batched vs per task, kernels vs reference): at most about MODEL_SUMS sums on the
# chain behind one loss or weight, values of order one.
MODEL_SUMS = 1024
MODEL_TOL = {"rtol": tolerance(torch.float32, MODEL_SUMS)[1],
             "atol": tolerance(torch.float32, MODEL_SUMS)[1]}


# flash-attention's rule, for kernels whose precision is that of plain PyTorch at the same
# dtype: every element's error against the fp64 oracle within FACTOR times plain PyTorch's
# largest error, plus a floor (torch.testing's fp32 tolerances) for elements where PyTorch's
# error is zero by chance.
LIKE_TORCH_FACTOR = 2
FLOOR_ATOL, FLOOR_RTOL = 1e-5, 1.3e-6


def assert_close_like_torch(name, out, ref, oracle, dtype=None, factor=LIKE_TORCH_FACTOR):
    """``out`` (kernel) and ``ref`` (plain torch at the kernel's working precision) against the
    high-precision ``oracle``: every element of out within ``factor`` x torch's max error + the
    fp32 floor. ``out`` must have ``dtype`` (default: ref's). (Under the interpreter, bf16
    rounds as on a GPU: see ``metakernels/ops/_triton/__init__.py``.)"""
    want = ref.dtype if dtype is None else dtype
    assert out.dtype == want, f"{name}: dtype {out.dtype}, the torch backend gives {want}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, torch gives {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    oracle = oracle.double()
    torch_err = (ref.double() - oracle).abs().max().item()
    err = (out.double() - oracle).abs()
    bad = err > factor * torch_err + FLOOR_ATOL + FLOOR_RTOL * oracle.abs()
    assert not bad.any(), (f"{name} ({out.dtype}): max error {err.max().item():.3g} vs "
                           f"torch's {torch_err:.3g}; first bad element {bad.nonzero()[0].tolist()}")
