"""A mistake in what a command is given is one line, ``error: ...`` naming the setting, and exit
status 2, before any model is built; a bug keeps its traceback."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from metakernels.checkpoint import save_checkpoint
from metakernels.cli import UserError, command


def _run(cwd, module, *args):
    proc = subprocess.run([sys.executable, "-m", f"metakernels.{module}", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def _assert_user_error(rc, err, *names):
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for name in names:
        assert name in errors[0], err


@pytest.fixture
def bad_data(tmp_path):
    """A task directory whose support file has a row without a response."""
    task = tmp_path / "data" / "t1"
    task.mkdir(parents=True)
    (task / "support.jsonl").write_text('{"prompt": "ab", "response": "ba"}\n{"prompt": "cd"}\n')
    (task / "query.jsonl").write_text('{"prompt": "ab", "response": "ba"}\n')
    return tmp_path / "data"


@pytest.mark.parametrize("override,names", [
    ("model.path={tmp}/nonexistent", ["model.path=", "no such directory", "model.path=null"]),
    ("model.path={tmp}", ["model.path=", "no config.json", "model.path=null"]),
    ("model.init_adapter={tmp}", ["model.init_adapter=", "adapter_model.safetensors"]),
    ("data.tasks={tmp}/nonexistent", ["data.tasks=", "no such directory", "data.tasks=builtin"]),
    ("data.tasks={tmp}/data", ["data.tasks=", "support.jsonl row 2", "'response' missing"]),
    ("model.no_such_key=1", ["model.no_such_key", "unknown key"]),
])
def test_train_user_errors(tmp_path, bad_data, override, names):
    rc, err = _run(tmp_path, "train", override.format(tmp=tmp_path),
                   f"trainer.output_dir={tmp_path / 'runs'}")
    _assert_user_error(rc, err, *names)
    assert not (tmp_path / "runs").exists()  # it stopped before the run began


def test_export_user_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.randn(3)}, str(foreign))
    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    cases = [
        (["--checkpoint", tmp_path / "nonexistent", "--output", tmp_path / "out"],
         ["--checkpoint", "no such run directory or checkpoint"]),
        (["--checkpoint", empty_run, "--output", tmp_path / "out"],
         ["--checkpoint", "no complete checkpoint"]),
        (["--checkpoint", garbage, "--output", tmp_path / "out"],
         ["--checkpoint", "not a readable checkpoint"]),
        (["--checkpoint", foreign, "--output", tmp_path / "out"],
         ["--checkpoint", "not a checkpoint of python -m metakernels.train"]),
        (["--checkpoint", garbage, "--output", garbage],
         ["--output", "a file is there, not a directory"]),
        (["--checkpoint", garbage, "--output", garbage / "adapter"],
         ["--output", "is a file, so the directory cannot be created"]),
    ]
    for args, names in cases:
        rc, err = _run(tmp_path, "export", *args)
        _assert_user_error(rc, err, *names)
    assert not (tmp_path / "out").exists()


def test_export_writes_a_valid_checkpoint(tmp_path):
    """The checks let a real checkpoint through (a bank of one 4 -> 3 module at rank 2)."""
    slots = [["model.layers.0.self_attn.q_proj", 4, 3]]
    meta = {"config": {"model": {"path": None, "family": "llama"}}, "slots": slots,
            "rank": 2, "alpha": 4.0}
    save_checkpoint(tmp_path / "run", 1, {"theta": torch.randn(4 * 2 + 2 * 3)}, meta)
    rc, err = _run(tmp_path, "export", "--checkpoint", tmp_path / "run", "--output",
                   tmp_path / "adapter")
    assert rc == 0, err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_evaluate_bad_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    rc, err = _run(tmp_path, "evaluate", "--checkpoint", garbage, "--output-dir",
                   tmp_path / "eval")
    _assert_user_error(rc, err, str(garbage), "not a readable checkpoint")


def test_command_reports_user_errors_and_keeps_tracebacks(capsys):
    @command
    def user_mistake(argv=None):
        raise UserError("data.tasks=x: no such directory")

    @command
    def bug(argv=None):
        raise RuntimeError("internal")

    assert user_mistake([]) == 2
    assert capsys.readouterr().err == "error: data.tasks=x: no such directory\n"
    with pytest.raises(RuntimeError, match="internal"):
        bug([])
