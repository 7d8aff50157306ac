"""Run configuration: YAML files plus dotted ``key=value`` overrides, checked before anything
is loaded. Unknown keys, wrong types and impossible values are rejected with the key's name."""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key."""


@dataclass
class ModelConfig:
    path: Union[str, None] = None          # a local Hugging Face causal LM; None: a tiny model
    # a GGUF checkpoint file instead of model.path, dequantized to model.dtype (needs gguf)
    gguf_file: Union[str, None] = None
    family: str = "llama"                  # the tiny model's architecture (no download)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    # std of the tiny model's random weights; HF's 0.02 caps a frozen random output layer's
    # logits at about +-2.5, too flat for any adapter to fit the tasks (loss stuck near 4.0)
    initializer_range: float = 0.1
    dtype: str = "float32"
    attn_implementation: str = "sdpa"      # maml switches to "eager" (needs a double backward)
    trust_remote_code: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    init_adapter: Union[str, None] = None  # a PEFT adapter directory to start theta from
    # Llama-family RMSNorm/SwiGLU/rotary as autograd functions that keep only what a frozen
    # base's backward needs (metakernels/fused.py); same forward values as the library's
    fused_layers: bool = True


@dataclass
class DataConfig:
    # "builtin" (the default built-in suite), "builtin:<suite>" (metakernels/data/tasks.py,
    # SUITES) or a directory written by metakernels.prepare
    tasks: str = "builtin"
    support_size: int = 8
    query_size: int = 8
    max_length: int = 48
    truncation: str = "error"              # error | left | right
    prompt_key: str = "prompt"
    response_key: str = "response"
    apply_chat_template: bool = False
    skip_bad_rows: bool = False


@dataclass
class MetaConfig:
    algorithm: str = "fomaml"              # fomaml | maml | reptile | multitask | naive_fomaml
    meta_batch_size: int = 8
    num_inner_steps: int = 3
    # 0.3 overshoots: three steps at 0.3 raise the held-out query loss of a trained init above
    # its loss at theta, and the first-order meta-gradient, taken that far from theta, then
    # pushes theta away (docs/evaluation.md, "Outer-loop stability")
    inner_lr: float = 0.1
    inner_optimizer: str = "sgd"           # sgd | adam
    # per-task clip of each inner step's gradient: from an init not shaped for it (multitask
    # SFT), an unclipped step at inner_lr can blow a task's loss up, and which draws do is luck
    inner_max_grad_norm: float = 5.0
    outer_lr: float = 3e-3                 # 1e-2 undoes the held-out gains in spikes
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"            # cosine | constant
    task_sampling: str = "uniform"         # uniform | loss
    # run a meta-batch's tasks in chunks of this many; 0: all; auto: the largest chunk whose
    # activations fit meta.memory_budget_mb (metakernels/meta/chunked.py, ChunkPlanner)
    task_chunk: Union[int, str] = 0
    memory_budget_mb: float = 0.0
    # fixed | per_layer_step | per_parameter: learned inner rates (metakernels/meta/inner_lr.py),
    # each starting at inner_lr, stepped by the outer optimizer beside theta
    inner_lr_mode: str = "fixed"
    # MAML++'s multi-step loss: the query loss after every inner step, its weights moved from
    # uniform onto the last step over multi_step_loss_steps outer steps
    multi_step_loss: bool = False
    multi_step_loss_steps: int = 100


@dataclass
class TrainerConfig:
    # the held-out loss of the default run is flat from step 150 on; a longer run over-fits the
    # training letters a little (docs/evaluation.md)
    total_steps: int = 200
    seed: int = 0
    output_dir: str = "runs"
    experiment_name: str = "default"
    log_every: int = 10
    save_every: int = 50
    resume: bool = False
    # a new run in a directory that holds another run's checkpoints or metrics replaces them
    # (otherwise the run refuses the directory)
    overwrite: bool = False
    # settings a resumed run may change from the checkpoint's besides those that never change
    # the training (docs/usage.md, "Resuming")
    resume_changes: list[str] = field(default_factory=list)
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    backend: str = "auto"                  # auto | torch | cpu | triton
    gemm: str = "auto"                     # auto | onednn | blas (the cpu backend's frozen GEMMs)
    device: str = "cpu"
    max_nonfinite_steps: int = 5
    progress_bar: bool = True
    # under torchrun: the frozen base's parameters sharded over the processes with FSDP2
    # (each holds 1/N of them), the tasks still split (metakernels/distributed.py)
    shard_base: bool = False
    # under torchrun: seconds a process waits for the others in a collective before the run
    # fails naming the process that did not come (metakernels/distributed.py)
    collective_timeout_s: float = 600.0
    # held-out validation: every eval_every steps (and at the first and last), each held-out
    # task adapts from theta on eval_shots fixed support examples (eval_seeds draws) and is
    # scored on eval_query_size fixed query examples; 0 turns it off
    eval_every: int = 25
    eval_shots: int = 5
    eval_seeds: int = 2
    eval_query_size: int = 16


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.output_dir) / self.trainer.experiment_name


# names the seeds use for the same settings
ALIASES = {"meta.meta_lr": "meta.outer_lr", "meta.inner_steps": "meta.num_inner_steps"}
CHOICES = {
    "model.family": ("llama", "qwen2", "mistral", "gpt2"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager"),
    "data.truncation": ("error", "left", "right"),
    "meta.algorithm": ("fomaml", "maml", "reptile", "multitask", "naive_fomaml"),
    "meta.inner_optimizer": ("sgd", "adam"),
    "meta.lr_schedule": ("cosine", "constant"),
    "meta.task_sampling": ("uniform", "loss"),
    "meta.inner_lr_mode": ("fixed", "per_layer_step", "per_parameter"),
    "trainer.backend": ("auto", "torch", "cpu", "triton"),
    "trainer.gemm": ("auto", "onednn", "blas"),
}
LOGGERS = ("console", "jsonl", "tensorboard", "wandb")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """``value`` as type ``tp`` or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
                    return None
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # a CLI override such as [q_proj,v_proj]
            value = yaml.safe_load(value) if value.startswith("[") else None
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


