"""Seeded multi-step arithmetic word problems written as GSM8K records.

A problem is a start value and 5-7 chained operations (add, subtract, double,
triple) on one person's stock of objects; every operand and every intermediate
result stays in 0..MAX_VALUE (an operation is drawn only among those whose result
stays in range; no modulo). Every statement is exactly five words or symbols long
(the closing question seven), so with a word-level tokenizer statement k sits at a
fixed offset and all questions with the same number of operations have one length:

    {"question": "Sue has 9 pens. Sue sells 1 today. Sue doubles the pens.
                  How many pens does Sue have?",
     "answer": "9-1=<<9-1=8>>8\\n8*2=<<8*2=16>>16\\n#### 16"}

The train and test splits come from differently seeded streams; a training problem
is skipped when its chain (start value and operations, whatever the names) is one
of the test split's, so no held-out question is ever seen in training, not even
with other names.
"""

import random
import re
from collections.abc import Iterator
from functools import cache

MAX_VALUE = 19  # largest start, operand or intermediate value
MAX_OPERAND = 9  # largest number added or subtracted
STEPS = (5, 6, 7)  # numbers of chained operations in the shipped splits (with 2-4 a small model answers
# in one pass over the question and its thoughts carry nothing problem-specific: see the demo model's card)
TEST_SIZE = 1000  # default size of the test split
TRAIN_SIZE = 100_000  # default size of the train split
SEEDS = {"train": 1, "test": 2}  # stream seed of each split

NAMES = ("Sue", "Tom", "Ann", "Bob", "Eve", "Sam", "Kim", "Max")
OBJECTS = ("pens", "apples", "cards", "coins", "books", "shells", "stamps", "eggs")
TEMPLATES = {
    "+": ("{name} gets {b} more.", "{name} buys {b} more.", "{name} finds {b} more."),
    "-": ("{name} gives away {b}.", "{name} sells {b} today.", "{name} loses {b} today."),
    "*": ("{name} doubles the {obj}.", "{name} triples the {obj}."),
}

Chain = tuple[int, tuple[tuple[str, int], ...]]  # (start, ((op, operand), ...))


def apply_op(v: int, op: str, b: int) -> int:
    """Result of one operation: v + b, v - b or v * b."""
    return v + b if op == "+" else v - b if op == "-" else v * b


def random_chain(rng: random.Random, n_steps: int) -> Chain:
    """A start value and n_steps operations; the kind of each operation is drawn
    uniformly among the kinds that can keep the result in 0..MAX_VALUE, then its
    operand uniformly among those that do."""
    start = v = rng.randint(1, MAX_VALUE)
    ops = []
    for _ in range(n_steps):
        choices = {
            "+": [b for b in range(1, MAX_OPERAND + 1) if v + b <= MAX_VALUE],
            "-": [b for b in range(1, MAX_OPERAND + 1) if v - b >= 0],
            "*": [b for b in (2, 3) if v * b <= MAX_VALUE],
        }
        op = rng.choice([k for k, bs in choices.items() if bs])
        b = rng.choice(choices[op])
        ops.append((op, b))
        v = apply_op(v, op, b)
    return start, tuple(ops)


def render(chain: Chain, name: str, obj: str, rng: random.Random) -> dict:
    """The GSM8K record of a chain: one five-token sentence per operation, then
    one <<a op b=c>> line per operation and '#### N'."""
    start, ops = chain
    sentences = [f"{name} has {start} {obj}."]
    lines = []
    v = start
    for op, b in ops:
        template = TEMPLATES[op][b - 2] if op == "*" else rng.choice(TEMPLATES[op])
        sentences.append(template.format(name=name, b=b, obj=obj))
        r = apply_op(v, op, b)
        lines.append(f"{v}{op}{b}=<<{v}{op}{b}={r}>>{r}")
        v = r
    sentences.append(f"How many {obj} does {name} have?")
    return {"question": " ".join(sentences), "answer": "\n".join(lines + [f"#### {v}"])}


