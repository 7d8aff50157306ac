"""Built-in procedural tasks: each task is a hidden rule from a random input string to an output.

Tasks come in suites, each with disjoint ``"train"`` and ``"heldout"`` splits
(``builtin_tasks(split, suite)``; ``data.tasks=builtin:<suite>``):

- ``suffix`` (the default) and ``order_suffix``: three digits copied (or, in ``order_suffix``,
  copied or reversed) and then a letter, the letter and the order hidden. The answers of
  different tasks to one prompt conflict, so only the support examples tell a task apart, as
  amplitude and phase do for MAML's sinusoids. Held-out tasks take letters no training task
  has, on the held-out half of the inputs.
- ``families``: caesar shifts, substitution tables, base conversions, rotations and more,
  named after family and parameters (``caesar_3``, ``base_10_to_7``, ``rotate_2``,
  ``reverse``); ``get_task(name)`` builds any valid member of a family. Held-out tasks are
  other members of the training families (unseen shifts, bases, strides, substitution tables),
  each a new mapping that a few examples cannot pin down.

Every prompt is the input followed by ``SEPARATOR`` (``">"``) and the response is the rule's
output. Family inputs are 3 to 8 characters (base-conversion inputs are capped so that outputs
stay within 20 digits); with the character tokenizer every sequence is at most 31 tokens with
BOS and EOS.
"""
from __future__ import annotations

import functools
import math
import random
import re
import string
from dataclasses import dataclass
from typing import Callable

from .loader import DataError

SEPARATOR = ">"
DIGITS = string.digits + "abcdef"

TRAIN_TASK_NAMES = (
    "caesar_1", "caesar_2", "caesar_3", "caesar_4", "caesar_6", "caesar_7", "caesar_9",
    "caesar_10", "caesar_13", "caesar_20",
    "subst_0", "subst_1", "subst_2", "subst_3",
    "base_10_to_2", "base_10_to_3", "base_10_to_4", "base_10_to_5", "base_10_to_8",
    "base_10_to_16", "base_2_to_10", "base_3_to_10", "base_8_to_10", "base_16_to_10",
    "base_2_to_16", "base_16_to_2",
    "rotate_1", "rotate_2", "rotate_4",
    "repeat_2", "repeat_3",
    "every_2", "every_3",
    "reverse", "swapcase", "sort", "mirror",
)
HELDOUT_TASK_NAMES = (
    "caesar_5", "caesar_8", "caesar_15",
    "subst_100", "subst_101",
    "base_10_to_7", "base_7_to_10", "base_4_to_16",
    "rotate_3",
    "repeat_4",
    "every_4",
)


@dataclass(frozen=True)
class ProceduralTask:
    """One hidden rule. ``make_input(rng)`` draws an input string, ``rule`` maps it to the output.

    Both are pure functions of their arguments (``functools.partial`` of module functions, so a
    task pickles), which makes ``sample`` deterministic given the state of ``rng``.
    """

    name: str
    family: str
    rule: Callable[[str], str]
    make_input: Callable[[random.Random], str]

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """One ``(prompt, response)`` pair."""
        x = self.make_input(rng)
        return x + SEPARATOR, self.rule(x)

    def sample_distinct(self, rng: random.Random, n: int) -> list[tuple[str, str]]:
        """``n`` pairs with pairwise distinct prompts (so support and query never share one)."""
        seen: dict[str, str] = {}
        attempts = 0
        max_attempts = 50 * n + 100
        while len(seen) < n:
            if attempts == max_attempts:
                raise DataError(
                    f"task {self.name!r}: only {len(seen)} distinct inputs in {attempts} draws, "
                    f"{n} were asked for; the task's input space is too small for this many "
                    f"examples (lower data.support_size + data.query_size, or "
                    f"trainer.eval_shots x trainer.eval_seeds + trainer.eval_query_size for "
                    f"validation)")
            prompt, response = self.sample(rng)
            seen.setdefault(prompt, response)
            attempts += 1
        return list(seen.items())


def _random_string(rng: random.Random, alphabet: str, min_len: int, max_len: int) -> str:
    n = rng.randint(min_len, max_len)
    return "".join(rng.choice(alphabet) for _ in range(n))


