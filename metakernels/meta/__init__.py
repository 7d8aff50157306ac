"""Meta-learning algorithms over the adapter bank, batched over tasks, and the per-task loop."""
from .common import InnerConfig, StepResult, causal_lm_loss, task_losses
from .fomaml import fomaml_step, inner_loop, query_gradients, reptile_step
from .maml import maml_step, maml_step_per_task
from .multitask import mixture, multitask_step
from .naive import PeftAdapterIO, make_peft_model, naive_step

__all__ = ["InnerConfig", "PeftAdapterIO", "StepResult", "causal_lm_loss", "fomaml_step",
           "inner_loop", "maml_step", "maml_step_per_task", "make_peft_model", "mixture",
           "multitask_step", "naive_step", "query_gradients", "reptile_step",
           "task_losses"]