def random_problem(rng: random.Random, n_steps: int) -> tuple[Chain, dict]:
    """A random chain of n_steps operations and its record."""
    chain = random_chain(rng, n_steps)
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    return chain, render(chain, name, obj, rng)


@cache
def _test_split() -> tuple[tuple[dict, ...], frozenset[Chain]]:
    """The full default test split: distinct questions, step counts cycling
    through STEPS, and the set of their chains."""
    rng = random.Random(SEEDS["test"])
    records, questions, chains = [], set(), set()
    while len(records) < TEST_SIZE:
        chain, rec = random_problem(rng, STEPS[len(records) % len(STEPS)])
        if rec["question"] not in questions:
            records.append(rec)
            questions.add(rec["question"])
            chains.add(chain)
    return tuple(records), frozenset(chains)


def train_stream(seed: int = SEEDS["train"], steps: tuple[int, ...] = STEPS,
                 weights: tuple[float, ...] | None = None) -> Iterator[dict]:
    """Endless training records, each with its number of operations drawn from
    `steps` (with `weights`); chains of the test split are skipped."""
    rng = random.Random(seed)
    test_chains = _test_split()[1]
    while True:
        chain, rec = random_problem(rng, rng.choices(steps, weights)[0])
        if chain not in test_chains:
            yield rec


def synthetic_records(split: str, n: int | None = None) -> list[dict]:
    """The first n records of a split (n=None: TEST_SIZE for test, TRAIN_SIZE for
    train). Deterministic; no test chain (so no test question) is in train."""
    if split == "test":
        records = _test_split()[0]
        if n is not None and n > TEST_SIZE:
            raise ValueError(f"the synthetic test split has {TEST_SIZE} problems, asked for {n}")
        return [dict(r) for r in records[:n]]
    if split == "train":
        stream = train_stream()
        return [next(stream) for _ in range(TRAIN_SIZE if n is None else n)]
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def chain_of(record: dict) -> Chain:
    """The chain (start, ((op, operand), ...)) a record was rendered from, read off its solution lines."""
    steps = re.findall(r"<<(\d+)([+\-*])(\d+)=(\d+)>>", record["answer"])
    if not steps:
        raise ValueError("not a record of this task: its solution has no <<a op b=c>> steps")
    return int(steps[0][0]), tuple((op, int(b)) for _, op, b, _ in steps)


def change_number(record: dict, which: int, new: int) -> dict | None:
    """The record with one number of its question changed (which = 0: the start value, which = j: the operand of
    operation j, an added or subtracted amount) and its solution recomputed; None where that number is not in
    the question (doubling and tripling) or a value would leave 0..MAX_VALUE (or the operand 1..MAX_OPERAND)."""
    start, ops = chain_of(record)
    if which == 0:
        if not 1 <= new <= MAX_VALUE:
            return None
        start = new
    else:
        op, b = ops[which - 1]
        if op == "*" or not 1 <= new <= MAX_OPERAND:
            return None
        ops = ops[: which - 1] + ((op, new),) + ops[which:]
    v, lines = start, []
    for op, b in ops:
        r = apply_op(v, op, b)
        if not 0 <= r <= MAX_VALUE:
            return None
        lines.append(f"{v}{op}{b}=<<{v}{op}{b}={r}>>{r}")
        v = r
    sentences = record["question"].split(". ")
    old = re.search(r"\d+", sentences[which])
    if old is None:
        return None
    sentences[which] = sentences[which][: old.start()] + str(new) + sentences[which][old.end():]
    return {"question": ". ".join(sentences), "answer": "\n".join(lines + [f"#### {v}"])}


def answer_if(record: dict, step: int, value: int) -> int:
    """The final answer if step `step` (1-based) of the record's chain had the result `value`: the later
    operations applied to it (no range check: a counterfactual, not a problem of the task)."""
    _, ops = chain_of(record)
    for op, b in ops[step:]:
        value = apply_op(value, op, b)
    return value
