"""The meta-training loop under ``python -m metakernels.train``: builds the run from its config,
takes meta-steps (one process, or the tasks split across the processes of ``torchrun``),
validates on held-out tasks, logs, and checkpoints atomically for an exact resume."""
from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

from .adapt import adapt_rows, build_eval_tasks, query_metrics
from .bank import adapter_meta
from .batch import pack_tasks
from .build import build_bank, build_model, build_tasks, build_tokenizer, set_kernel_choices
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, dump_config
from .errors import UserError
from .meta import InnerConfig, PeftAdapterIO, maml_step, make_peft_model, multitask_step, naive_step
from .meta.chunked import chunked_step, task_chunk_setting
from .meta.inner_lr import InnerRates, msl_weights
from .peft_adapter import peft_theta
from .run_dir import clear_run, new_run_id, prepare_run_dir


class NonFiniteError(RuntimeError):
    """The run cannot go on: theta went non-finite, or too many meta-steps in a row had a
    non-finite (or an exactly zero) meta-gradient."""



def lr_lambda(cfg: Config):
    me, total = cfg.meta, cfg.trainer.total_steps

    def f(step: int) -> float:
        if step < me.warmup_steps:
            return (step + 1) / (me.warmup_steps + 1)
        if me.lr_schedule == "constant":
            return 1.0
        progress = (step - me.warmup_steps) / max(1, total - me.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------- loggers
class Loggers:
    """console, jsonl (always written by rank 0), tensorboard and wandb (offline) if installed."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.names = cfg.trainer.loggers
        self.tb = self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if start_step > 0 and path.exists():  # drop lines past the checkpoint we resume from
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) < start_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif path.exists():
            path.unlink()
        if "jsonl" in self.names:
            self.jsonl = open(path, "a", encoding="utf-8")
        if "tensorboard" in self.names:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("trainer.loggers has tensorboard but it is not installed; skipped")
        if "wandb" in self.names:
            try:
                import wandb
                os.environ.setdefault("WANDB_MODE", "offline")
                self.wandb = wandb.init(project="metakernels", name=cfg.trainer.experiment_name,
                                        dir=str(run_dir), config=cfg.to_dict())
            except ImportError:
                warnings.warn("trainer.loggers has wandb but it is not installed; skipped")

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
            self.jsonl.flush()
        step = metrics["step"]
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# --------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: Config):
        from .data.sampler import TaskSampler
        from . import distributed as dist

        self.cfg = cfg
        # the run directory's policy (another run there, resume, overwrite) before anything is
        # built: for every caller, the command or code that builds a Trainer itself
        prepare_run_dir(cfg)
        self.rank, self.world_size = dist.init_from_env(cfg)
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        torch.manual_seed(cfg.trainer.seed)
        random.seed(cfg.trainer.seed)
        set_kernel_choices(cfg)
        self.tokenizer = build_tokenizer(cfg)
        self.tasks = build_tasks(cfg, self.tokenizer)
        if cfg.meta.meta_batch_size > len(self.tasks):
            raise ConfigError(f"meta.meta_batch_size={cfg.meta.meta_batch_size} but only "
                              f"{len(self.tasks)} training tasks exist")
        if cfg.meta.meta_batch_size < self.world_size:
            raise ConfigError(f"meta.meta_batch_size={cfg.meta.meta_batch_size} is smaller than "
                              f"the {self.world_size} processes: every process needs a task")
        self.sampler = TaskSampler(
            self.tasks, meta_batch_size=cfg.meta.meta_batch_size,
            support_size=cfg.data.support_size, query_size=cfg.data.query_size,
            seed=cfg.trainer.seed, tokenizer=self.tokenizer, max_length=cfg.data.max_length,
            apply_chat_template=cfg.data.apply_chat_template, weighting=cfg.meta.task_sampling)
        if cfg.trainer.shard_base and cfg.model.path is not None:
            # read shard by shard: no process holds the whole base, even while loading
            self.model = dist.load_sharded_base(cfg, self.world_size)
        else:
            self.model = build_model(cfg, len(self.tokenizer))
        m = cfg.model
        oracle_base = None
        if cfg.meta.algorithm == "naive_fomaml":
            import copy
            oracle_base = copy.deepcopy(self.model)
        self.bank = build_bank(cfg, self.model, cfg.meta.meta_batch_size)
        if m.lora_dropout > 0:
            self.model.train()  # dropout on the LoRA input, as PEFT applies it
        if m.init_adapter:
            with torch.no_grad():
                self.bank.theta.copy_(peft_theta(m.init_adapter, self.bank, "model.init_adapter"))
        if oracle_base is not None:
            self.peft_model = make_peft_model(oracle_base, self.bank)
            self.peft_io = PeftAdapterIO(self.peft_model, self.bank.slots)
        dist.check_same_config(cfg, self.bank)
        if cfg.trainer.shard_base:
            mem = dist.shard_base(self.model, cfg, self.world_size)
            if self.is_main:
                print(dist.describe_sharding(mem, self.world_size), flush=True)
        me = cfg.meta
        # learned inner rates: meta-parameters beside theta, in the same outer AdamW, without
        # weight decay (it would pull every rate towards 0, i.e. no adaptation)
        self.rates = (InnerRates(me.inner_lr_mode, self.bank, me.num_inner_steps, me.inner_lr)
                      if me.inner_lr_mode != "fixed" else None)
        groups = [{"params": [self.bank.theta]}]
        if self.rates is not None:
            groups.append({"params": [self.rates.values], "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=me.outer_lr, weight_decay=me.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.inner = InnerConfig(lr=cfg.meta.inner_lr, num_steps=cfg.meta.num_inner_steps,
                                 optimizer=cfg.meta.inner_optimizer,
                                 max_grad_norm=cfg.meta.inner_max_grad_norm)
        self.task_chunk = task_chunk_setting(cfg.meta, cfg.meta.inner_optimizer)
        self.step = 0
        self.run_id = new_run_id()
        self.nonfinite_in_a_row = 0
        self.zero_grad_in_a_row = 0
        self.history: list[dict] = []
        self.val_tasks = self._build_validation()

    # -- held-out validation ----------------------------------------------------------------
    def _build_validation(self):
        """The held-out tasks frozen for validation (fixed support and query draws), or None
        when ``trainer.eval_every`` is 0 or the task source has no held-out split."""
        from .data.loader import DataError

        tr = self.cfg.trainer
        if tr.eval_every == 0:
            return None
        try:
            tasks = build_tasks(self.cfg, self.tokenizer, "heldout")
        except (FileNotFoundError, DataError) as e:
            warnings.warn(f"no held-out tasks for validation ({e}); val/ metrics are not logged")
            return None
        try:
            return build_eval_tasks(tasks, self.tokenizer, self.cfg, n_query=tr.eval_query_size,
                                    max_shots=tr.eval_shots, seeds=tr.eval_seeds,
                                    data_seed=tr.seed, settings=("trainer.eval_query_size",
                                                                 "trainer.eval_shots"))
        except UserError as e:  # a held-out support pool smaller than trainer.eval_shots
            warnings.warn(f"held-out validation is off: {e}")
            return None

    def validate(self) -> dict:
        """Adapted query loss and token accuracy on the held-out tasks at the current theta.

        Every (task, seed) row adapts from theta on its fixed ``trainer.eval_shots`` support
        examples with the training inner loop, all rows in one batched pass, and is scored on
        the task's fixed query set; the same draws at every call, so the curve moves only with
        theta. ``val/loss_before`` is the query loss at theta itself (no adaptation)."""
        tasks, pad_id = self.val_tasks, self.tokenizer.pad_token_id
        rows = [(t, s) for t in tasks for s in range(len(t.support))]
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout: the same draws give the same numbers
        try:
            theta = self.bank.theta.detach()
            fast, alive = adapt_rows(self.model, self.bank, theta,
                                     [t.support[s] for t, s in rows], self.inner, pad_id,
                                     self.rates)
            device = self.cfg.trainer.device
            query = pack_tasks([t.query for t, _ in rows], pad_id).to(device)
            losses, accs = query_metrics(self.model, self.bank, fast, query)
            before, _ = query_metrics(self.model, self.bank,
                                      theta[None].expand(len(tasks), -1).contiguous(),
                                      pack_tasks([t.query for t in tasks], pad_id).to(device))
        finally:
            self.model.train(was_training)
        ok = alive & torch.isfinite(losses)
        nan = float("nan")
        return {"val/loss": float(losses[ok].mean()) if ok.any() else nan,
                "val/token_accuracy": float(accs[ok].mean()) if ok.any() else nan,
                "val/loss_before": float(before.mean()),
                "val/diverged": int((~ok).sum())}

    # -- one meta-step ----------------------------------------------------------------------
    def msl(self) -> list[float] | None:
        """This step's multi-step loss weights, or None without ``meta.multi_step_loss``."""
        me = self.cfg.meta
        if not me.multi_step_loss:
            return None
        return msl_weights(me.num_inner_steps, self.step, me.multi_step_loss_steps)

    def _local_step(self, support, query):
        algo = self.cfg.meta.algorithm
        learned = {"rates": self.rates, "msl": self.msl()} if algo in ("fomaml", "maml") else {}
        if algo in ("fomaml", "reptile"):
            return chunked_step(algo, self.model, self.bank, support, query, self.inner,
                                self.task_chunk, **learned)
        if algo == "maml":
            return maml_step(self.model, self.bank, support, query, self.inner, **learned)
        if algo == "multitask":
            return multitask_step(self.model, self.bank, support, query)
        return naive_step(self.peft_model, self.peft_io, self.bank.theta.detach(), support,
                          query, self.inner)

    def train_step(self) -> dict:
        from . import distributed as dist

        cfg = self.cfg
        t0 = time.perf_counter()
        batch = self.sampler.sample(self.step, self.rank, self.world_size)
        support = batch.support.to(cfg.trainer.device)
        query = batch.query.to(cfg.trainer.device)
        res = self._local_step(support, query)
        T_all = cfg.meta.meta_batch_size
        first = T_all * self.rank // self.world_size
        red = dist.reduce_step(res, first, T_all, self.world_size)
        meta_grad = red.meta_grad
        grad_norm = float(torch.linalg.vector_norm(meta_grad))
        lr = self.scheduler.get_last_lr()[0]
        skipped = not math.isfinite(grad_norm) or red.num_kept == 0
        if skipped:
            self.nonfinite_in_a_row += 1
            warnings.warn(f"step {self.step}: non-finite meta-gradient (or every task dropped); "
                          f"the step is skipped ({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row > cfg.trainer.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.nonfinite_in_a_row} meta-steps in a row had a non-finite "
                    f"meta-gradient (trainer.max_nonfinite_steps={cfg.trainer.max_nonfinite_steps}"
                    f"); stopping. {self._kept_checkpoint()}")
        else:
            self.nonfinite_in_a_row = 0
            self._check_alive(grad_norm, red)
            if cfg.meta.max_grad_norm > 0:  # over theta and the learned rates together
                meta_grad = meta_grad * min(1.0, cfg.meta.max_grad_norm / (grad_norm + 1e-6))
            P = self.bank.num_params
            self.bank.theta.grad = meta_grad[:P].to(self.bank.theta.dtype)
            if self.rates is not None:
                self.rates.values.grad = meta_grad[P:].view_as(self.rates.values).to(
                    self.rates.values.dtype)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if not bool(torch.isfinite(self.bank.theta).all()):
                # every process holds the same theta (the same reduced gradient), so every
                # process stops here; nothing after the last finite checkpoint is saved
                raise NonFiniteError(
                    f"step {self.step}: theta became non-finite after the outer step "
                    f"(meta.outer_lr={cfg.meta.outer_lr}, meta-gradient norm {grad_norm:.3g}); "
                    f"stopping. {self._kept_checkpoint()}")
        self.scheduler.step()
        names = self.sampler.tasks_for_step(self.step)
        if not skipped and red.num_kept < len(names):
            dropped = [n for n, k in zip(names, red.kept.tolist()) if not k]
            warnings.warn(f"step {self.step}: tasks {dropped} dropped from the meta-step "
                          f"(non-finite inner loss or gradient)")
        self.sampler.update_losses(names, red.query_losses.tolist())
        dt = time.perf_counter() - t0
        tokens = (int(batch.support.attention_mask.sum()) * max(1, self.inner.num_steps)
                  + int(batch.query.attention_mask.sum())) * self.world_size
        keep = red.kept
        sl_after, ql = red.support_losses_last[keep], red.query_losses[keep]
        metrics = {"step": self.step,
                   "stage2/meta_loss": float(ql.mean()) if keep.any() else float("nan"),
                   "stage1/loss_before": float(red.support_losses_first[keep].mean())
                   if keep.any() else float("nan"),
                   "stage1/loss_after": float(sl_after.mean()) if keep.any() else float("nan"),
                   "adaptation_gap": float((ql - sl_after).mean()) if keep.any() else float("nan"),
                   "meta_grad_norm": grad_norm, "outer_lr": lr,
                   "dropped_tasks": int((~keep).sum()), "skipped": skipped,
                   "time_per_step": dt, "tokens_per_s": tokens / dt,
                   "peak_memory_mb": peak_rss_mb()}
        for n, v in zip(names, red.support_losses_last.tolist()):
            metrics[f"stage1/{n}/loss"] = v
        if self.rates is not None:
            metrics.update(self.rates.metrics())
        self.step += 1
        return metrics

    # -- checkpoints ------------------------------------------------------------------------
    def _meta_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The outer optimizer's parameters by checkpoint name (``outer/`` is theta's state,
        ``outer_inner_lr/`` the learned rates')."""
        out = {"outer": self.bank.theta}
        if self.rates is not None:
            out["outer_inner_lr"] = self.rates.values
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {"theta": self.bank.theta.detach(), "rng/torch": torch.get_rng_state()}
        if self.rates is not None:
            t["inner_lr"] = self.rates.values.detach()
        for prefix, param in self._meta_parameters().items():
            st = self.optimizer.state.get(param, {})
            for k in ("exp_avg", "exp_avg_sq", "step"):
                if k in st:
                    t[f"{prefix}/{k}"] = (torch.as_tensor(st[k]).reshape(-1) if k == "step"
                                          else st[k])
        return t

    def _check_alive(self, grad_norm: float, red) -> None:
        """A meta-gradient of exactly zero means the adapted models no longer depend on theta
        (an inner step so large that every task's fast weights saturate, so that each predicts
        every token alike): the run would go on without learning. A warning at each such
        step; after ``trainer.max_nonfinite_steps`` more in a row, the run stops."""
        if grad_norm != 0.0:
            self.zero_grad_in_a_row = 0
            return
        self.zero_grad_in_a_row += 1
        limit = self.cfg.trainer.max_nonfinite_steps
        q = float(red.query_losses[red.kept].mean())
        uniform = math.log(len(self.tokenizer))
        msg = (f"step {self.step}: the meta-gradient is exactly 0 ({self.zero_grad_in_a_row} "
               f"step(s) in a row); query loss {q:.4f} (a uniform prediction over the "
               f"vocabulary: {uniform:.4f}): the adapted models ignore theta, the inner loop has "
               f"collapsed (meta.inner_lr={self.cfg.meta.inner_lr} too large?)")
        if self.zero_grad_in_a_row > limit:
            raise NonFiniteError(f"{msg}; stopping after trainer.max_nonfinite_steps={limit} "
                                 f"more. {self._kept_checkpoint()}")
        warnings.warn(msg)

    def _kept_checkpoint(self) -> str:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return "No checkpoint was written."
        return f"The newest checkpoint, {ckpt}, is finite and kept."

    def save(self) -> Path | None:
        if not self.is_main:
            return None
        if not bool(torch.isfinite(self.bank.theta).all()):
            raise NonFiniteError(f"step {self.step}: theta is non-finite; it is not saved. "
                                 f"{self._kept_checkpoint()}")
        meta = {"step": self.step, "run_id": self.run_id, "config": self.cfg.to_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "zero_grad_in_a_row": self.zero_grad_in_a_row,
                "python_rng": repr(random.getstate()), **adapter_meta(self.bank),
                "inner_lr_mode": self.cfg.meta.inner_lr_mode}
        return save_checkpoint(self.run_dir, self.step, self.state_tensors(), meta)

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        tensors, meta = load_checkpoint(ckpt)
        if tensors["theta"].shape != self.bank.theta.shape:
            raise UserError(f"trainer.resume=true: {ckpt} has {tensors['theta'].numel()} adapter "
                            f"values, this run's adapters have {self.bank.num_params} (model or "
                            f"LoRA settings differ from the checkpoint's); use the checkpoint's "
                            f"settings, or another trainer.experiment_name for a new run")
        saved_mode = meta.get("inner_lr_mode", "fixed")
        if saved_mode != self.cfg.meta.inner_lr_mode or (
                self.rates is not None and tensors["inner_lr"].shape != self.rates.values.shape):
            raise UserError(f"trainer.resume=true: {ckpt} was trained with meta.inner_lr_mode="
                            f"{saved_mode} (and its meta.num_inner_steps), this run has "
                            f"{self.cfg.meta.inner_lr_mode}; use the checkpoint's settings, or "
                            f"another trainer.experiment_name for a new run")
        with torch.no_grad():
            self.bank.theta.copy_(tensors["theta"])
            if self.rates is not None:
                self.rates.values.copy_(tensors["inner_lr"])
        for prefix, param in self._meta_parameters().items():
            if f"{prefix}/exp_avg" in tensors:
                # the checkpoint is read to the host; the moments go where their parameter is
                # (AdamW's step count stays on the host, where it keeps it)
                dev = param.device
                self.optimizer.state[param] = {
                    "exp_avg": tensors[f"{prefix}/exp_avg"].to(dev, copy=True),
                    "exp_avg_sq": tensors[f"{prefix}/exp_avg_sq"].to(dev, copy=True),
                    "step": tensors[f"{prefix}/step"].reshape(()).clone()}
        self.scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # load_state_dict restores the schedule, not the optimizer's lr
        self.sampler.load_state_dict(meta["sampler"])
        torch.set_rng_state(tensors["rng/torch"])
        self.step = int(meta["step"])
        self.run_id = meta.get("run_id", self.run_id)
        self.nonfinite_in_a_row = int(meta.get("nonfinite_in_a_row", 0))
        self.zero_grad_in_a_row = int(meta.get("zero_grad_in_a_row", 0))
        return True

    # -- the loop ---------------------------------------------------------------------------
    def _print_val(self, m: dict, bar) -> None:
        if not (self.is_main and "console" in self.cfg.trainer.loggers):
            return
        msg = (f"step {m['step']:5d} | val: adapted query loss {m['val/loss']:.4f} "
               f"(at theta {m['val/loss_before']:.4f}) | token acc "
               f"{m['val/token_accuracy']:.3f}")
        (bar.write(msg) if bar is not None else print(msg, flush=True))

    def train(self) -> list[dict]:
        cfg = self.cfg
        resumed = cfg.trainer.resume and self.resume()
        if self.is_main:
            if not resumed and cfg.trainer.overwrite:
                clear_run(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        loggers = Loggers(cfg, self.run_dir, self.is_main, self.step if resumed else 0)
        bar = None
        if self.is_main and cfg.trainer.progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.trainer.total_steps, initial=self.step, desc="meta-train",
                       dynamic_ncols=True, file=sys.stderr)
        try:
            every = cfg.trainer.eval_every
            while self.step < cfg.trainer.total_steps:
                val = (self.validate() if self.val_tasks is not None and self.step % every == 0
                       else {})
                m = self.train_step()
                m.update(val)
                loggers.log(m)
                self.history.append(m)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(meta_loss=f"{m['stage2/meta_loss']:.3f}",
                                    s_per_step=f"{m['time_per_step']:.2f}")
                if self.is_main and "console" in cfg.trainer.loggers and (
                        m["step"] % cfg.trainer.log_every == 0
                        or self.step == cfg.trainer.total_steps):
                    msg = (f"step {m['step']:5d} | meta_loss {m['stage2/meta_loss']:.4f} | "
                           f"support {m['stage1/loss_before']:.4f} -> "
                           f"{m['stage1/loss_after']:.4f} | gap {m['adaptation_gap']:+.4f} | "
                           f"{m['time_per_step']:.2f} s/step | {m['tokens_per_s']:.0f} tok/s")
                    (bar.write(msg) if bar is not None else print(msg, flush=True))
                if val:
                    self._print_val(m, bar)
                if self.step % cfg.trainer.save_every == 0 or self.step == cfg.trainer.total_steps:
                    self.save()
            if self.val_tasks is not None:  # theta after the last update
                m = {"step": self.step, **self.validate()}
                loggers.log(m)
                self.history.append(m)
                self._print_val(m, bar)
        finally:
            if bar is not None:
                bar.close()
            loggers.close()
        if self.is_main:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
        return self.history


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (a step's value and the ``window - 1`` before it)."""
    out, total, q = [], 0.0, []
    for v in values:
        q.append(v)
        total += v
        if len(q) > window:
            total -= q.pop(0)
        out.append(total / len(q))
    return out


def plot_metrics(jsonl: Path, png: Path) -> None:
    """Loss curves to PNG: the held-out validation loss (adapted, and at theta), the per-step
    meta loss and support losses (faint, with a moving average: one meta-batch of a few tasks
    is a noisy estimate)."""
    if not jsonl.exists():
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
    train_rows = [r for r in rows if "stage2/meta_loss" in r]
    val_rows = [r for r in rows if "val/loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, len(train_rows) // 20)
    steps = [r["step"] for r in train_rows]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (key, label) in enumerate((
            ("stage1/loss_before", "support loss at theta"),
            ("stage1/loss_after", "support loss, last inner step"),
            ("stage2/meta_loss", "query loss after adaptation (meta loss)"))):
        ys = [r[key] for r in train_rows]
        ax.plot(steps, ys, color=colors[k], lw=0.5, alpha=0.3)
        ax.plot(steps, _smooth(ys, window), color=colors[k], lw=1,
                label=f"{label}, mean of {window} steps" if window > 1 else label)
    if val_rows:
        vs = [r["step"] for r in val_rows]
        ax.plot(vs, [r["val/loss"] for r in val_rows], "o-", color="black", lw=1.5, ms=3,
                label="held-out tasks: query loss after adaptation (val/loss)")
        ax.plot(vs, [r["val/loss_before"] for r in val_rows], "s--", color="gray", lw=1,
                ms=2, label="held-out tasks: query loss at theta (val/loss_before)")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("token-mean cross-entropy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
