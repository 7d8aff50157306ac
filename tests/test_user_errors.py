"""Every mistake in what train, evaluate, export and prepare are given, as a table: one line
``error: ...`` naming the setting or argument, exit status 2, before any work (no run
directory, no output written)."""
import json

import pytest
import torch

from metakernels import evaluate, export, prepare, train
from metakernels.data import build_char_tokenizer
from metakernels.models import build_tiny_model

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=1", "model.intermediate_size=64", "meta.meta_batch_size=2",
        "data.support_size=2", "data.query_size=2", "trainer.total_steps=1",
        "trainer.progress_bar=false", "trainer.loggers=[jsonl]", "trainer.eval_every=0"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Broken inputs: model directories missing a part, a file where a directory should be."""
    root = tmp_path_factory.mktemp("inputs")
    model = build_tiny_model(hidden_size=16, num_layers=1, num_heads=2, vocab_size=100)
    full = root / "model"
    model.save_pretrained(full)
    build_char_tokenizer().save_pretrained(full)
    no_tok = root / "model_no_tokenizer"
    model.save_pretrained(no_tok)
    no_weights = root / "model_no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((full / "config.json").read_text())
    build_char_tokenizer().save_pretrained(no_weights)
    bad_json = root / "model_bad_config"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    a_file = root / "a_file"
    a_file.write_text("x")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"r": 3, "lora_alpha": 6, "target_modules": ["q_proj"]}))
    from safetensors.torch import save_file
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.zeros(3, 32)}, str(adapter / "adapter_model.safetensors"))
    return {"full": full, "no_tok": no_tok, "no_weights": no_weights, "bad_json": bad_json,
            "file": a_file, "adapter": adapter, "root": root}


def _no_gpu(reason):
    return pytest.mark.skipif(torch.cuda.is_available(), reason=reason)


TRAIN_CASES = [
    ("data.max_length=1", ["data.max_length", ">= 2"]),
    ("model.target_modules=[nope]", ["model.target_modules", "nope", "q_proj"]),
    ("model.target_modules=[q_proj,nope]", ["model.target_modules", "['nope']"]),
    ("model.target_modules=zzz", ["model.target_modules", "zzz"]),
    ("model.path={bad_json}", ["model.path=", "config.json does not parse"]),
    ("model.path={no_weights}", ["model.path=", "no weights"]),
    ("model.path={no_tok}", ["model.path=", "no tokenizer"]),
    ("model.path={file}", ["model.path=", "no such directory"]),
    ("model.init_adapter={adapter}", ["model.init_adapter=", "r=3"]),
    ("model.init_adapter={root}", ["model.init_adapter=", "adapter_model.safetensors"]),
    pytest.param("trainer.device=cuda", ["trainer.device=cuda", "no CUDA GPU", "cpu"],
                 marks=_no_gpu("a GPU is present")),
    ("trainer.device=cuda:99", ["trainer.device=cuda:99"]),
    ("trainer.device=foo", ["trainer.device=foo", "not a device"]),
    ("trainer.device=mps", ["trainer.device=mps", "cpu or cuda"]),
    ("trainer.output_dir={file}", ["trainer.output_dir=", "a file is there"]),
    ("trainer.output_dir={file}/runs", ["trainer.output_dir=", "cannot be created"]),
    ("trainer.experiment_name=", ["trainer.experiment_name"]),
    ("meta.outer_lr=inf", ["meta.outer_lr", "finite"]),
    ("meta.inner_lr=nan", ["meta.inner_lr", "finite"]),
    ("meta.meta_batch_size=1000", ["meta.meta_batch_size=1000"]),
    ("data.support_size=10000", ["data.support_size", "distinct inputs"]),
    ("data.tasks={root}/none", ["data.tasks=", "no such directory"]),
    ("data.tasks=builtin:none", ["data.tasks", "unknown built-in suite"]),
    ("trainer.resume_changes=[meta.nope]", ["trainer.resume_changes", "meta.nope"]),
    ("trainer.loggers=[nope]", ["trainer.loggers"]),
    ("meta.algorithm=nope", ["meta.algorithm"]),
    ("--config={root}/none.yaml", ["config file", "none.yaml"]),
]


@pytest.mark.parametrize("arg,names", TRAIN_CASES)
def test_train_refuses(paths, tmp_path, capsys, arg, names):
    arg = arg.format(**paths)
    args = [*TINY, f"trainer.output_dir={tmp_path / 'runs'}"]
    args = ([arg.split("=", 1)[0], arg.split("=", 1)[1]] + args if arg.startswith("--")
            else args + [arg])
    assert train.main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], err
    assert not (tmp_path / "runs" / "default" / "checkpoints").exists()


@_no_gpu("triton runs on a GPU")
def test_train_refuses_the_triton_backend_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert train.main([*TINY, f"trainer.output_dir={tmp_path}", "trainer.backend=triton"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: trainer.backend=triton: cannot run on cpu") and \
        "trainer.backend=auto" in err
    assert not (tmp_path / "default").exists()


def test_a_model_directory_with_every_part_passes_the_checks(paths, tmp_path):
    assert train.main([*TINY, f"trainer.output_dir={tmp_path}", f"model.path={paths['full']}",
                       "data.max_length=48"]) == 0


EVALUATE_CASES = [
    (["--output-dir", "{file}"], ["--output-dir", "a file is there"]),
    (["--output-dir", "{file}/eval"], ["--output-dir", "cannot be created"]),
    (["--checkpoint", "{root}/none"], ["--checkpoint", "no such"]),
    (["--n-shots", "-1", "5"], ["--n-shots"]),
    (["--seeds", "0"], ["--seeds"]),
    (["--n-query", "0"], ["--n-query"]),
    (["--row-chunk", "-1"], ["--row-chunk"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--inner-steps", "-1"], ["--inner-steps"]),
    (["--inner-lr", "nan"], ["--inner-lr"]),
    (["--inner-max-grad-norm", "inf"], ["--inner-max-grad-norm"]),
    (["--baseline", "nameonly"], ["--baseline", "NAME=PATH"]),
    (["--baseline", "meta={root}"], ["--baseline", "'meta' is taken"]),
    (["--baseline", "sft={root}/none"], ["--baseline", "sft="]),
    (["--eval-tasks", "{root}/none"], ["--eval-tasks"]),
]


@pytest.mark.parametrize("extra,names", EVALUATE_CASES)
def test_evaluate_refuses(paths, tmp_path, capsys, monkeypatch, extra, names):
    from metakernels import few_shot

    monkeypatch.setattr(few_shot, "_build_base", lambda *a: pytest.fail("the model was built"))
    args = {"--checkpoint": str(paths["root"]), "--output-dir": str(tmp_path / "eval")}
    extra = [x.format(**paths) for x in extra]
    if extra[0] in args:
        args[extra[0]] = extra[1]
        extra = []
    argv = [x for kv in args.items() for x in kv] + extra
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for name in names:
        assert name in err, err
    assert not (tmp_path / "eval").exists()


def test_export_refuses_an_output_under_a_file(paths, capsys):
    assert export.main(["--checkpoint", str(paths["root"]), "--output",
                        str(paths["file"] / "adapter")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output") and "cannot be created" in err


PREPARE_CASES = [
    (["--input-dir", "{root}/none", "--output-dir", "{root}/out"], ["no such directory"]),
    (["--task-config", "{root}/none.json", "--output-dir", "{root}/out"], ["none.json"]),
    (["--input-dir", "{raw}", "--output-dir", "{file}/out"], ["--output-dir", "cannot be created"]),
    (["--input-dir", "{raw}", "--output-dir", "{root}/out", "--support-size", "0"],
     ["support_size"]),
]


@pytest.mark.parametrize("argv,names", PREPARE_CASES)
def test_prepare_refuses(paths, tmp_path, capsys, argv, names):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "t1.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n"
                                          for i in range(6)))
    argv = [x.format(raw=raw, **paths) for x in argv]
    assert prepare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for name in names:
        assert name in err, err
    assert not (paths["root"] / "out").exists()
