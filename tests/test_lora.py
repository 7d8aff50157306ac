"""inject() on tiny random Llama, Qwen2, Mistral and GPT-2 models, against peft."""
import copy

import pytest
import torch

from metakernels import TaskLayout, backend
from metakernels.lora import MultiLoraLinear, get_bank, inject
from metakernels.meta import make_peft_model
from metakernels.meta.naive import PeftAdapterIO
from metakernels.models import build_tiny_model

from conftest import MODEL_TOL

BACKENDS = ["torch"] + (["cpu"] if backend.cpu_available() else [])
FAMILIES = {"llama": ["q_proj", "v_proj"], "qwen2": "all-linear", "mistral": ["o_proj", "down_proj"],
            "gpt2": ["c_attn", "c_proj", "c_fc"]}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_inject_matches_peft(family, backend_name):
    base = build_tiny_model(family, vocab_size=61, hidden_size=32, num_layers=2, num_heads=4)
    oracle = copy.deepcopy(base)
    bank = inject(base, FAMILIES[family], rank=4, alpha=12, num_tasks=1)
    assert get_bank(base) is bank
    assert all(not p.requires_grad for p in base.parameters())
    n_layers = sum(isinstance(m, MultiLoraLinear) for m in base.modules())
    assert n_layers == len(bank.slots) > 0
    if FAMILIES[family] == "all-linear":  # every linear but the output layer, as PEFT does
        assert n_layers == 7 * 2 and not any("lm_head" in s.name for s in bank.slots)
    with torch.no_grad():
        bank.theta.copy_(torch.randn_like(bank.theta) * 0.1)
    peft_model = make_peft_model(oracle, bank)
    PeftAdapterIO(peft_model, bank.slots).load(bank.theta.detach())
    ids = torch.randint(0, 61, (3, 9))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        with backend.use_backend(backend_name), bank.activate(bank.theta[None],
                                                              TaskLayout((0, 27))):
            got = base(input_ids=ids).logits
        plain = base(input_ids=ids).logits  # adapters off: the frozen base alone
    torch.testing.assert_close(got, want, **MODEL_TOL)
    assert not torch.allclose(plain, want, atol=1e-3)


def test_peft_state_dict_round_trip_and_init():
    base = build_tiny_model("llama", vocab_size=61, hidden_size=32, num_layers=1, num_heads=4)
    bank = inject(base, ["q_proj", "k_proj"], rank=3, alpha=6, num_tasks=2)
    assert bank.scale == 2.0
    s = bank.slots[0]
    a = bank.theta[s.a_slice]
    assert float(a.abs().max()) <= 1 / s.in_features ** 0.5 and float(a.std()) > 0
    assert float(bank.theta[s.b_slice].abs().max()) == 0  # lora_B starts at zero, as in PEFT
    with torch.no_grad():
        bank.theta.copy_(torch.randn_like(bank.theta))
    sd = bank.peft_state_dict()
    assert sd[f"base_model.model.{s.name}.lora_A.weight"].shape == (3, s.in_features)
    assert torch.equal(bank.flat_from_peft(sd), bank.theta.detach())
    with pytest.raises(KeyError, match="lora_B"):
        bank.flat_from_peft({k: v for k, v in sd.items() if "k_proj.lora_B" not in k})


def test_inject_errors_name_the_problem():
    base = build_tiny_model("llama", vocab_size=61, hidden_size=32, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="no linear module matches.*q_proj"):
        inject(base, ["nope"], rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        inject(base, ["q_proj"], rank=0)


def test_multitask_rows_use_their_own_adapter():
    """Rows of task t see only adapter t: running tasks together equals running each alone."""
    base = build_tiny_model("llama", vocab_size=61, hidden_size=32, num_layers=2, num_heads=4)
    bank = inject(base, "all-linear", rank=2, alpha=4, num_tasks=3)
    weights = torch.randn(3, bank.num_params) * 0.2
    ids = torch.randint(0, 61, (5, 7))
    layout = TaskLayout.from_sizes([2, 0, 3])
    with torch.no_grad():
        with bank.activate(weights, layout.repeat_rows(7)):
            together = base(input_ids=ids).logits
        for t, s, e in layout.segments():
            if e > s:
                with bank.activate(weights[t:t + 1], TaskLayout((0, (e - s) * 7))):
                    alone = base(input_ids=ids[s:e]).logits
                torch.testing.assert_close(together[s:e], alone, **MODEL_TOL)
