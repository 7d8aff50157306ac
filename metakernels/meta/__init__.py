"""Meta-learning algorithms over the adapter bank, batched over tasks, and the per-task loop."""
from .common import InnerConfig, StepResult, causal_lm_loss, task_losses
from .fomaml import fomaml_step, inner_loop, query_gradients, reptile_step
from .inner_lr import INNER_LR_MODES, InnerRates, msl_weights
from .maml import maml_step, maml_step_per_task
from .multitask import mixture, multitask_step
from .naive import PeftAdapterIO, make_peft_model, naive_step

__all__ = ["INNER_LR_MODES", "InnerConfig", "InnerRates", "PeftAdapterIO", "StepResult",
           "causal_lm_loss", "fomaml_step", "inner_loop", "maml_step", "maml_step_per_task", "make_peft_model", "mixture",
           "msl_weights", "multitask_step", "naive_step", "query_gradients", "reptile_step",
           "task_losses"]
