"""metakernels: meta-learning of LoRA adapters with every task of a meta-batch in one pass."""
from .bank import AdapterBank
from .batch import Example, PackedBatch, pack_tasks
from .layout import TaskLayout
from .lora import inject

__version__ = "0.1.0"
__all__ = ["AdapterBank", "Example", "PackedBatch", "TaskLayout", "inject", "pack_tasks"]
