import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from metakernels import Example, pack_tasks  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


def random_tasks(sizes, vocab, min_len=4, max_len=12, seed=0):
    """Per-task lists of random examples with a random prompt/response split."""
    rng = random.Random(seed)
    tasks = []
    for n in sizes:
        exs = []
        for _ in range(n):
            L = rng.randint(min_len, max_len)
            ids = [rng.randrange(1, vocab) for _ in range(L)]
            p = rng.randint(1, L - 1)
            exs.append(Example(tuple(ids), tuple([0] * p + [1] * (L - p))))
        tasks.append(exs)
    return tasks


def random_batch(sizes, vocab, seed=0, **kw):
    return pack_tasks(random_tasks(sizes, vocab, seed=seed, **kw), pad_id=0)
