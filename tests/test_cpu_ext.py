"""The C++ extension as registered ops: the schemas and fake implementations
(``torch.library.opcheck``) of every ``torch.ops.metakernels.*`` op, and the input checks of
every entry point. Each op's values are tested in ``tests/ops/test_<op>.py``, on every backend.
"""
import pytest
import torch

from metakernels import backend

_REASON = backend._load_cpu_extension()
if _REASON is not None:
    pytest.skip(f"the C++ extension metakernels._C is not available: {_REASON}",
                allow_module_level=True)

import metakernels._C  # noqa: E402
from metakernels.ops import AdamState  # noqa: E402
from conftest import (attention_inputs, ce_inputs, lora_inputs, offsets, rms_inputs,  # noqa: E402
                      rotary_inputs)

ops = torch.ops.metakernels


# ------------------------------------------------------------------------------ the extension
def test_built_with_openmp():
    assert metakernels._C.with_openmp


# ---------------------------------------------------------- input checks of the layer kernels
def test_fused_layer_kernels_reject_mixed_dtypes():
    x = torch.randn(4, 8).bfloat16()
    with pytest.raises(RuntimeError, match=r"weight must have dtype torch.bfloat16"):
        ops.rms_norm_fwd(x, torch.rand(8) + 0.5, 1e-6)
    with pytest.raises(RuntimeError, match=r"up must have dtype torch.bfloat16"):
        ops.swiglu_fwd(x, x.float())
    q, k, cos, sin = rotary_inputs(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match=r"cos must have dtype torch.bfloat16"):
        ops.rotary_fwd(q.bfloat16(), k.bfloat16(), cos, sin.bfloat16())
    with pytest.raises(RuntimeError, match=r"x must have dtype torch.float32 or torch.bfloat16"):
        ops.rms_norm_fwd(x.half(), torch.rand(8).half(), 1e-6)


def test_fused_layer_kernels_reject_bad_input():
    q, k, cos, sin = rotary_inputs(2, 3, 5, 6)
    with pytest.raises(RuntimeError, match="rotary_fwd: q must have dtype torch.float32"):
        ops.rotary_fwd(q.double(), k, cos, sin)
    with pytest.raises(RuntimeError, match="rotary_fwd: q must have an even head size"):
        ops.rotary_fwd(q[..., :5], k[..., :5], cos[..., :5], sin[..., :5])
    with pytest.raises(RuntimeError, match="rotary_bwd: cos must be broadcastable"):
        ops.rotary_bwd(q, cos[:, :, :4], sin)
    x, w, r = rms_inputs((4, 6))
    with pytest.raises(RuntimeError,
                       match=r"rms_norm_bwd: weight must be \[D\] with D == x.size\(-1\), i.e. \[6\]"):
        ops.rms_norm_bwd(torch.randn(4, 6), x, w[:5], r)
    with pytest.raises(RuntimeError, match="swiglu_bwd: up must be gate's shape"):
        ops.swiglu_bwd(torch.randn(4, 6), x, x[:3])
    with pytest.raises(RuntimeError, match="swiglu_fwd: up must be gate's shape"):
        ops.swiglu_fwd(x, x[:3])
    q, k, v = attention_inputs(2, 4, 2, 5, 6)
    with pytest.raises(RuntimeError, match=r"attention_fwd: q's heads \(4\) must be a multiple "
                                           r"of k's \(3\)"):
        ops.attention_fwd(q, *attention_inputs(2, 3, 3, 5, 6)[1:], None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"attention_fwd: mask must be \[B or 1, 1, Lq, Lk\]"):
        ops.attention_fwd(q, k, v, torch.ones(2, 1, 5, 4, dtype=torch.bool), True, 1.0)
    with pytest.raises(RuntimeError, match="attention_fwd: mask must have dtype torch.bool"):
        ops.attention_fwd(q, k, v, torch.ones(2, 1, 5, 5), True, 1.0)
    with pytest.raises(RuntimeError, match="attention_bwd: q must have a unit last stride"):
        ops.attention_bwd(q, q.transpose(2, 3), k, v, q, torch.zeros(2, 4, 5), None, True, 1.0)
    with pytest.raises(RuntimeError, match="rms_norm_fwd: x must have dtype torch.float32"):
        ops.rms_norm_fwd(x.double(), w, 1e-6)
    with pytest.raises(RuntimeError, match=r"rms_norm_fwd: weight must be \[D\]"):
        ops.rms_norm_fwd(x, w[:5], 1e-6)
    w0 = w.clone()
    w0[2] = 0
    with pytest.raises(RuntimeError, match=r"rms_norm_bwd: x_is_output needs a weight without "
                                           r"zeros .* weight\[2\] is 0"):
        ops.rms_norm_bwd(torch.randn(4, 6), x, w0, r, True)


