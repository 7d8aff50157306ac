"""The memory-lean RMSNorm / SwiGLU / rotary against Hugging Face's code: values, gradients
(first and second order) and the saved activations."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from metakernels import backend, fused
from metakernels.lora import inject
from metakernels.models import build_tiny_model

from conftest import MODEL_SUMS, assert_close, random_batch


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)


def _close(a, b, dtype, reduction=1):
    """Two computations at ``dtype`` (fp64 computed in fp64, the rest in fp32)."""
    assert_close(a, b, dtype, reduction, torch.float64 if dtype == torch.float64 else torch.float32)


def _hf_rotary(q, k, cos, sin):
    from transformers.models.llama import modeling_llama as m
    orig = getattr(m.apply_rotary_pos_emb, "_metakernels_original", m.apply_rotary_pos_emb)
    return orig(q, k, cos, sin)


BACKENDS = ["torch"] + (["cpu"] if backend.cpu_available() else [])


def _same_forward(y, y_ref, name, reduction=1):
    """The torch forms run the library's operations: bitwise. The cpu kernels (fp32) sum a row or
    take an exp in another order: within the rounding of sums of ``reduction`` terms (through a
    model: its chain of sums, where those differences propagate to values near zero)."""
    if name == "cpu" and y.dtype == torch.float32:
        assert_close(y, y_ref, reduction=reduction)
    else:
        assert torch.equal(y, y_ref)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 48)])
def test_rms_norm_matches_reference(dtype, shape, frozen, name):
    x = _rand(*shape, dtype=dtype).requires_grad_()
    w = _rand(shape[-1], dtype=dtype, seed=1).requires_grad_(not frozen)
    dy = _rand(*shape, dtype=dtype, seed=2)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(not frozen)
    with backend.use_backend(name):
        y = fused.rms_norm(x, w, 1e-6)
    y_ref = fused._rms_norm_ref(x2, w2, 1e-6)
    _same_forward(y, y_ref, name, reduction=shape[-1])
    y.backward(dy)
    y_ref.backward(dy)
    rows = x.numel() // shape[-1]
    _close(x.grad, x2.grad, dtype, reduction=2 * shape[-1])   # two sums over a row
    if not frozen:
        _close(w.grad, w2.grad, dtype, reduction=shape[-1] + rows)


def test_nonzero_weight_check_follows_in_place_edits():
    """The cached check of a norm weight is redone when the weight changes in place (a zero
    written into it, or loaded over it), so a norm never keeps its output for a weight with a
    zero."""
    w = _rand(24, seed=1)
    assert fused.nonzero_weight(w)
    w[3] = 0.0
    assert not fused.nonzero_weight(w)
    with torch.no_grad():
        w.copy_(_rand(24, seed=3))
    assert fused.nonzero_weight(w)
    assert not fused.nonzero_weight(torch.zeros(5))


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")
def test_rms_norm_keeps_its_output_under_the_cpu_kernels():
    """A frozen weight without zeros: the norm keeps y (and rstd), not x; a zero in the weight or
    a trainable weight: x. Either way the gradient is right, and a second-order gradient through
    a norm that kept y says what to do."""
    x = _rand(4, 5, 24).requires_grad_()
    dy = _rand(4, 5, 24, seed=2)
    for w, keeps_y in [(_rand(24, seed=1), True), (_rand(24, seed=1).index_fill(0, torch.tensor([3]), 0.0), False),
                       (_rand(24, seed=1).requires_grad_(), False)]:
        kept = []
        with backend.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(
                lambda t: kept.append(t) or t, lambda t: t):
            y = fused.rms_norm(x, w, 1e-6)
        assert any(t is y or t.data_ptr() == y.data_ptr() for t in kept) == keeps_y
        assert any(t.data_ptr() == x.data_ptr() for t in kept) != keeps_y
        x2 = x.detach().clone().requires_grad_()
        torch.autograd.backward(fused._rms_norm_ref(x2, w.detach(), 1e-6), dy)
        (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
        _close(dx, x2.grad, torch.float32, reduction=2 * x.shape[-1])
        if keeps_y:
            with pytest.raises(RuntimeError, match="second-order gradient .*use_backend"):
                torch.autograd.grad(y, x, dy, create_graph=True)


def test_fused_functions_gradcheck_first_and_second_order():
    x = _rand(3, 4, 10, dtype=torch.float64).requires_grad_()
    w = _rand(10, dtype=torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fused.rms_norm(a, b, 1e-5), (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: fused.rms_norm(a, b, 1e-5), (x, w))
    g = _rand(5, 9, dtype=torch.float64, seed=2).requires_grad_()
    u = _rand(5, 9, dtype=torch.float64, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(fused.swiglu, (g, u))
    assert torch.autograd.gradgradcheck(fused.swiglu, (g, u))
    q = _rand(2, 3, 5, 8, dtype=torch.float64, seed=4).requires_grad_()
    k = _rand(2, 1, 5, 8, dtype=torch.float64, seed=5).requires_grad_()
    cos, sin = _rand(2, 5, 8, dtype=torch.float64, seed=6), _rand(2, 5, 8, dtype=torch.float64,
                                                                  seed=7)
    assert torch.autograd.gradcheck(lambda a, b: fused.rotary(a, b, cos, sin), (q, k))
    assert torch.autograd.gradgradcheck(lambda a, b: fused.rotary(a, b, cos, sin), (q, k))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_and_rotary_match_hugging_face(dtype, name):
    g = _rand(6, 11, dtype=dtype).requires_grad_()
    u = _rand(6, 11, dtype=dtype, seed=1).requires_grad_()
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    with backend.use_backend(name):
        y = fused.swiglu(g, u)
        out = fused.rotary(q := _rand(2, 4, 7, 6, dtype=dtype, seed=3).requires_grad_(),
                           k := _rand(2, 2, 7, 6, dtype=dtype, seed=4).requires_grad_(),
                           cos := _rand(2, 7, 6, dtype=dtype, seed=5),
                           sin := _rand(2, 7, 6, dtype=dtype, seed=6))
    y_ref = F.silu(g2) * u2
    _same_forward(y, y_ref, name)
    dy = _rand(6, 11, dtype=dtype, seed=2)
    y.backward(dy)
    y_ref.backward(dy)
    _close(g.grad, g2.grad, dtype)
    _close(u.grad, u2.grad, dtype)

    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    ref = _hf_rotary(q2, k2, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))   # bitwise under both
    dq, dk = _rand(*q.shape, dtype=dtype, seed=7), _rand(*k.shape, dtype=dtype, seed=8)
    torch.autograd.backward(out, (dq, dk))
    torch.autograd.backward(ref, (dq, dk))
    _close(q.grad, q2.grad, dtype, reduction=2)
    _close(k.grad, k2.grad, dtype, reduction=2)


def _saved_bytes(fn, model, bank):
    """Bytes of the activations autograd saves while running ``fn`` (weights not counted)."""
    weights = {p.untyped_storage().data_ptr()
               for p in [*model.parameters(), *model.buffers(), bank.theta, bank.fast]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fused_model_equals_plain_model_and_saves_less(family, name):
    base = build_tiny_model(family, vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=72)
    plain = copy.deepcopy(base)
    counts = fused.apply_fused_layers(base)
    # A deep copy of a switched model runs its own weights (methods rebind to the copy).
    twin, plain_twin = copy.deepcopy(base), copy.deepcopy(plain)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), plain_twin.parameters()):
            p.mul_(1.5)
            q.mul_(1.5)
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), backend.use_backend(name):
        _same_forward(twin(input_ids=ids).logits, plain_twin(input_ids=ids).logits, name,
                      MODEL_SUMS)
        _same_forward(base(input_ids=ids).logits, plain(input_ids=ids).logits, name, MODEL_SUMS)
    # 2 layers x 7 projections + the output layer
    assert counts == {"rms_norm": 5, "swiglu": 2, "rotary": 2, "linear": 15}
    assert fused.apply_fused_layers(base) == {"rms_norm": 0, "swiglu": 0, "rotary": 0,
                                              "linear": 0}
    grads = []
    saved = []
    for m in (base, plain):
        bank = inject(m, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8, num_tasks=1)
        with torch.no_grad():
            bank.theta.copy_(_rand(bank.num_params, seed=9) * 0.1)
        batch = random_batch([3], 61, seed=3)
        with backend.use_backend(name), bank.activate(bank.theta.unsqueeze(0),
                                                      batch.token_layout):
            logits, nbytes = _saved_bytes(lambda: m(input_ids=batch.input_ids,
                                                    attention_mask=batch.attention_mask).logits,
                                          m, bank)
            loss = F.cross_entropy(logits.reshape(-1, 61), batch.labels.reshape(-1))
            grads.append((logits.detach(), torch.autograd.grad(loss, bank.theta)[0]))
        saved.append(nbytes)
    assert_close(grads[0][0], grads[1][0], reduction=MODEL_SUMS)
    assert_close(grads[0][1], grads[1][1], reduction=MODEL_SUMS)
    # SwiGLU no longer keeps silu(gate): one [rows, intermediate] fp32 tensor per layer less.
    # (RMSNorm and rotary already kept only what they need: autograd does not save the
    # operands of a product with a frozen factor.)
    rows = batch.input_ids.numel()
    swiglu = 2 * rows * 72 * 4
    if name == "torch":
        assert saved[1] - saved[0] == swiglu, saved
    else:
        # Under the cpu kernels the input norm keeps its output, which q/k/v keep anyway, instead
        # of its input: one [rows, hidden] per layer but the first, whose input (the frozen
        # embedding's output) needs no gradient. The attention kernel keeps k and v with their
        # own (fewer) heads, where SDPA keeps them repeated to q's heads (and its mask as
        # floats, not booleans).
        norm = (2 - 1) * rows * 32 * 4
        kv_heads = 2 * 2 * rows * (4 - 2) * 8 * 4
        assert saved[1] - saved[0] >= swiglu + norm + kv_heads, saved
    # The unpatched copy still ran the library's rotary function.
    from transformers.models.llama import modeling_llama as m
    assert not fused._fused_active()
    assert hasattr(m.apply_rotary_pos_emb, "_metakernels_original") or family != "llama"


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")
def test_cpu_kernels_of_the_fused_layers_match_their_torch_forms():
    """Under the cpu backend the fused layers run csrc/fused_layers.cpp (rotary, RMSNorm and
    SwiGLU, forward and backward) and csrc/attention.cpp (with the batch's padding mask): the same
    logits to fp32 rounding, the same adapter gradient, as under the torch backend."""
    from torch.profiler import ProfilerActivity, profile
    model = build_tiny_model("llama", vocab_size=61, hidden_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=88)
    fused.apply_fused_layers(model)
    bank = inject(model, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8, num_tasks=2)
    with torch.no_grad():
        bank.theta.copy_(_rand(bank.num_params, seed=4) * 0.1)
    batch = random_batch([3, 2], 61, seed=5)
    fast = bank.theta.detach().expand(2, -1).clone().requires_grad_()
    out = {}
    for name in ("cpu", "torch"):
        with profile(activities=[ProfilerActivity.CPU]) as prof, backend.use_backend(name), \
                bank.activate(fast, batch.token_layout):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = F.cross_entropy(logits.reshape(-1, 61), batch.labels.reshape(-1))
            out[name] = (logits.detach(), torch.autograd.grad(loss, fast)[0])
        calls = {e.key.split("::")[1]: e.count for e in prof.key_averages()
                 if e.key.startswith("metakernels::") and "lora" not in e.key}
        # per layer: rotary fwd + 2 bwd (q, k), attention fwd + bwd, SwiGLU fwd + bwd, 2 RMSNorm
        # fwd + bwd; the final norm; no backward for the first layer's input norm (the frozen
        # embedding's output needs no gradient)
        want = {"rotary_fwd": 2, "rotary_bwd": 4, "attention_fwd": 2, "attention_bwd": 2,
                "swiglu_fwd": 2, "swiglu_bwd": 2, "rms_norm_fwd": 5, "rms_norm_bwd": 4}
        assert calls == (want if name == "cpu" else {}), (name, calls)
    assert_close(out["cpu"][0], out["torch"][0], reduction=MODEL_SUMS)
    assert_close(out["cpu"][1], out["torch"][1], reduction=MODEL_SUMS)


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")
def test_attention_kernel_only_where_it_computes_what_sdpa_does():
    """Inside a switched attention, under the cpu backend, the library's "sdpa" function runs
    csrc/attention.cpp for a causal or boolean-masked prefill of at most ATTENTION_MAX_LEN; a
    float mask, a longer sequence, dropout in training, the torch backend or a call from outside
    a switched attention run the library's own function."""
    from torch.profiler import ProfilerActivity, profile
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    model = build_tiny_model("llama", vocab_size=61, hidden_size=32, num_layers=1, num_heads=4,
                             num_kv_heads=2, intermediate_size=40)
    fused.apply_fused_layers(model)
    attn = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert attn._metakernels_original is not None
    module = model.model.layers[0].self_attn

    def ran_kernel(L, mask=None, scope=True, name="cpu", dropout=0.0, training=False):
        q, k, v = (_rand(2, h, L, 8, seed=i).requires_grad_() for i, h in enumerate((4, 2, 2)))
        module.train(training)
        ctx = fused._fused_scope() if scope else contextlib.nullcontext()
        with profile(activities=[ProfilerActivity.CPU]) as prof, backend.use_backend(name), ctx:
            out, _ = attn(module, q, k, v, mask, dropout=dropout, scaling=0.35)
            out.sum().backward()
        want = F.scaled_dot_product_attention(
            q.detach(), k.detach().repeat_interleave(2, 1), v.detach().repeat_interleave(2, 1),
            attn_mask=mask, is_causal=mask is None, scale=0.35).transpose(1, 2)
        if not dropout:   # scores over 8, softmax and its product with v over L
            assert_close(out, want, reduction=8 + 2 * L)
        return any(e.key == "metakernels::attention_fwd" for e in prof.key_averages())

    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    assert ran_kernel(6) and ran_kernel(6, causal)
    assert not ran_kernel(6, torch.zeros(2, 1, 6, 6).masked_fill(~causal, float("-inf")))
    assert not ran_kernel(fused.ATTENTION_MAX_LEN + 1)
    assert not ran_kernel(6, scope=False)
    assert not ran_kernel(6, name="torch")
    assert not ran_kernel(6, dropout=0.5, training=True)
    assert ran_kernel(6, dropout=0.5, training=False)