# Settings that name a file or directory: a leading ``~`` is the user's home.
PATH_KEYS = frozenset({"model.path", "model.gguf_file", "model.init_adapter", "data.tasks",
                       "trainer.output_dir"})


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cfg: Config, key: str, value: Any) -> None:
    key = ALIASES.get(key, key)
    parts = key.split(".")
    if len(parts) != 2:
        sections = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ConfigError(f"{key}: keys are <section>.<name>, sections: {sections}")
    section, name = parts
    if section not in {f.name for f in dataclasses.fields(Config)}:
        raise ConfigError(f"{key}: unknown section {section!r}; sections: "
                          f"{', '.join(f.name for f in dataclasses.fields(Config))}")
    obj = getattr(cfg, section)
    types = _section_types(type(obj))
    if name not in types:
        raise ConfigError(f"{key}: unknown key; {section} has {', '.join(sorted(types))}")
    value = _coerce(key, value, types[name])
    if key in PATH_KEYS and isinstance(value, str) and value.startswith("~"):
        value = os.path.expanduser(value)   # as a shell would: configs are shared across homes
    setattr(obj, name, value)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "." not in key:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The default config, updated by the YAML file at ``path`` and then by ``key=value``
    overrides (values parsed as YAML scalars), then validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for key, value in _flatten(data):
            try:
                _apply(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> None:
    """Applies dotted ``key=value`` overrides (values parsed as YAML scalars) in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. meta.inner_lr=0.1)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        _apply(cfg, key.strip(), value)


def config_from_dict(d: dict, overrides: Sequence[str] = ()) -> Config:
    """The Config a checkpoint was trained with (its metadata ``config``), then ``overrides``.
    Keys this version does not know are skipped with a warning (an older checkpoint)."""
    import warnings

    cfg = Config()
    for key, value in _flatten(d):
        try:
            _apply(cfg, key, value)
        except ConfigError as e:
            warnings.warn(f"checkpoint config: {e}; the key is ignored")
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def setting_names(cfg: Config) -> list[str]:
    """Every ``section.name`` of the config."""
    return [f"{sec.name}.{f.name}" for sec in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, sec.name))]


def validate(cfg: Config) -> None:
    """Rejects impossible values before any model or data is loaded."""
    for key in setting_names(cfg):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")
    m, d, me, tr = cfg.model, cfg.data, cfg.meta, cfg.trainer
    positive = {"model.lora_rank": m.lora_rank, "model.hidden_size": m.hidden_size,
                "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
                "model.num_kv_heads": m.num_kv_heads, "model.intermediate_size": m.intermediate_size,
                "model.lora_alpha": m.lora_alpha, "data.support_size": d.support_size,
                "data.query_size": d.query_size, "data.max_length": d.max_length,
                "meta.meta_batch_size": me.meta_batch_size, "meta.inner_lr": me.inner_lr,
                "meta.outer_lr": me.outer_lr, "trainer.total_steps": tr.total_steps,
                "trainer.log_every": tr.log_every, "trainer.save_every": tr.save_every,
                "trainer.eval_seeds": tr.eval_seeds, "trainer.eval_query_size": tr.eval_query_size,
                "trainer.collective_timeout_s": tr.collective_timeout_s}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    non_negative = {"meta.num_inner_steps": me.num_inner_steps,
                    "meta.inner_max_grad_norm": me.inner_max_grad_norm,
                    "meta.weight_decay": me.weight_decay, "meta.max_grad_norm": me.max_grad_norm,
                    "meta.warmup_steps": me.warmup_steps,
                    "meta.memory_budget_mb": me.memory_budget_mb,
                    "meta.multi_step_loss_steps": me.multi_step_loss_steps,
                    "trainer.max_nonfinite_steps": tr.max_nonfinite_steps,
                    "trainer.eval_every": tr.eval_every, "trainer.eval_shots": tr.eval_shots}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if me.task_chunk == "auto":
        if not me.memory_budget_mb > 0:
            raise ConfigError("meta.task_chunk=auto: give the activation memory a step may take "
                              "as meta.memory_budget_mb (MB, > 0)")
        if tr.shard_base:
            raise ConfigError("meta.task_chunk=auto: trainer.shard_base needs the same chunks "
                              "in every process; give meta.task_chunk a number")
    elif isinstance(me.task_chunk, str) or me.task_chunk < 0:
        raise ConfigError(f"meta.task_chunk: {me.task_chunk!r} is neither a number >= 0 nor "
                          f"auto")
    elif me.memory_budget_mb:
        raise ConfigError("meta.memory_budget_mb is read only with meta.task_chunk=auto; set "
                          "both, or neither")
    if m.gguf_file is not None and m.path is not None:
        raise ConfigError("model.path and model.gguf_file both set: give one (a Hugging Face "
                          "directory or a GGUF file)")
    if not math.isfinite(tr.collective_timeout_s):
        raise ConfigError(f"trainer.collective_timeout_s: must be a finite number of seconds, "
                          f"got {tr.collective_timeout_s}")
    if d.max_length < 2:
        raise ConfigError(f"data.max_length: must be >= 2 (a prompt token and a response "
                          f"token), got {d.max_length}")
    if tr.experiment_name.strip() in ("", ".", ".."):
        raise ConfigError(f"trainer.experiment_name: {tr.experiment_name!r} names no run "
                          f"directory under trainer.output_dir; give a name, e.g. default")
    if not 0.0 <= m.lora_dropout < 1.0:
        raise ConfigError(f"model.lora_dropout: must be in [0, 1), got {m.lora_dropout}")
    if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size}, model.num_heads={m.num_heads}, "
                          f"model.num_kv_heads={m.num_kv_heads}: hidden_size must divide by "
                          f"num_heads and num_heads by num_kv_heads")
    if d.tasks.startswith("builtin:"):
        from .data.tasks import SUITES
        if d.tasks.split(":", 1)[1] not in SUITES:
            raise ConfigError(f"data.tasks: unknown built-in suite {d.tasks!r}; choose from "
                              f"{', '.join('builtin:' + n for n in SUITES)}")
    if isinstance(m.target_modules, list) and not m.target_modules:
        raise ConfigError("model.target_modules: empty list; give module names or 'all-linear'")
    unknown = [k for k in tr.resume_changes if ALIASES.get(k, k) not in setting_names(cfg)]
    if unknown:
        raise ConfigError(f"trainer.resume_changes: unknown settings {unknown}; give "
                          f"section.name keys, e.g. [meta.inner_lr]")
    tr.resume_changes = [ALIASES.get(k, k) for k in tr.resume_changes]
    bad = [x for x in tr.loggers if x not in LOGGERS]
    if bad:
        raise ConfigError(f"trainer.loggers: unknown {bad}; choose from {', '.join(LOGGERS)}")
    if me.algorithm == "maml":
        if me.inner_optimizer != "sgd":
            raise ConfigError("meta.inner_optimizer: second-order maml differentiates through "
                              "plain SGD inner steps; use sgd (or algorithm=fomaml with adam)")
        if tr.backend not in ("auto", "torch"):
            raise ConfigError(f"trainer.backend={tr.backend}: maml runs on the torch reference "
                              f"backend (the kernels have no double backward)")
    if tr.shard_base and me.algorithm not in ("fomaml", "reptile"):
        raise ConfigError(f"trainer.shard_base: runs fomaml and reptile, not {me.algorithm} "
                          f"(every process must run the same passes through the sharded base)")
    if me.algorithm == "reptile" and me.num_inner_steps == 0:
        raise ConfigError("meta.num_inner_steps: reptile needs at least one inner step")
    for key, on in (("meta.inner_lr_mode", me.inner_lr_mode != "fixed"),
                    ("meta.multi_step_loss", me.multi_step_loss)):
        if not on:
            continue
        if me.algorithm not in ("fomaml", "maml"):
            raise ConfigError(f"{key}: learned inner rates and the multi-step loss have a "
                              f"meta-gradient under fomaml and maml, not {me.algorithm}")
        if me.num_inner_steps == 0:
            raise ConfigError(f"{key}: needs meta.num_inner_steps >= 1 (no inner step, nothing "
                              f"to learn or weigh)")


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
