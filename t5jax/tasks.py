"""Built-in text-to-text tasks for the demo: generated in code, deterministic, T5 prefix style.

`builtin_task_examples(split, n, seed)` returns (input, target) pairs of `add:`, `reverse:`,
`sort:` and `number to words:` tasks; an input belongs to the held-out split iff its CRC32 is 0
mod 10, so train and validation never share an input whatever the seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

Example = tuple[str, str]  # (input text, target text)


_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen \
fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_LETTERS = "abcdefghijklmnop"


def number_to_words(n: int) -> str:
  """English words for 0 <= n < 1000, e.g. 342 -> "three hundred forty two"."""
  if not 0 <= n < 1000:
    raise ValueError(n)
  words = []
  if n >= 100:
    words += [_ONES[n // 100], "hundred"]
    n %= 100
    if n == 0:
      return " ".join(words)
  if n < 20:
    words.append(_ONES[n])
  else:
    words.append(_TENS[n // 10])
    if n % 10:
      words.append(_ONES[n % 10])
  return " ".join(words)


def _operand(rng: np.random.Generator) -> int:
  """0-99 with one- and two-digit numbers equally likely (uniform 0-99 is 90% two-digit)."""
  return int(rng.integers(0, 10)) if rng.random() < 0.5 else int(rng.integers(10, 100))


def _task_add(rng: np.random.Generator) -> Example:
  a, b = _operand(rng), _operand(rng)
  return f"add: {a} + {b}", str(a + b)


def _task_reverse(rng: np.random.Generator) -> Example:
  # Distinct letters: with repeats, a model this small keeps confusing which copy comes next.
  n = int(rng.integers(3, 7))
  xs = [_LETTERS[i] for i in rng.choice(len(_LETTERS), size=n, replace=False)]
  return "reverse: " + " ".join(xs), " ".join(reversed(xs))


def _task_sort(rng: np.random.Generator) -> Example:
  xs = [int(x) for x in rng.integers(0, 10, size=int(rng.integers(3, 7)))]
  return "sort: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


def _task_words(rng: np.random.Generator) -> Example:
  n = int(rng.integers(0, 1000))
  return f"number to words: {n}", number_to_words(n)


BUILTIN_TASKS: dict[str, Callable[[np.random.Generator], Example]] = {
  "add": _task_add,
  "reverse": _task_reverse,
  "sort": _task_sort,
  "number_to_words": _task_words,
}


def _is_heldout(text: str) -> bool:
  """A fixed ~10% of each task's inputs belongs to validation only (stable across runs)."""
  return zlib.crc32(text.encode("utf-8")) % 10 == 0


def builtin_task_examples(
  split: str, n: int, seed: int = 0, tasks: Sequence[str] | None = None
) -> list[Example]:
  """Deterministic (input, target) pairs of T5-prefix tasks, round-robin over `tasks`.

  Train and validation are disjoint by input: an input belongs to validation iff its CRC32 is 0
  mod 10, whatever the seed. Examples may repeat within a split.

  Args:
    split: "train" or "validation" ("eval" and "test" are aliases of validation).
    n: number of examples.
    seed: generation seed.
    tasks: task names from BUILTIN_TASKS; default all.
  """
  if split not in ("train", "validation", "eval", "test"):
    raise ValueError(f"unknown split {split!r}")
  heldout = split != "train"
  names = list(tasks) if tasks else list(BUILTIN_TASKS)
  for name in names:
    if name not in BUILTIN_TASKS:
      raise ValueError(f"unknown builtin task {name!r}; choose from {sorted(BUILTIN_TASKS)}")
  rng = np.random.default_rng([seed, int(heldout)])
  out = []
  for i in range(n):
    task = BUILTIN_TASKS[names[i % len(names)]]
    while True:
      example = task(rng)
      if _is_heldout(example[0]) == heldout:
        break
    out.append(example)
  return out
