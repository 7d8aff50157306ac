"""The Triton kernels of the frozen base's layers (RMSNorm, SwiGLU, rotary) against the
plain-PyTorch references and the C++ kernels they mirror, under ``TRITON_INTERPRET=1``; and the
device guard of every Triton launcher.

Tolerance as in ``tests/test_triton_ops.py``: every element within twice the error of plain
PyTorch at the same dtype against an fp64 oracle, plus an fp32 rounding floor. Shapes are small
and odd (the interpreter is slow), with a hidden size above one column block and row counts
that leave a partial block.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from metakernels import TaskLayout, backend, fused  # noqa: E402
from metakernels.lora import inject  # noqa: E402
from metakernels.models import build_tiny_model  # noqa: E402
from metakernels.ops import _triton  # noqa: E402
from metakernels.ops.rms_norm import _rsqrt_mean_square, rms_norm_ref  # noqa: E402
from metakernels.ops.rotary import rotate  # noqa: E402

from conftest import MODEL_SUMS, assert_close, assert_close_like_torch, random_batch  # noqa: E402

pytestmark = pytest.mark.skipif(
    not backend.triton_available(torch.device("cpu")),
    reason="TRITON_INTERPRET is not 1: the Triton kernels cannot run on CPU tensors")

from metakernels.ops._triton import fused_update as tri_update  # noqa: E402
from metakernels.ops._triton import meta_reduce as tri_reduce  # noqa: E402
from metakernels.ops._triton import multi_lora_linear as tri_lora  # noqa: E402
from metakernels.ops._triton import rms_norm as tri_norm  # noqa: E402
from metakernels.ops._triton import rotary as tri_rotary  # noqa: E402
from metakernels.ops._triton import segment_cross_entropy as tri_ce  # noqa: E402
from metakernels.ops._triton import swiglu as tri_swiglu  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def _id(dtype):
    return str(dtype).split(".")[-1]


def _grads(fn, *inputs, upstream):
    """Outputs of ``fn(*inputs)`` (a tensor or a tuple) and the gradients of every input under
    the upstream gradients, by autograd on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, upstream)
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _cpp_op(name):
    """``torch.ops.metakernels.<name>`` when the C++ extension is built, else None."""
    return getattr(torch.ops.metakernels, name) if backend.cpu_available() else None


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------
# hidden sizes: odd, and above one 2048-column block (the row loops take two steps)
NORM_SHAPES = {"odd": (3, 5, 67), "two_blocks": (7, 2100)}
EPS = 1e-6


def _norm_inputs(shape, dtype, strided, device="cpu"):
    D = shape[-1]
    x = torch.randn(*shape[:-1], D + 3) * 3
    x = (x[..., 1:D + 1] if strided else x[..., :D].contiguous()).to(device, dtype)
    w = (torch.rand(D) + 0.5) * torch.where(torch.rand(D) < 0.5, -1.0, 1.0)
    return x, w.to(device, dtype)


def _library_rms_norm(x, w):
    """Hugging Face's RMSNorm as the library computes it (fp64 in fp64)."""
    return rms_norm_ref(x, w, EPS)


