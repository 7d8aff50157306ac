import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from metakernels import Example, TaskLayout, backend, pack_tasks  # noqa: E402
from metakernels.ops import multi_lora_linear_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def _kernel_choices():
    """Kernel choices a test sets for the process (``backend.configure``, as the commands do)
    end with it."""
    saved = dict(backend._configured)
    yield
    backend._configured.clear()
    backend._configured.update(saved)


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
                 reduction: int = 1, compute: torch.dtype | None = None,
                 equal_nan: bool = False, magnitude: torch.Tensor | None = None) -> None:
    """``got`` against a high-precision reference ``want`` within ``tolerance`` (``dtype``:
    the precision ``got`` was stored in, default its own; ``compute``: fp64 for fp64, else
    fp32). The sums' error is relative to ``magnitude``, the same computation on the inputs'
    absolute values (the sums of |terms|, which bound what a summation order can change, also
    where the terms cancel); default: the reference itself, for results without cancellation."""
    dtype = got.dtype if dtype is None else dtype
    if compute is None:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
    rtol, atol = tolerance(dtype, reduction, compute)
    want = want.double()
    ref = want if magnitude is None else magnitude.double()
    finite = ref[torch.isfinite(ref)]
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


# ---------------------------------------------------------------------------------------------
# Backends, task layouts and inputs shared by the tests of the ops (tests/ops/)
# ---------------------------------------------------------------------------------------------
# torch and, where the extension is built, cpu; the public ops' tests add Triton under the
# interpreter where it runs (its kernels' own tests keep to small shapes: the interpreter is slow)
needs_cpu = pytest.mark.skipif(not backend.cpu_available(),
                               reason="the C++ extension metakernels._C is not built")
TRITON = backend.triton_available(torch.device("cpu"))
needs_triton = pytest.mark.skipif(not TRITON, reason="the Triton kernels run on CPU tensors only "
                                  "under TRITON_INTERPRET=1 with triton installed")
CPU_BACKENDS = ["torch"] + (["cpu"] if backend.cpu_available() else [])
OP_BACKENDS = CPU_BACKENDS + (["triton"] if backend.triton_available(torch.device("cpu")) else [])
# tasks x rows, as punica's tests: one task, single-row tasks, even, ragged with an empty task
LAYOUTS = {"1x7": [7], "7x1": [1] * 7, "3x3": [3, 3, 3], "ragged+empty": [4, 0, 1, 6]}
# the frozen GEMMs through ATen's mm, and through oneDNN where this PyTorch has it
ONEDNN = [False] + ([True] if torch.backends.mkldnn.is_available() else [])


def lora_inputs(sizes, in_f, out_f, r, dtype=torch.float32, bias=True, seed=0):
    """layout, x [N, in], W [out, in], b [out] (x's dtype), A [T, in, r], B [T, r, out] (fp32: the
    bank's) and an upstream gradient dy [N, out]: random, scaled so that products are of order one."""
    g = torch.Generator().manual_seed(seed)
    layout = TaskLayout.from_sizes(sizes)
    T, N = layout.num_tasks, layout.num_rows
    x = torch.randn(N, in_f, generator=g).to(dtype)
    W = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    A = torch.randn(T, in_f, r, generator=g) / in_f ** 0.5
    B = torch.randn(T, r, out_f, generator=g) / r ** 0.5
    dy = torch.randn(N, out_f, generator=g).to(dtype)
    return layout, x, W, b, A, B, dy


def mll_fp64_oracle(x, W, b, A, B, layout, scale, dy) -> dict:
    """multi_lora_linear's oracle: the differentiable reference in fp64 (the public op takes no
    fp64), its output and every gradient under the upstream gradient dy."""
    x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
    A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
    y64 = multi_lora_linear_ref(x64, W.double(), b64, A64, B64, layout, scale)
    y64.backward(dy.double())
    return {"y": y64.detach(), "x.grad": x64.grad, "b.grad": b64.grad, "dA": A64.grad,
            "dB": B64.grad}


