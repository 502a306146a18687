"""Seeded synthetic sequence tasks for decoder-only language models.

Every task writes sequences ``[TASK, prompt..., SEP, answer...]`` over one shared
vocabulary (:class:`TaskSuite`): ``0`` is padding, ``1`` the separator, then one token
per task, then ``num_symbols`` data symbols. A :class:`TaskBatch` holds ``inputs``
(b, t) and ``targets`` (b, t), the next token at every position with
:data:`IGNORE_INDEX` wherever nothing is scored (prompt and padding), so
``F.cross_entropy(..., ignore_index=IGNORE_INDEX)`` scores only the answers.

Tasks (ids are their positions in :data:`TASKS`):

* ``copy``: repeat the ``length`` symbols;
* ``reverse``: repeat them in reverse order;
* ``sort``: repeat them in ascending order;
* ``mqar``: multi-query associative recall (Arora et al. 2023): ``length`` key-value
  pairs, then the keys again in a shuffled order, each to be followed by its value;
* ``modadd``: ``a b SEP (a + b) mod modulus``;
* ``hops`` (opt-in, not in the default suite): pointer chasing, laid out as ``mqar``.
  ``length`` links ``x f(x)`` of one random cycle over ``length`` distinct symbols, in a
  shuffled order, SEP, then ``ceil(length / 2)`` distinct start symbols ``x``, each
  followed by its answer ``f^k(x)`` for ``k = hops`` links (the answers are scored). On a
  single cycle of ``n >= 2 k`` links every shorter chain ends elsewhere, forwards
  (``f^j(x) != f^k(x)`` for ``j < k``) and backwards (``f^k = f^-(n - k)``, and
  ``n - k >= k``), so an answer needs ``k`` lookups; with half of the symbols queried,
  the earlier answers never pin down the last one.

Opt-in tasks (:data:`EXTRA_TASKS`) take token ids after the data symbols, so a suite of
default tasks keeps its vocabulary whatever tasks are added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ALL_TASKS",
    "EXTRA_TASKS",
    "IGNORE_INDEX",
    "PAD",
    "SEP",
    "TASKS",
    "TaskBatch",
    "TaskSuite",
    "copy_task",
    "to_device",
]

IGNORE_INDEX = -100
PAD, SEP = 0, 1
TASKS = ("copy", "reverse", "sort", "mqar", "modadd")  # the default suite: ids 2 .. 6
EXTRA_TASKS = ("hops",)  # opt-in: their ids follow the data symbols
ALL_TASKS = TASKS + EXTRA_TASKS


@dataclass
class TaskBatch:
    inputs: Tensor  # (b, t) token ids
    targets: Tensor  # (b, t) next-token targets, IGNORE_INDEX where unscored
    task_ids: Tensor | None = None  # (b,) index into the suite's tasks, when known
    padding: Tensor | None = None  # (b, t) True at padding positions, when there are any

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TaskBatch:
        """The batch with every tensor on ``device`` (see :func:`to_device`)."""
        return TaskBatch(
            *(
                None if x is None else to_device(x, device, non_blocking=non_blocking)
                for x in (self.inputs, self.targets, self.task_ids, self.padding)
            )  # type: ignore[arg-type]
        )

    def rows(self, index: slice) -> TaskBatch:
        """The batch restricted to rows ``index`` (every field that has rows)."""
        return TaskBatch(
            self.inputs[index],
            self.targets[index],
            None if self.task_ids is None else self.task_ids[index],
            None if self.padding is None else self.padding[index],
        )


def to_device(x: Tensor, device: torch.device | str, non_blocking: bool = False) -> Tensor:
    """``x`` on ``device``. A non-blocking copy from the CPU to CUDA goes through pinned
    memory: from pageable memory CUDA copies a large tensor only once the GPU's queued
    work is done, which would make the host wait."""
    if non_blocking and x.device.type == "cpu" and torch.device(device).type == "cuda":
        if x.is_contiguous():
            x = x.pin_memory()
        else:  # a strided pinned tensor would be staged through pageable memory again
            x = torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x)
    return x.to(device, non_blocking=non_blocking)


def _finish(seq: Tensor, answer_start: int) -> TaskBatch:
    """inputs/targets from full sequences whose answer starts at ``answer_start``."""
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, : answer_start - 1] = IGNORE_INDEX
    return TaskBatch(inputs, targets)


def copy_task(
    batch_size: int, length: int, vocab_size: int, *, generator: torch.Generator | None = None
) -> TaskBatch:
    """``x_1 .. x_n SEP x_1 .. x_n`` with token ``0`` as the separator and symbols from
    ``1 .. vocab_size - 1`` (a stand-alone copy task, without a task token)."""
    if length < 1 or vocab_size < 3 or batch_size < 1:
        raise ValueError(
            f"copy_task: need batch_size >= 1, length >= 1 and vocab_size >= 3, got "
            f"batch_size={batch_size}, length={length}, vocab_size={vocab_size}"
        )
    symbols = torch.randint(1, vocab_size, (batch_size, length), generator=generator)
    sep = torch.zeros(batch_size, 1, dtype=torch.long)
    return _finish(torch.cat([symbols, sep, symbols], dim=1), length + 1)


class TaskSuite:
    """A mixture of built-in tasks over one vocabulary.

    Args:
        tasks: names from :data:`TASKS` (default: all).
        length: symbols per prompt (key-value pairs for mqar).
        num_symbols: data symbols in the vocabulary (mqar keys use the first half, values
            the second half).
        modulus: the modulus of ``modadd`` (at most ``num_symbols``).
        hops: links ``hops`` follows from its start symbol (at most ``length / 2``).
    """

    def __init__(
        self,
        tasks: Sequence[str] = TASKS,
        *,
        length: int = 6,
        num_symbols: int = 16,
        modulus: int = 11,
        hops: int = 2,
    ) -> None:
        unknown = [t for t in tasks if t not in ALL_TASKS]
        if unknown or not tasks:
            raise ValueError(
                f"TaskSuite: unknown task(s) {unknown or list(tasks)}; known: {list(ALL_TASKS)}"
            )
        if length < 1:
            raise ValueError(f"TaskSuite: length must be >= 1, got {length}")
        if num_symbols < 4:
            raise ValueError(f"TaskSuite: num_symbols must be >= 4, got {num_symbols}")
        if "mqar" in tasks and length > num_symbols // 2:
            raise ValueError(
                f"TaskSuite: mqar needs length ({length}) <= num_symbols // 2 "
                f"({num_symbols // 2}) distinct keys"
            )
        if "hops" in tasks and not (1 <= hops and 2 * hops <= length <= num_symbols):
            raise ValueError(
                f"TaskSuite: hops needs 1 <= hops ({hops}), 2 x hops <= length ({length}) <= "
                f"num_symbols ({num_symbols}): on a cycle of length links, length - hops links "
                "backwards reach the same answer, which must be no shorter"
            )
        if not 2 <= modulus <= num_symbols:
            raise ValueError(
                f"TaskSuite: modulus ({modulus}) must be in [2, num_symbols={num_symbols}]"
            )
        self.tasks = tuple(tasks)
        self.length = length
        self.num_symbols = num_symbols
        self.modulus = modulus
        self.hops = hops
        self.first_symbol = 2 + len(TASKS)
        self.extra_tasks = tuple(t for t in EXTRA_TASKS if t in self.tasks)

    @property
    def vocab_size(self) -> int:
        return self.first_symbol + self.num_symbols + len(self.extra_tasks)

    def task_token(self, task: str) -> int:
        """The id of ``task``'s token (default tasks 2 .. 6; opt-in ones after the
        symbols)."""
        if task in self.extra_tasks:
            return self.first_symbol + self.num_symbols + self.extra_tasks.index(task)
        return 2 + TASKS.index(task)

    @property
    def max_seq_len(self) -> int:
        """Longest input a batch can hold (mqar's ``1 + 2n + 1 + 2n - 1`` tokens)."""
        return max(self.sequence_length(t) for t in self.tasks) - 1

    def sequence_length(self, task: str) -> int:
        n = self.length
        return {
            "copy": 2 * n + 2,
            "reverse": 2 * n + 2,
            "sort": 2 * n + 2,
            "mqar": 4 * n + 2,
            "modadd": 5,
            "hops": 2 * n + 2 * ((n + 1) // 2) + 2,
        }[task]

    def chance_accuracy(self, task: str) -> float:
        """Token accuracy of guessing uniformly among the answer's possible symbols."""
        if task == "mqar":
            return 1.0 / (self.num_symbols - self.num_symbols // 2)
        if task == "modadd":
            return 1.0 / self.modulus
        if task == "hops":  # one of the other symbols of the cycle
            return 1.0 / (self.length - 1)
        return 1.0 / self.num_symbols

    def _generate(self, task: str, batch_size: int, gen: torch.Generator) -> TaskBatch:
        n, s0 = self.length, self.first_symbol
        b = batch_size
        head = torch.full((b, 1), self.task_token(task), dtype=torch.long)
        sep = torch.full((b, 1), SEP, dtype=torch.long)
        if task in ("copy", "reverse", "sort"):
            x = torch.randint(0, self.num_symbols, (b, n), generator=gen)
            y = {"copy": x, "reverse": x.flip(1), "sort": x.sort(dim=1).values}[task]
            seq = torch.cat([head, x + s0, sep, y + s0], dim=1)
            return _finish(seq, n + 2)
        if task == "mqar":
            half = self.num_symbols // 2
            keys = torch.rand(b, half, generator=gen).argsort(dim=1)[:, :n]  # distinct keys
            values = torch.randint(half, self.num_symbols, (b, n), generator=gen)
            order = torch.rand(b, n, generator=gen).argsort(dim=1)
            q_keys, q_values = keys.gather(1, order), values.gather(1, order)
            pairs = torch.stack([keys, values], dim=2).flatten(1)  # k1 v1 k2 v2 ...
            queries = torch.stack([q_keys, q_values], dim=2).flatten(1)
            seq = torch.cat([head, pairs + s0, sep, queries + s0], dim=1)
            batch = _finish(seq, 2 * n + 2)
            batch.targets[:, 2 * n + 1 :: 2] = IGNORE_INDEX  # score the values, not the keys
            return batch
        if task == "hops":
            cycle = torch.rand(b, self.num_symbols, generator=gen).argsort(dim=1)[:, :n]
            following = cycle.roll(-1, dims=1)  # f(cycle[i]) = cycle[i + 1 mod n]
            order = torch.rand(b, n, generator=gen).argsort(dim=1)
            links = torch.stack([cycle.gather(1, order), following.gather(1, order)], dim=2)
            starts = torch.rand(b, n, generator=gen).argsort(dim=1)[:, : (n + 1) // 2]
            queries = torch.stack(
                [cycle.gather(1, starts), cycle.gather(1, (starts + self.hops) % n)], dim=2
            ).flatten(1)  # x1 f^k(x1) x2 f^k(x2) ...
            seq = torch.cat([head, links.flatten(1) + s0, sep, queries + s0], dim=1)
            batch = _finish(seq, 2 * n + 2)
            batch.targets[:, 2 * n + 1 :: 2] = IGNORE_INDEX  # score the answers, not starts
            return batch
        a = torch.randint(0, self.modulus, (b, 2), generator=gen)
        c = a.sum(dim=1, keepdim=True) % self.modulus
        return _finish(torch.cat([head, a + s0, sep, c + s0], dim=1), 4)

    def sample(
        self, batch_size: int, generator: torch.Generator, *, task: str | None = None
    ) -> TaskBatch:
        """A batch with each row's task drawn uniformly (or all rows of ``task``),
        right-padded to :attr:`max_seq_len`."""
        if task is not None and task not in self.tasks:
            raise ValueError(f"TaskSuite: unknown task {task!r}; this suite has {list(self.tasks)}")
        if task is None:
            ids = torch.randint(0, len(self.tasks), (batch_size,), generator=generator)
        else:
            ids = torch.full((batch_size,), self.tasks.index(task), dtype=torch.long)
        t = self.max_seq_len
        inputs = torch.full((batch_size, t), PAD, dtype=torch.long)
        targets = torch.full((batch_size, t), IGNORE_INDEX, dtype=torch.long)
        padding = torch.ones((batch_size, t), dtype=torch.bool)
        for i, name in enumerate(self.tasks):
            rows = (ids == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            part = self._generate(name, rows.numel(), generator)
            width = part.inputs.size(1)
            inputs[rows, :width] = part.inputs
            targets[rows, :width] = part.targets
            padding[rows, :width] = False
        return TaskBatch(inputs, targets, ids, padding)

    def prompt_length(self, task: str) -> int:
        """Tokens before the first answer token (task token, prompt, SEP; for mqar also
        the first queried key)."""
        return {"mqar": 2 * self.length + 3, "modadd": 4, "hops": 2 * self.length + 3}.get(
            task, self.length + 2
        )

    def token_names(
        self,
        tokens: Sequence[int],
        *,
        sep: str = "SEP",
        pad: str | None = "pad",
        task: str = "<{}>",
    ) -> list[str]:
        """A name per token: data symbols as their numbers (0 .. num_symbols - 1),
        ``sep`` for SEP, the task's name in ``task``, ``pad`` for padding (dropped when
        ``None``)."""
        names = []
        for tok in tokens:
            if tok == PAD:
                if pad is not None:
                    names.append(pad)
            elif tok == SEP:
                names.append(sep)
            elif tok < self.first_symbol:
                names.append(task.format(TASKS[tok - 2]))
            elif tok >= self.first_symbol + self.num_symbols:
                names.append(
                    task.format(self.extra_tasks[tok - self.first_symbol - self.num_symbols])
                )
            else:
                names.append(str(tok - self.first_symbol))
        return names

    def render(self, tokens: Sequence[int]) -> str:
        """Tokens as a person reads them: ``copy: 3 1 4 | 3 1 4`` (padding dropped)."""
        return " ".join(self.token_names(tokens, sep="|", pad=None, task="{}:"))

    def encode_prompt(self, task: str, text: str) -> tuple[Tensor, int]:
        """A prompt written as symbol numbers -> ((1, t) tokens up to the answer, answer
        length). ``copy``/``reverse``/``sort``: the symbols (``"3 1 4"`` or ``"3,1,4"``);
        ``modadd``: two numbers below the modulus; ``mqar``: key-value pairs, ``|``, then
        the key to recall (``"1 9 2 12 | 2"``); ``hops``: links ``x f(x)``, ``|``, then
        the start symbol (``"3 5 5 1 1 3 | 3"``)."""
        if task not in self.tasks:
            raise ValueError(f"TaskSuite: unknown task {task!r}; this suite has {list(self.tasks)}")
        before, bar, after = text.partition("|")
        parts = [self._symbols(task, before), self._symbols(task, after)]
        if task == "mqar":
            pairs, query = parts
            half = self.num_symbols // 2
            if not bar or len(query) != 1 or not pairs or len(pairs) % 2:
                raise ValueError(
                    f"mqar prompt {text!r}: write key-value pairs, '|', then one key, "
                    "e.g. '1 9 2 12 | 2'"
                )
            keys, values = pairs[0::2], pairs[1::2]
            if any(k >= half for k in keys + query) or any(v < half for v in values):
                raise ValueError(
                    f"mqar prompt {text!r}: keys must lie in [0, {half}), values in "
                    f"[{half}, {self.num_symbols})"
                )
            symbols, tail, answer = pairs, query, 1
        elif task == "hops":
            links, start = parts
            if not bar or len(start) != 1 or not links or len(links) % 2:
                raise ValueError(
                    f"hops prompt {text!r}: write links x f(x), '|', then the start symbol, "
                    "e.g. '3 5 5 1 1 3 | 3'"
                )
            keys = links[0::2]
            if len(set(keys)) != len(keys) or start[0] not in keys:
                raise ValueError(
                    f"hops prompt {text!r}: each symbol may start one link, and the start "
                    "symbol must start one"
                )
            symbols, tail, answer = links, start, 1
        else:
            if bar or not parts[0]:
                raise ValueError(f"{task} prompt {text!r}: write the symbols, e.g. '3 1 4'")
            symbols, tail = parts[0], []
            answer = 1 if task == "modadd" else len(symbols)
            if task == "modadd" and (len(symbols) != 2 or max(symbols) >= self.modulus):
                raise ValueError(
                    f"modadd prompt {text!r}: write two numbers below the modulus "
                    f"{self.modulus}, e.g. '3 5'"
                )
        s0 = self.first_symbol
        tokens = [self.task_token(task), *(v + s0 for v in symbols), SEP, *(v + s0 for v in tail)]
        return torch.tensor([tokens]), answer

    def _symbols(self, task: str, text: str) -> list[int]:
        words = text.replace(",", " ").split()
        bad = [w for w in words if not (w.isascii() and w.isdigit()) or int(w) >= self.num_symbols]
        if bad:
            raise ValueError(
                f"{task} prompt: {bad} are not symbols; write numbers in [0, {self.num_symbols})"
            )
        return [int(w) for w in words]