def check_rms_norm(shape, dtype, strided, device="cpu"):
    """Forward, backward from the input and from the output, against the library's RMSNorm at
    ``dtype`` and in fp64; on the CPU also the C++ kernels' dtypes, shapes and layouts."""
    x, w = _norm_inputs(shape, dtype, strided, device)
    dy = torch.randn(shape).to(device, dtype)
    y, rstd = tri_norm.rms_norm_fwd(x, w, EPS)
    (y_ref,), (dx_ref,) = _grads(lambda t: _library_rms_norm(t, w), x, upstream=dy)
    (y_or,), (dx_or,) = _grads(lambda t: _library_rms_norm(t, w.double()), x.double(),
                               upstream=dy.double())
    assert y.is_contiguous() and rstd.shape == shape[:-1] + (1,)
    assert_close_like_torch("y", y, y_ref, y_or)
    assert_close_like_torch("rstd", rstd, _rsqrt_mean_square(x, EPS)[1],
                            _rsqrt_mean_square(x.double(), EPS)[1], dtype=torch.float32)
    dx = tri_norm.rms_norm_bwd(dy, x, w, rstd)
    assert_close_like_torch("dx", dx, dx_ref, dx_or)
    # from the output: xhat = y / w. Plain PyTorch's budget at this dtype is the same backward
    # run on the rounded output (what a norm that keeps y instead of x computes from).
    dx_y = tri_norm.rms_norm_bwd(dy, y, w, rstd, True)
    w32 = w.float()
    xhat = y.float() / w32
    g = dy.float() * w32
    dx_y_ref = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(dtype)
    assert_close_like_torch("dx (x_is_output)", dx_y, dx_y_ref, dx_or)
    cpp_fwd, cpp_bwd = _cpp_op("rms_norm_fwd"), _cpp_op("rms_norm_bwd")
    if cpp_fwd is not None and x.device.type == "cpu":  # the C++ kernels' contract
        y_c, rstd_c = cpp_fwd(x, w, EPS)
        assert (y_c.dtype, y_c.shape, y_c.stride()) == (y.dtype, y.shape, y.stride())
        assert (rstd_c.dtype, rstd_c.shape) == (rstd.dtype, rstd.shape)
        for xo, inp in ((False, x), (True, y)):
            dx_c = cpp_bwd(dy, inp, w, rstd, xo)
            assert (dx_c.dtype, dx_c.shape, dx_c.stride()) == (dx.dtype, dx.shape, dx.stride())


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided_rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", list(NORM_SHAPES.values()), ids=list(NORM_SHAPES))
def test_rms_norm(shape, dtype, strided):
    check_rms_norm(shape, dtype, strided)


def test_rms_norm_rejects():
    x, w = _norm_inputs((3, 8), torch.float32, False)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        tri_norm.rms_norm_fwd(x.double(), w.double(), EPS)
    with pytest.raises(ValueError, match="weight must be"):
        tri_norm.rms_norm_fwd(x, w.bfloat16(), EPS)
    y, rstd = tri_norm.rms_norm_fwd(x, w, EPS)
    with pytest.raises(ValueError, match="one value per row"):
        tri_norm.rms_norm_bwd(y, x, w, rstd[:2])
    w0 = w.clone()
    w0[3] = 0
    with pytest.raises(ValueError, match="without zeros"):
        tri_norm.rms_norm_bwd(y, y, w0, rstd, True)


# ---------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------
SWIGLU_SHAPES = {"odd": (7, 37), "several_blocks": (3, 1100)}