def _random_number(rng: random.Random, base: int, min_len: int, max_len: int) -> str:
    n = rng.randint(min_len, max_len)
    return rng.choice(DIGITS[1:base]) + "".join(rng.choice(DIGITS[:base]) for _ in range(n - 1))


def _translate(table: dict[int, str], x: str) -> str:
    return x.translate(table)


def _convert_base(src: int, dst: int, x: str) -> str:
    value = int(x, src)
    out = []
    while value:
        value, digit = divmod(value, dst)
        out.append(DIGITS[digit])
    return "".join(reversed(out)) or "0"


def _rotate(k: int, x: str) -> str:
    k %= len(x)
    return x[k:] + x[:k]


def _repeat(k: int, x: str) -> str:
    return "".join(c * k for c in x)


def _every(k: int, x: str) -> str:
    return x[::k]


def _reverse(x: str) -> str:
    return x[::-1]


def _swapcase(x: str) -> str:
    return x.swapcase()


def _sort(x: str) -> str:
    return "".join(sorted(x))


def _mirror(x: str) -> str:
    return x + x[::-1]


_LOWER = string.ascii_lowercase
_lowercase_input = functools.partial(_random_string, alphabet=_LOWER, min_len=3, max_len=8)


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"task {name!r}: parameter {value} is outside [{lo}, {hi}]")


def _caesar(name: str, k: int) -> ProceduralTask:
    _check_range(name, k, 1, 25)
    table = str.maketrans(_LOWER, _LOWER[k:] + _LOWER[:k])
    return ProceduralTask(name, "caesar", functools.partial(_translate, table), _lowercase_input)


def _subst(name: str, seed: int) -> ProceduralTask:
    letters = list(_LOWER)
    random.Random(seed).shuffle(letters)
    table = str.maketrans(_LOWER, "".join(letters))
    return ProceduralTask(name, "subst", functools.partial(_translate, table), _lowercase_input)


def _base(name: str, src: int, dst: int) -> ProceduralTask:
    _check_range(name, src, 2, 16)
    _check_range(name, dst, 2, 16)
    if src == dst:
        raise ValueError(f"task {name!r}: source and target base are both {src}")
    # inputs below 2**20, so that even a base-2 output has at most 20 digits
    max_len = min(8, int(20 / math.log2(src)))
    make_input = functools.partial(_random_number, base=src, min_len=3, max_len=max_len)
    return ProceduralTask(name, "base", functools.partial(_convert_base, src, dst), make_input)


def _rotate_task(name: str, k: int) -> ProceduralTask:
    _check_range(name, k, 1, 7)
    return ProceduralTask(name, "rotate", functools.partial(_rotate, k), _lowercase_input)