# ------------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    sizes = [3, 0, 2, 4]
    off = offsets(sizes)
    _, x, W, b, A, B, dy = lora_inputs(sizes, 6, 5, 3)
    xa = ops.multi_lora_linear_fwd(x, W, b, A, B, off, 0.5)[1]
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    T, P = 4, 33
    fast, grad, lr = torch.randn(T, P), torch.randn(T, P), torch.rand(T)
    st = AdamState(torch.randn(T, P), torch.rand(T, P), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    h, Wv, labels = ce_inputs(sizes, 6, 11, torch.float32)
    return {
        "mll_fwd": (ops.multi_lora_linear_fwd, (rg(x), W, b, rg(A), rg(B), off, 0.5)),
        "mll_fwd_no_base": (ops.multi_lora_linear_fwd, (rg(x), None, None, rg(A), B, off, 0.5)),
        "mll_bwd": (ops.multi_lora_linear_bwd,
                    (rg(dy), x, W, A, B, xa, off, 0.5, torch.randn(A.shape), torch.randn(B.shape),
                     True)),
        "mll_bwd_no_dx": (ops.multi_lora_linear_bwd,
                          (rg(dy), x, None, A, B, xa, off, 0.5, torch.randn(A.shape),
                           torch.randn(B.shape), False)),
        # the schema's trailing arguments given: onednn off, the LoRA products batched
        "mll_fwd_batched": (ops.multi_lora_linear_fwd,
                            (rg(x), W, b, rg(A), rg(B), off, 0.5, False, False)),
        "mll_bwd_batched": (ops.multi_lora_linear_bwd,
                            (rg(dy), x, W, A, B, xa, off, 0.5, torch.randn(A.shape),
                             torch.randn(B.shape), True, False, False)),
        "sgd": (ops.fused_sgd_, (fast.clone(), rg(grad), lr, 1.0, 0.1)),
        "adam": (ops.fused_adam_, (fast.clone(), rg(grad), st.exp_avg, st.exp_avg_sq, st.step, lr,
                                   1.0, 0.9, 0.999, 1e-8, 0.1)),
        "fomaml": (ops.meta_reduce, (rg(fast), lr, fast.new_empty(0), 0)),
        "reptile": (ops.meta_reduce, (rg(fast), lr, torch.randn(P), 1)),
        "xent": (ops.segment_cross_entropy_fwd, (rg(h), Wv, labels, off, 2)),
        "xent_onednn": (ops.segment_cross_entropy_fwd, (rg(h), Wv, labels, off, 3, True)),
        "mll_fwd_onednn": (ops.multi_lora_linear_fwd, (rg(x), W, b, rg(A), rg(B), off, 0.5, True)),
        "mll_bwd_onednn": (ops.multi_lora_linear_bwd,
                           (rg(dy), x, W, A, B, xa, off, 0.5, torch.randn(A.shape),
                            torch.randn(B.shape), True, True)),
        "rotary_fwd": (ops.rotary_fwd, (rg(rotary_inputs(2, 3, 5, 6)[0]),
                                        *rotary_inputs(2, 3, 5, 6)[1:])),
        "rotary_bwd": (ops.rotary_bwd, (rg(rotary_inputs(2, 3, 5, 6)[0]),
                                        *rotary_inputs(2, 3, 5, 6)[2:])),
        "rms_norm_fwd": (ops.rms_norm_fwd, (rg(rms_inputs((3, 5, 7))[0]),
                                            rms_inputs((3, 5, 7))[1], 1e-6)),
        "rms_norm_bwd": (ops.rms_norm_bwd, (rg(torch.randn(3, 5, 7)), *rms_inputs((3, 5, 7)))),
        "rms_norm_bwd_y": (ops.rms_norm_bwd, (rg(torch.randn(3, 5, 7)), *rms_inputs((3, 5, 7)),
                                              True)),
        "swiglu_fwd": (ops.swiglu_fwd, (rg(torch.randn(4, 9)), torch.randn(4, 9))),
        "attention_fwd": (ops.attention_fwd, (rg(attention_inputs(2, 4, 2, 5, 6)[0]),
                                              *attention_inputs(2, 4, 2, 5, 6)[1:],
                                              torch.ones(2, 1, 5, 5, dtype=torch.bool).tril(),
                                              False, 0.5)),
        "attention_bwd": (ops.attention_bwd, (rg(torch.randn(2, 4, 5, 6)),
                                              *attention_inputs(2, 4, 2, 5, 6),
                                              torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5), None,
                                              True, 0.5)),
        "swiglu_bwd": (ops.swiglu_bwd, (rg(torch.randn(4, 9)), torch.randn(4, 9),
                                        torch.randn(4, 9))),
        # bf16: the statistics (rstd, lse) stay fp32, which the fake kernels must say too
        "rms_norm_fwd_bf16": (ops.rms_norm_fwd, (rg(rms_inputs((3, 5, 7))[0].bfloat16()),
                                                 rms_inputs((3, 5, 7))[1].bfloat16(), 1e-6)),
        "attention_fwd_bf16": (ops.attention_fwd,
                               (rg(attention_inputs(2, 4, 2, 5, 6)[0].bfloat16()),
                                *(t.bfloat16() for t in attention_inputs(2, 4, 2, 5, 6)[1:]),
                                None, True, 0.5)),
    }


_OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("case", list(_OPCHECK))
def test_opcheck(case):
    op, args = _OPCHECK[case]
    # Inputs that require grad: the op has an Autograd kernel (python/bindings.cpp)...
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))
    # ...whose outputs refuse a backward pass, so the tracing tests take plain inputs.
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, plain, test_utils=("test_schema", "test_faketensor",
                                                 "test_aot_dispatch_dynamic"))


def test_no_derivative_and_version_bump():
    """Called directly on inputs that require grad, the ops give outputs whose backward raises
    (never outputs silently cut from the graph); the tensors they write get a new version."""
    op, args = _OPCHECK["mll_fwd"]
    y, xa = op(*args)
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="derivative for metakernels::multi_lora_linear_fwd is "
                                           "not implemented"):
        y.sum().backward()
    with torch.no_grad():
        y, _ = op(*args)
    assert not y.requires_grad
    op, args = _OPCHECK["mll_bwd"]
    dA, dB = args[8], args[9]
    versions = dA._version, dB._version
    op(*args)
    assert dA._version > versions[0] and dB._version > versions[1]
    fast, grad, lr = torch.randn(2, 5), torch.randn(2, 5), torch.rand(2)
    v = fast._version
    ops.fused_sgd_(fast, grad, lr, 0.0, 0.0)
    assert fast._version > v
    with pytest.raises(RuntimeError, match="fused_sgd_: fast is written in place but requires grad"):
        ops.fused_sgd_(fast.requires_grad_(), grad, lr, 0.0, 0.0)