def ce_inputs(sizes, d, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    h = torch.randn(N, d, generator=g).to(dtype)
    W = torch.randn(V, d, generator=g).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    if len(sizes) > 1 and sizes[-1] > 0:  # a task with rows but no targets
        labels[N - sizes[-1]:] = -100
    return h, W, labels


def rotary_inputs(B, H, L, D, batch_tables=False, seed=0):
    """q, k as transposed views of a [B, L, H, D] projection output (as Llama makes them), and
    cos/sin [B or 1, 1, L, D] (the second half of the table differs from the first, so that a
    kernel mixing up the halves fails)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, L, max(1, H - 1), D, generator=g).transpose(1, 2)
    angles = torch.rand(B if batch_tables else 1, 1, L, D, generator=g) * 6
    return q, k, angles.cos(), angles.sin()


def rms_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    weight = torch.rand(shape[-1], generator=g) + 0.5
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x, weight, rstd


def attention_inputs(B, H, Hkv, L, D, seed=0, contiguous=False):
    """q, k, v as transposed views of [B, L, heads, D] projection outputs (or contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, h, D, generator=g).transpose(1, 2) for h in (H, Hkv, Hkv))
    if contiguous:
        q, k, v = (t.contiguous() for t in (q, k, v))
    return q, k, v


def rand_tensor(*shape, dtype=torch.float32, seed=0):
    """Random fp64 numbers of mean 0.3, sd 1.5, cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)


def spy(monkeypatch, module, name):
    """Records the calls of ``module.name`` (proves the public op dispatched to the kernel)."""
    calls, fn = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def offsets(sizes):
    return TaskLayout.from_sizes(sizes).offsets_tensor()


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def ulps(got, want):
    """Largest distance in units in the last place (fp32) between two same-signed tensors."""
    a, b = got.view(torch.int32).long(), want.view(torch.int32).long()
    return int((a - b).abs().max()) if got.numel() else 0


# bf16: the kernels load bf16, compute in fp32 and round where the library's bf16 ops round
# (rotary: each product and the sum; RMSNorm: x * r, then the weight's product; SwiGLU: silu,
# then the product), so that their forwards are the library's bf16 forms to the last bit but for
# the row sum's order and the exp (at most 1 bf16 ulp); their backwards round once, from fp32.
def bf16_ulps(got, want):
    """Largest distance in bf16 units in the last place between two same-signed tensors."""
    a, b = got.view(torch.int16).long(), want.view(torch.int16).long()
    return int((a - b).abs().max()) if got.numel() else 0


def same_forward(y, y_ref, name, reduction=1):
    """The torch forms run the library's operations: bitwise. The cpu kernels (fp32) sum a row or
    take an exp in another order: within the rounding of sums of ``reduction`` terms (through a
    model: its chain of sums, where those differences propagate to values near zero)."""
    if name == "cpu" and y.dtype == torch.float32:
        assert_close(y, y_ref, reduction=reduction)
    else:
        assert torch.equal(y, y_ref)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): faster, and much faster on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def interrupted_at(monkeypatch, step: int):
    """The training run inside the block stops with a KeyboardInterrupt when it reaches
    ``step`` (after that step's checkpoint, if one is due), as a Ctrl-C there would."""
    from metakernels.trainer import Trainer

    real = Trainer.train_step

    def stop(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(Trainer, "train_step", real)


def train_run(tmp_path, args, *overrides, name="run"):
    """``python -m metakernels.train`` in this process with ``args`` and ``overrides``, in the run
    directory ``tmp_path / name``, which it returns; the command must succeed."""
    from metakernels import train

    assert train.main([*args, f"trainer.output_dir={tmp_path}", f"trainer.experiment_name={name}",
                       *overrides]) == 0
    return tmp_path / name


def resumed_and_unbroken(tmp_path, monkeypatch, args, step: int):
    """The run of ``args`` unbroken, and again stopped at ``step`` and resumed with
    ``trainer.resume=true``: (the unbroken run's newest checkpoint tensors, the resumed run's,
    the resumed run's directory)."""
    from metakernels.checkpoint import latest_checkpoint, load_checkpoint

    full = train_run(tmp_path, args, name="full")
    with interrupted_at(monkeypatch, step):
        train_run(tmp_path, args, name="broken")
    broken = train_run(tmp_path, args, "trainer.resume=true", name="broken")
    return (load_checkpoint(latest_checkpoint(full))[0],
            load_checkpoint(latest_checkpoint(broken))[0], broken)
