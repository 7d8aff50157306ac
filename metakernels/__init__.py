"""metakernels: meta-learning of LoRA adapters with every task of a meta-batch in one pass."""
from .batch import Example, PackedBatch, pack_tasks
from .layout import TaskLayout

__version__ = "0.1.0"
__all__ = ["Example", "PackedBatch", "TaskLayout", "pack_tasks"]
