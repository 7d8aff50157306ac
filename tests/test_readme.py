"""The README's code is what a user pastes first: its Python runs, its commands exist."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_the_python_quick_start_runs(one_thread, capsys):
    blocks = _blocks("python")
    assert blocks, "README.md has no ```python block"
    for code in blocks:
        compile(code, "README.md", "exec")           # a reflowed block fails here
        exec(code, {"__name__": "__readme__"})
    lines = [l for l in capsys.readouterr().out.splitlines() if "meta loss" in l]
    assert len(lines) == 3, lines


@pytest.mark.parametrize("module", sorted(set(re.findall(r"python3 -m (metakernels(?:\.\w+)*)", README))))
def test_every_module_the_readme_names_exists(module):
    assert importlib.util.find_spec(module) is not None, f"README names `python3 -m {module}`"


@pytest.mark.parametrize("path", sorted(set(re.findall(r"\b(bench/[\w.]+\.(?:py|sh)|install\.sh)\b", README))))
def test_every_script_the_readme_names_exists(path):
    assert (ROOT / path).is_file(), f"README names {path}"