def check_swiglu(shape, dtype, device="cpu"):
    gate, up, dy = (torch.randn(shape).mul(3).to(device, dtype) for _ in range(3))
    y = tri_swiglu.swiglu_fwd(gate, up)
    dgate, dup = tri_swiglu.swiglu_bwd(dy, gate, up)

    def library(g, u):
        return F.silu(g) * u
    (y_ref,), (dgate_ref, dup_ref) = _grads(library, gate, up, upstream=dy)
    (y_or,), (dgate_or, dup_or) = _grads(library, gate.double(), up.double(),
                                         upstream=dy.double())
    assert_close_like_torch("y", y, y_ref, y_or)
    assert_close_like_torch("dgate", dgate, dgate_ref, dgate_or)
    assert_close_like_torch("dup", dup, dup_ref, dup_or)
    cpp_fwd = _cpp_op("swiglu_fwd")
    if cpp_fwd is not None and gate.device.type == "cpu":
        assert cpp_fwd(gate, up).shape == y.shape
        assert [t.dtype for t in _cpp_op("swiglu_bwd")(dy, gate, up)] == [dtype, dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", list(SWIGLU_SHAPES.values()), ids=list(SWIGLU_SHAPES))
def test_swiglu(shape, dtype):
    check_swiglu(shape, dtype)


def test_swiglu_takes_strided_inputs():
    """Non-contiguous gate and up (halves of one [N, 2I] projection) give contiguous results."""
    gu = torch.randn(5, 2 * 19)
    gate, up = gu[:, :19], gu[:, 19:]
    torch.testing.assert_close(tri_swiglu.swiglu_fwd(gate, up), F.silu(gate) * up)
    with pytest.raises(ValueError, match="up must be like gate"):
        tri_swiglu.swiglu_fwd(gate, up[:4])


# ---------------------------------------------------------------------------------------------
# Rotary
# ---------------------------------------------------------------------------------------------
def _rotary_inputs(B, Hq, Hk, L, D, table_batch, dtype, device="cpu"):
    """q and k as transposed views of [B, L, H, D] projections (the layout attention gives
    them), cos/sin [table_batch, 1, L, D]."""
    q = torch.randn(B, L, Hq, D).to(device, dtype).transpose(1, 2)
    k = torch.randn(B, L, Hk, D).to(device, dtype).transpose(1, 2)
    angles = torch.randn(table_batch, 1, L, D // 2).repeat(1, 1, 1, 2) * 3
    return q, k, angles.cos().to(device, dtype), angles.sin().to(device, dtype)


# head sizes: 6 (a partial 64-wide half-block) and 130 (halves of 65: two steps of the loop);
# 30 and 28 q rows: a partial 16-row block
ROTARY_CASES = {"small_heads": (2, 3, 1, 5, 6, 2), "wide_heads_shared_table": (1, 4, 2, 7, 130, 1)}


def check_rotary(case, dtype, device="cpu"):
    q, k, cos, sin = _rotary_inputs(*case, dtype, device)
    dq, dk = (torch.randn(t.shape).to(device, dtype) for t in (q, k))
    q_out, k_out = tri_rotary.rotary_fwd(q, k, cos, sin)
    dq_in, dk_in = tri_rotary.rotary_bwd(dq, cos, sin), tri_rotary.rotary_bwd(dk, cos, sin)

    def library(c, s):
        return lambda a, b: (rotate(a, c, s), rotate(b, c, s))
    (q_ref, k_ref), (dq_ref, dk_ref) = _grads(library(cos, sin), q, k, upstream=(dq, dk))
    (q_or, k_or), (dq_or, dk_or) = _grads(library(cos.double(), sin.double()), q.double(),
                                          k.double(), upstream=(dq.double(), dk.double()))
    assert_close_like_torch("q_out", q_out, q_ref, q_or)
    assert_close_like_torch("k_out", k_out, k_ref, k_or)
    assert_close_like_torch("dq", dq_in, dq_ref, dq_or)
    assert_close_like_torch("dk", dk_in, dk_ref, dk_or)
    for out, x in ((q_out, q), (k_out, k), (dq_in, dq)):
        assert out.stride() == x.stride(), "the result must keep the input's memory layout"
    cpp_fwd = _cpp_op("rotary_fwd")
    if cpp_fwd is not None and q.device.type == "cpu":
        for mine, theirs in zip((q_out, k_out, dq_in),
                                (*cpp_fwd(q, k, cos, sin), _cpp_op("rotary_bwd")(dq, cos, sin))):
            assert (mine.dtype, mine.shape, mine.stride()) == (
                theirs.dtype, theirs.shape, theirs.stride())


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(ROTARY_CASES.values()), ids=list(ROTARY_CASES))
def test_rotary(case, dtype):
    check_rotary(case, dtype)


def test_rotary_table_with_strided_last_axis_and_rejects():
    q, k, cos, sin = _rotary_inputs(1, 2, 2, 3, 8, 1, torch.float32)
    cos_t = cos.transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride != 1
    torch.testing.assert_close(tri_rotary.rotary_fwd(q, k, cos_t, sin)[0],
                               rotate(q, cos, sin))
    with pytest.raises(ValueError, match="even head size"):
        tri_rotary.rotary_bwd(q[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="broadcastable"):
        tri_rotary.rotary_bwd(q, cos[:, :, :2], sin)


# ---------------------------------------------------------------------------------------------
# A model's switched layers under the triton backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_fused_model_runs_the_triton_kernels(dtype, monkeypatch):
    """A tiny Llama switched by ``apply_fused_layers``, with the triton backend forced: every
    RMSNorm, SwiGLU and rotary runs the Triton kernels, forward and backward, and the logits
    and the adapters' gradient are those of the torch backend (to fp32 rounding through the
    model's chain of sums; bf16: within twice the error of the bf16 torch backend against the
    same, bf16-rounded, model in fp32)."""
    model = build_tiny_model("llama", vocab_size=61, hidden_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=88)
    fused.apply_fused_layers(model)
    bank = inject(model, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8, num_tasks=2)
    with torch.no_grad():
        bank.theta.copy_(torch.randn(bank.num_params) * 0.1)
    batch = random_batch([3, 2], 61, seed=5)
    calls = {}
    for module in (tri_norm, tri_swiglu, tri_rotary):
        for name in ("rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd", "rotary_fwd",
                     "rotary_bwd"):
            if hasattr(module, name):
                def spy(*args, _fn=getattr(module, name), _name=name):
                    calls[_name] = calls.get(_name, 0) + 1
                    return _fn(*args)
                monkeypatch.setattr(module, name, spy)

    def run(name, m):
        fast = bank.theta.detach().expand(2, -1).clone().requires_grad_()
        with backend.use_backend(name), bank.activate(fast, batch.token_layout):
            logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = F.cross_entropy(logits.float().reshape(-1, 61), batch.labels.reshape(-1))
            return logits.detach().float(), torch.autograd.grad(loss, fast)[0]
    model.to(dtype).float()  # the weights rounded to dtype, so that fp32 sees the same model
    fp32 = run("torch", model)
    model.to(dtype)
    calls.clear()
    got = run("triton", model)
    # per layer: rotary fwd + 2 bwd (q, k), SwiGLU fwd + bwd, 2 RMSNorm fwd + bwd; the final
    # norm; no backward for the first layer's input norm (the embedding needs no gradient)
    assert calls == {"rotary_fwd": 2, "rotary_bwd": 4, "swiglu_fwd": 2, "swiglu_bwd": 2,
                     "rms_norm_fwd": 5, "rms_norm_bwd": 4}, calls
    if dtype == torch.float32:
        assert_close(got[0], fp32[0], reduction=MODEL_SUMS)
        assert_close(got[1], fp32[1], reduction=MODEL_SUMS)
    else:
        ref = run("torch", model)
        for what, g, r, o in zip(("logits", "adapter gradient"), got, ref, fp32):
            err, budget = (g - o).abs().max().item(), (r - o).abs().max().item()
            assert err <= 2 * budget, f"{what}: error {err:.3g}, the bf16 torch backend's {budget:.3g}"


# ---------------------------------------------------------------------------------------------
# The device guard of every launcher
# ---------------------------------------------------------------------------------------------
LAUNCHER_MODULES = (tri_update, tri_reduce, tri_lora, tri_ce, tri_norm, tri_swiglu, tri_rotary)


def test_every_launcher_is_guarded():
    """Every public function of a kernel module but ``launch_configs`` launches kernels: each
    must run under the device guard (triton launches on the current device)."""
    for module in LAUNCHER_MODULES:
        public = [name for name, fn in vars(module).items()
                  if callable(fn) and not name.startswith("_") and name != "launch_configs"
                  and getattr(fn, "__module__", None) == module.__name__]
        assert public, module.__name__
        for name in public:
            assert getattr(getattr(module, name), "device_guarded", False), (
                f"{module.__name__}.{name} launches without the device guard")


def test_device_context_of_a_cuda_tensor():
    ctx = _triton.device_context(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1


def test_launchers_enter_their_tensors_device(monkeypatch):
    """Each launch enters the guard with the device of its tensors (here the CPU, under the
    interpreter; on a GPU, ``cuda:1`` for tensors on ``cuda:1``)."""
    entered = []
    real = _triton.device_context

    def recording(device):
        entered.append(device)
        return real(device)
    monkeypatch.setattr(_triton, "device_context", recording)
    cpu = torch.device("cpu")
    x = torch.randn(4, 6)
    w = torch.rand(6) + 0.5
    y, rstd = tri_norm.rms_norm_fwd(x, w, EPS)
    tri_norm.rms_norm_bwd(x, x, w, rstd)
    tri_swiglu.swiglu_fwd(x, x)
    tri_swiglu.swiglu_bwd(x, x, x)
    q, k, cos, sin = _rotary_inputs(1, 2, 1, 3, 4, 1, torch.float32)
    tri_rotary.rotary_fwd(q, k, cos, sin)
    tri_rotary.rotary_bwd(q, cos, sin)
    layout = TaskLayout.from_sizes([2, 2])
    A, B = torch.randn(2, 6, 3), torch.randn(2, 3, 5)
    yl, xa = tri_lora.fwd(x, None, None, A, B, layout, 1.0)
    tri_lora.bwd(torch.randn_like(yl), x, None, A, B, xa, layout, 1.0, torch.zeros_like(A),
                 torch.zeros_like(B), True)
    tri_update.fused_update(torch.randn(2, 9), torch.randn(2, 9), torch.rand(2),
                            optimizer="sgd", state=None, max_grad_norm=0.0, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)
    tri_reduce.meta_reduce("fomaml", torch.randn(2, 9), torch.rand(2), None)
    tri_ce.fwd(x, torch.randn(11, 6), torch.randint(0, 11, (4,)), layout, 2)
    assert entered == [cpu] * 11
