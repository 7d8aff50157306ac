"""The package's shape: commands over library modules, one error type, one adapter layout."""
import ast
from pathlib import Path

import pytest
import torch

import metakernels
from metakernels.bank import (adapter_meta, check_adapter_meta, flat_from_peft, layout_slots,
                              peft_state_dict)
from metakernels.errors import UserError

PACKAGE = Path(metakernels.__file__).parent
COMMANDS = {"metakernels.train", "metakernels.evaluate", "metakernels.export",
            "metakernels.prepare", "metakernels.__main__"}


def _imports(path: Path) -> set[str]:
    """The metakernels modules ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("metakernels")}


def test_no_library_module_imports_a_command():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module in COMMANDS:
            continue
        bad = _imports(path) & COMMANDS
        if bad:
            offenders[module] = sorted(bad)
    assert not offenders, offenders


def test_the_error_type_and_the_checkpoint_need_no_cli():
    assert _imports(PACKAGE / "errors.py") == set()
    assert "metakernels.cli" not in _imports(PACKAGE / "checkpoint.py")
    from metakernels.config import ConfigError
    from metakernels.data.loader import DataError
    assert issubclass(ConfigError, UserError) and issubclass(DataError, UserError)


def test_evaluate_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
    """A ValueError from inside the library is a bug, not a user mistake: it is not turned into
    an ``error:`` line (that would hide it)."""
    from metakernels import evaluate

    def broken(*a, **k):
        raise ValueError("internal shape mismatch")

    monkeypatch.setattr(evaluate, "load_setup", broken)
    with pytest.raises(ValueError, match="internal shape mismatch"):
        evaluate.main(["--checkpoint", str(tmp_path), "--output-dir", str(tmp_path / "e")])


def test_the_peft_form_of_the_layout_round_trips():
    """A as [in, r] and B as [r, out] in the bank, [r, in] and [out, r] in PEFT."""
    slots = layout_slots([("a.q_proj", 5, 3), ("a.v_proj", 3, 7)], rank=2)
    theta = torch.randn(sum(s.numel for s in slots))
    sd = peft_state_dict(theta, slots)
    A = theta[slots[1].a_slice].view(3, 2)
    B = theta[slots[1].b_slice].view(2, 7)
    assert torch.equal(sd["base_model.model.a.v_proj.lora_A.weight"], A.T)
    assert torch.equal(sd["base_model.model.a.v_proj.lora_B.weight"], B.T)
    assert torch.equal(flat_from_peft(sd, slots), theta)


def test_checkpoint_layout_metadata_is_checked_against_the_bank():
    from metakernels.lora import inject
    from metakernels.models import build_tiny_model

    bank = inject(build_tiny_model(hidden_size=16, num_layers=1, num_heads=2),
                  ["q_proj", "v_proj"], rank=2, alpha=4.0)
    meta = adapter_meta(bank)
    check_adapter_meta(bank, meta, "ckpt")
    other = dict(meta, rank=4)
    with pytest.raises(UserError, match="do not match the rebuilt bank"):
        check_adapter_meta(bank, other, "ckpt")
    with pytest.raises(UserError, match="no adapter layout"):
        check_adapter_meta(bank, {}, "ckpt")