# ---------------------------------------------------------- input checks of every entry point
def _bad_input_cases():
    sizes = [3, 0, 2]
    off = offsets(sizes)
    _, x, W, b, A, B, dy = lora_inputs(sizes, 7, 5, 2)
    xa = ops.multi_lora_linear_fwd(x, W, b, A, B, off, 1.0)[1]
    dA, dB = torch.randn(A.shape), torch.randn(B.shape)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    fwd = lambda **kw: ops.multi_lora_linear_fwd(  # noqa: E731
        *[kw.get(k, v) for k, v in dict(x=x, W=W, b=b, A=A, B=B, offsets=off).items()], 1.0)
    bwd = lambda **kw: ops.multi_lora_linear_bwd(  # noqa: E731
        *[kw.get(k, v) for k, v in dict(dy=dy, x=x, W=W, A=A, B=B, xa=xa, offsets=off).items()],
        1.0, kw.get("dA", dA), kw.get("dB", dB), True)
    T, P = 3, 10
    fast, grad, lr = torch.randn(T, P), torch.randn(T, P), torch.rand(T)
    m, v, step = torch.zeros(T, P), torch.zeros(T, P), torch.zeros(T)
    sgd = lambda **kw: ops.fused_sgd_(  # noqa: E731
        kw.get("fast", fast), kw.get("grad", grad), kw.get("lr", lr), kw.get("max_norm", 1.0), 0.0)
    adam = lambda **kw: ops.fused_adam_(  # noqa: E731
        fast, grad, kw.get("exp_avg", m), kw.get("exp_avg_sq", v), kw.get("step", step), lr, 1.0,
        kw.get("beta1", 0.9), 0.999, kw.get("eps", 1e-8), 0.0)
    theta = torch.randn(P)
    red = lambda **kw: ops.meta_reduce(  # noqa: E731
        kw.get("x", fast), kw.get("weights", lr), kw.get("theta", theta), kw.get("kind", 1))
    h, Wv, labels = ce_inputs(sizes, 4, 9, torch.float32)
    ce = lambda **kw: ops.segment_cross_entropy_fwd(  # noqa: E731
        kw.get("h", h), kw.get("W", Wv), kw.get("labels", labels), kw.get("offsets", off),
        kw.get("chunk", 2))
    bad_labels = labels.clone()
    bad_labels[1] = 9
    return {
        # offsets, through each op that takes them
        "offsets non-monotone": (lambda: fwd(offsets=i32([0, 3, 2, 5])),
                                 r"multi_lora_linear_fwd: offsets must be non-decreasing, got "
                                 r"offsets\[1\]=3 > offsets\[2\]=2"),
        "offsets wrong length": (lambda: bwd(offsets=i32([0, 3, 5])),
                                 r"multi_lora_linear_bwd: offsets must have length T \+ 1 = 4"),
        "offsets[-1] != N": (lambda: fwd(offsets=i32([0, 3, 3, 4])),
                             r"offsets\[T\] must equal the number of rows N = 5, got offsets\[3\]=4"),
        "offsets[0] != 0": (lambda: ce(offsets=i32([1, 3, 3, 5])), r"offsets\[0\] must be 0"),
        "offsets dtype": (lambda: fwd(offsets=off.long()),
                          r"offsets must have dtype torch.int32, got shape \[4\], dtype torch.int64"),
        "offsets 2-D": (lambda: ce(offsets=off[None]), r"offsets must be 1-D"),
        # multi_lora_linear shapes and dtypes
        "A in": (lambda: fwd(A=A[:, :6]),
                 r"multi_lora_linear_fwd: A must be \[T, in, r\] with in == x.size\(1\), i.e. "
                 r"\[3, 7, 2\], got shape \[3, 6, 2\], dtype torch.float32"),
        "A dim": (lambda: fwd(A=A[0]), r"A must be 3-D \[T, in, r\], got shape \[7, 2\]"),
        "B r": (lambda: fwd(B=B[:, :1]), r"B must be \[T, r, out\]"),
        "B dtype": (lambda: fwd(B=B.double()), r"B must have dtype torch.float32, got .*float64"),
        "W shape": (lambda: fwd(W=W[:4]), r"W must be \[out, in\].*got shape \[4, 7\]"),
        "W dtype": (lambda: fwd(W=W.bfloat16()), r"W must have dtype torch.float32"),
        "b shape": (lambda: fwd(b=b[:3]), r"b must be \[out\]"),
        "b without W": (lambda: fwd(W=None), r"b is given without W"),
        "x dtype": (lambda: fwd(x=x.long()), r"x must have dtype torch.float32, torch.bfloat16 or"),
        "x dim": (lambda: fwd(x=x[None]), r"x must be 2-D \[N, in\]"),
        "dy shape": (lambda: bwd(dy=dy[:, :4]), r"multi_lora_linear_bwd: dy must be \[N, out\]"),
        "dy dtype": (lambda: bwd(dy=dy.double()), r"dy must have dtype torch.float32"),
        "xa shape": (lambda: bwd(xa=xa[:4]), r"xa must be \[N, r\]"),
        "dA shape": (lambda: bwd(dA=dA[:2]), r"dA must be \[T, in, r\]"),
        "dB dtype": (lambda: bwd(dB=dB.double()), r"dB must have dtype torch.float32"),
        # fused updates
        "sgd grad shape": (lambda: sgd(grad=grad[:, :9]),
                           r"fused_sgd_: grad must be \[T, P\] like fast, i.e. \[3, 10\], got "
                           r"shape \[3, 9\]"),
        "sgd fast contiguous": (lambda: sgd(fast=torch.randn(P, T).T),
                                r"fused_sgd_: fast must be contiguous"),
        "sgd fast dtype": (lambda: sgd(fast=fast.double()), r"fast must have dtype torch.float32"),
        "sgd lr shape": (lambda: sgd(lr=lr[:2]), r"lr must be \[T\]"),
        "sgd max norm": (lambda: sgd(max_norm=-1.0), r"max_grad_norm must be >= 0"),
        "adam exp_avg": (lambda: adam(exp_avg=m[:2]), r"fused_adam_: exp_avg must be \[T, P\]"),
        "adam exp_avg_sq": (lambda: adam(exp_avg_sq=v.half()), r"exp_avg_sq must have dtype"),
        "adam step": (lambda: adam(step=step[:1]), r"step must be \[T\]"),
        "adam beta1": (lambda: adam(beta1=1.0), r"beta1 must be in \[0, 1\)"),
        "adam eps": (lambda: adam(eps=0.0), r"eps must be > 0"),
        # meta_reduce
        "reduce kind": (lambda: red(kind=2), r"meta_reduce: kind must be 0 \(fomaml\) or 1"),
        "reduce weights": (lambda: red(weights=lr[:2]), r"weights must be \[T\]"),
        "reduce theta": (lambda: red(theta=theta[:9]), r"theta must be \[P\]"),
        "reduce theta fomaml": (lambda: red(kind=0), r"theta must be empty for kind 0"),
        "reduce x dtype": (lambda: red(x=fast.double()), r"x must have dtype torch.float32"),
        # segment_cross_entropy
        "ce W d": (lambda: ce(W=Wv[:, :3]), r"segment_cross_entropy_fwd: W must be \[V, d\]"),
        "ce W dtype": (lambda: ce(W=Wv.double()), r"W must have dtype torch.float32"),
        "ce labels dtype": (lambda: ce(labels=labels.int()), r"labels must have dtype torch.int64"),
        "ce labels shape": (lambda: ce(labels=labels[:4]), r"labels must be \[N\]"),
        "ce labels range": (lambda: ce(labels=bad_labels),
                            r"labels\[1\]=9 is neither -100 nor a class in \[0, V = 9\)"),
        "ce chunk": (lambda: ce(chunk=0), r"chunk_size must be >= 1"),
        "ce offsets length": (lambda: ce(offsets=i32([0])), r"offsets must have length T \+ 1 >= 2"),
    }


_BAD = _bad_input_cases()


@pytest.mark.parametrize("case", list(_BAD))
def test_rejects_bad_input(case):
    fn, message = _BAD[case]
    with pytest.raises(RuntimeError, match=message):
        fn()