def _repeat_task(name: str, k: int) -> ProceduralTask:
    _check_range(name, k, 2, 4)
    make_input = functools.partial(_random_string, alphabet=_LOWER, min_len=3, max_len=16 // k)
    return ProceduralTask(name, "repeat", functools.partial(_repeat, k), make_input)


def _every_task(name: str, k: int) -> ProceduralTask:
    _check_range(name, k, 2, 5)
    return ProceduralTask(name, "every", functools.partial(_every, k), _lowercase_input)


_FIXED = {
    "reverse": lambda name: ProceduralTask(name, "reverse", _reverse, _lowercase_input),
    "swapcase": lambda name: ProceduralTask(
        name, "swapcase", _swapcase,
        functools.partial(_random_string, alphabet=string.ascii_letters, min_len=3, max_len=8)),
    "sort": lambda name: ProceduralTask(name, "sort", _sort, _lowercase_input),
    "mirror": lambda name: ProceduralTask(
        name, "mirror", _mirror,
        functools.partial(_random_string, alphabet=_LOWER, min_len=3, max_len=6)),
}
_PARAMETRIC = (
    (re.compile(r"caesar_(\d+)"), _caesar),
    (re.compile(r"subst_(\d+)"), _subst),
    (re.compile(r"base_(\d+)_to_(\d+)"), _base),
    (re.compile(r"rotate_(\d+)"), _rotate_task),
    (re.compile(r"repeat_(\d+)"), _repeat_task),
    (re.compile(r"every_(\d+)"), _every_task),
)
FAMILY_PATTERNS = tuple(sorted(_FIXED)) + (
    "caesar_K", "subst_SEED", "base_A_to_B", "rotate_K", "repeat_K", "every_K")


def get_task(name: str) -> ProceduralTask:
    """The procedural task called ``name`` (any member of a family, not only the built-in ones)."""
    if name in _FIXED:
        return _FIXED[name](name)
    for pattern, build in _PARAMETRIC:
        match = pattern.fullmatch(name)
        if match:
            return build(name, *(int(g) for g in match.groups()))
    raise ValueError(f"unknown procedural task {name!r}; names look like: "
                     f"{', '.join(FAMILY_PATTERNS)}")


def _hidden_rule(reverse: bool, suffix: str, x: str) -> str:
    return (x[::-1] if reverse else x) + suffix


def _hidden_input(rng: random.Random, train_inputs: bool) -> str:
    """Three digits, from the training or the held-out half of the 1000 strings."""
    while True:
        x = "".join(rng.choice(string.digits) for _ in range(3))
        if is_train_input(x) == train_inputs:
            return x


def is_train_input(x: str) -> bool:
    """Whether the digit string ``x`` is in the training half of the hidden-rule inputs (an
    even digit sum): held-out tasks are scored on strings no training task ever showed."""
    return sum(map(int, x)) % 2 == 0


def hidden_task(suffix: str, reverse: bool = False, heldout_inputs: bool = False
                ) -> ProceduralTask:
    """Three digits, copied (or reversed), then the letter ``suffix``: ``"381>"`` gives
    ``"381q"`` for ``suffix_q`` and ``"183q"`` for ``rev_suffix_q``. The prompt carries neither
    the letter nor the order; inputs come from the held-out half with ``heldout_inputs``."""
    if len(suffix) != 1 or suffix not in _LOWER:
        raise ValueError(f"hidden-rule suffix must be one lowercase letter, got {suffix!r}")
    name = ("rev_" if reverse else "") + f"suffix_{suffix}"
    make_input = functools.partial(_hidden_input, train_inputs=not heldout_inputs)
    return ProceduralTask(name, "rev_suffix" if reverse else "suffix",
                          functools.partial(_hidden_rule, reverse, suffix), make_input)


# Hidden-rule suites (MAML's sinusoids in text): every task answers the same kind of prompt
# (three digits) through a rule whose parameter only the support examples reveal, so the
# answers of different tasks to one prompt conflict and a model trained on the task mixture
# can at best predict the mixture. Held-out tasks have parameters no training task has (the
# last 6 letters) and are scored on the held-out half of the inputs.
HIDDEN_TRAIN_LETTERS = _LOWER[:20]
HIDDEN_HELDOUT_LETTERS = _LOWER[20:]


def _suffix_suite(split: str) -> list[ProceduralTask]:
    held = split == "heldout"
    letters = HIDDEN_HELDOUT_LETTERS if held else HIDDEN_TRAIN_LETTERS
    return [hidden_task(c, False, held) for c in letters]


def _order_suffix_suite(split: str) -> list[ProceduralTask]:
    held = split == "heldout"
    letters = HIDDEN_HELDOUT_LETTERS if held else HIDDEN_TRAIN_LETTERS
    return [hidden_task(c, rev, held) for c in letters for rev in (False, True)]


def _families_suite(split: str) -> list[ProceduralTask]:
    names = {"train": TRAIN_TASK_NAMES, "heldout": HELDOUT_TASK_NAMES}[split]
    return [get_task(n) for n in names]


# name -> builder of the "train" or "heldout" split; "builtin:<name>" in data.tasks
SUITES: dict[str, Callable[[str], list[ProceduralTask]]] = {
    # a hidden suffix letter: 20 training tasks, 6 held-out ones
    "suffix": _suffix_suite,
    # a hidden suffix letter and a hidden order (copy or reverse): 40 and 12 tasks
    "order_suffix": _order_suffix_suite,
    # the procedural families above, each held-out task a new mapping (37 and 11 tasks)
    "families": _families_suite,
}
DEFAULT_SUITE = "suffix"


def builtin_tasks(split: str, suite: str = DEFAULT_SUITE) -> list[ProceduralTask]:
    """The ``"train"`` or ``"heldout"`` tasks of the built-in ``suite``; the two are disjoint."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if suite not in SUITES:
        raise ValueError(f"unknown built-in suite {suite!r}; choose from {', '.join(SUITES)}")
    return SUITES[suite](split)
