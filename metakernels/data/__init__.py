"""Data: tokenizers, built-in procedural tasks, task files, meta-batch sampling, prepare."""
from .loader import (DataError, TaskData, load_examples, load_task_dir, load_task_file,
                     load_tasks, tokenize_example, write_task_file)
from .sampler import MetaBatch, TaskSampler, make_task_data
from .tasks import ProceduralTask, builtin_tasks, get_task
from .tokenizer import build_char_tokenizer, load_tokenizer

__all__ = [
    "DataError", "MetaBatch", "ProceduralTask", "TaskData", "TaskSampler", "build_char_tokenizer",
    "builtin_tasks", "get_task", "load_examples", "load_task_dir", "load_task_file", "load_tasks",
    "load_tokenizer", "make_task_data", "tokenize_example", "write_task_file",
]
