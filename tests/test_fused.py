"""Patching Hugging Face models with the layer ops (``metakernels.fused``): the patched model
against the plain one (logits, adapter gradients), what it saves for the backward, which kernels
run under which backend. The layer ops themselves: ``tests/ops/``."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from metakernels import TaskLayout, backend, fused
from metakernels.lora import inject
from metakernels.models import build_tiny_model

from conftest import CPU_BACKENDS, MODEL_SUMS, assert_close, rand_tensor, random_batch, same_forward


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


@pytest.mark.parametrize("name", CPU_BACKENDS)
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
        same_forward(twin(input_ids=ids).logits, plain_twin(input_ids=ids).logits, name,
                      MODEL_SUMS)
        same_forward(base(input_ids=ids).logits, plain(input_ids=ids).logits, name, MODEL_SUMS)
    # 2 layers x 7 projections + the output layer
    assert counts == {"rms_norm": 5, "swiglu": 2, "rotary": 2, "linear": 15}
    assert fused.apply_fused_layers(base) == {"rms_norm": 0, "swiglu": 0, "rotary": 0,
                                              "linear": 0}
    grads = []
    saved = []
    for m in (base, plain):
        bank = inject(m, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8, num_tasks=1)
        with torch.no_grad():
            bank.theta.copy_(rand_tensor(bank.num_params, seed=9) * 0.1)
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
        bank.theta.copy_(rand_tensor(bank.num_params, seed=4) * 0.1)
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
                 if e.key.startswith("metakernels::") and "lora" not in e.key
                 and "." not in e.key}   # the registered ops, not the profiler labels
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
        q, k, v = (rand_tensor(2, h, L, 8, seed=i).requires_grad_() for i, h in enumerate((4, 2, 2)))
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


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")
@pytest.mark.parametrize("switches,want_kernels", [
    (dict(swiglu=False, attention=False, linear=False), {"rms_norm_fwd", "rotary_fwd"}),
    (dict(rms_norm=False, rope=False), {"swiglu_fwd", "attention_fwd"}),
])
def test_each_kind_of_layer_has_its_switch(switches, want_kernels):
    """apply_fused_layers switches only the kinds of layer asked for: the others run the
    library's code (no kernel of theirs runs), and the logits stay the plain model's."""
    from torch.profiler import ProfilerActivity, profile
    model = build_tiny_model("llama", vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=40)
    plain = copy.deepcopy(model)
    counts = fused.apply_fused_layers(model, **switches)
    on = lambda name: switches.get(name, True)  # noqa: E731
    assert counts == {"rms_norm": 5 * on("rms_norm"), "swiglu": 2 * on("swiglu"),
                      "rotary": 2 * (on("rope") or on("attention")), "linear": 15 * on("linear")}
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), backend.use_backend("cpu"), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        got = model(input_ids=ids).logits
    ran = {e.key.split("::")[1] for e in prof.key_averages()
           if e.key.startswith("metakernels::") and "." not in e.key}
    assert ran == want_kernels
    assert_close(got, plain(input_ids=ids).logits, reduction=MODEL_SUMS)


@pytest.mark.skipif(not backend.cpu_available(), reason="needs the C++ extension")
def test_layer_kernels_off_runs_the_torch_forms():
    """The kernel choice layer_kernels=off: every layer op of a switched model runs its torch
    form under the cpu backend (the same logits), while the LoRA op still runs its kernel."""
    from torch.profiler import ProfilerActivity, profile
    model = build_tiny_model("llama", vocab_size=61, hidden_size=32, num_layers=1, num_heads=4,
                             num_kv_heads=2, intermediate_size=40)
    fused.apply_fused_layers(model)
    bank = inject(model, ["q_proj"], rank=2, alpha=4, num_tasks=1)
    ids = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(2))
    logits = {}
    for choice in ("on", "off"):
        with torch.no_grad(), backend.use_backend("cpu"), backend.use("layer_kernels", choice), \
                bank.activate(bank.theta[None], TaskLayout((0, 6))), \
                profile(activities=[ProfilerActivity.CPU]) as prof:
            logits[choice] = model(input_ids=ids).logits
        ran = {e.key.split("::")[1] for e in prof.key_averages()
               if e.key.startswith("metakernels::") and "." not in e.key}
        layer = {"rms_norm_fwd", "rotary_fwd", "attention_fwd", "swiglu_fwd"}
        assert ran == ({"multi_lora_linear_fwd"} | (layer if choice == "on" else set()))
    assert_close(logits["on"], logits["off"], reduction=MODEL_SUMS)
