"""The demo task (codi_attn.demo.task): synthetic GSM8K-style problems, determinism, disjoint splits, answers."""

import re

import pytest

from codi_attn.demo import task
from codi_attn.demo.task import synthetic_records, train_stream

STEP = re.compile(r"^(\d+)([+\-*])(\d+)=<<(\d+)([+\-*])(\d+)=(\d+)>>(\d+)$")
SENTENCE_OPS = [  # (regex on a question sentence, operation)
    (re.compile(r"^\w+ (?:gets|buys|finds) (\d+) more\.$"), "+"),
    (re.compile(r"^\w+ (?:gives away (\d+)|sells (\d+) today|loses (\d+) today)\.$"), "-"),
    (re.compile(r"^\w+ doubles the \w+\.$"), "*2"),
    (re.compile(r"^\w+ triples the \w+\.$"), "*3"),
]


def solve_question(question: str) -> list[tuple[int, str, int]]:
    """Read the (value, op, operand) steps off the question text alone."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    v = int(re.fullmatch(r"(\w+) has (\d+) (\w+)\.", sentences[0]).group(2))
    assert re.fullmatch(r" How many \w+ does \w+ have\?", sentences[-1])
    steps = []
    for s in sentences[1:-1]:
        for pattern, op in SENTENCE_OPS:
            if m := pattern.fullmatch(s.strip()):
                b = int(op[1]) if op.startswith("*") else int(next(g for g in m.groups() if g))
                op = op[0]
                steps.append((v, op, b))
                v = v + b if op == "+" else v - b if op == "-" else v * b
                break
        else:
            raise AssertionError(f"unknown sentence {s!r}")
    return steps


def check_record(rec: dict) -> int:
    """Recompute every <<...>> step and the final answer; return the number of steps."""
    assert set(rec) == {"question", "answer"}
    q = rec["question"]
    assert q == q.strip().replace("  ", " ")
    *lines, last = rec["answer"].split("\n")
    expected = solve_question(q)
    assert len(lines) == len(expected)
    prev = None
    for line, (v, op, b) in zip(lines, expected):
        m = STEP.match(line)
        assert m, line
        a1, op1, b1, a2, op2, b2, r, r2 = m.groups()
        assert (a1, op1, b1) == (a2, op2, b2) == (str(v), op, str(b))
        assert int(r) == int(r2) == eval(f"{a1}{op1}{b1}")  # the calculator annotation is right
        assert prev is None or int(a1) == prev  # each step continues from the last result
        assert 0 <= int(r) <= task.MAX_VALUE
        prev = int(r)
    assert last == f"#### {prev}"
    return len(lines)


def test_deterministic():
    assert synthetic_records("test", 50) == synthetic_records("test", 50)
    assert synthetic_records("train", 200) == synthetic_records("train", 200)
    a, b = train_stream(seed=7, steps=(3,)), train_stream(seed=7, steps=(3,))
    assert [next(a) for _ in range(30)] == [next(b) for _ in range(30)]
    assert synthetic_records("train", 10) != [next(train_stream(seed=8)) for _ in range(10)]


def test_test_split_default_size_and_mix():
    test = synthetic_records("test")
    assert len(test) == task.TEST_SIZE == 1000
    assert len({r["question"] for r in test}) == len(test)
    counts = [check_record(r) for r in test]
    assert counts[:6] == [5, 6, 7, 5, 6, 7]
    assert {c: counts.count(c) for c in (5, 6, 7)} == {5: 334, 6: 333, 7: 333}
    assert synthetic_records("test", 10) == test[:10]


def test_every_step_recomputed_train():
    for rec in synthetic_records("train", 2000):
        assert check_record(rec) in task.STEPS
    stream = train_stream(seed=3, steps=(1, 2, 3, 4))
    assert {check_record(next(stream)) for _ in range(500)} == {1, 2, 3, 4}


def test_splits_disjoint():
    test = synthetic_records("test")
    test_questions = {r["question"] for r in test}
    test_chains = {tuple(solve_question(r["question"])) for r in test}
    train = synthetic_records("train", 20_000)
    assert not test_questions & {r["question"] for r in train}
    # not even the same arithmetic under other names
    assert not test_chains & {tuple(solve_question(r["question"])) for r in train}


def test_bad_split():
    with pytest.raises(ValueError):
        synthetic_records("validation")
    with pytest.raises(ValueError):
        synthetic_records("test", 5000)


def test_change_number_changes_one_number_and_recomputes_the_chain():
    """A record with its start value or one operand changed: exactly that number of the question differs, and
    the recomputed solution is the one the task renders for the changed chain."""
    from codi_attn.demo.task import answer_if, apply_op, chain_of, change_number

    checked = 0
    for rec in synthetic_records("test", 40):
        start, ops = chain_of(rec)
        candidates = [(0, start)] + [(j, b) for j, (op, b) in enumerate(ops, 1) if op != "*"]
        for which, old in candidates:
            new = change_number(rec, which, old + 1)
            if new is None:
                continue
            before, after = re.findall(r"\d+", rec["question"]), re.findall(r"\d+", new["question"])
            assert len(before) == len(after) and sum(a != b for a, b in zip(before, after)) == 1
            assert new["question"].split() != rec["question"].split()
            s2, ops2 = chain_of(new)
            v = s2
            for op, b in ops2:
                v = apply_op(v, op, b)
            assert new["answer"].endswith(f"#### {v}") and (s2, ops2) != (start, ops)
            checked += 1
        value = apply_op(start, *ops[0])
        assert answer_if(rec, 1, value) == int(rec["answer"].split("####")[-1])
    assert checked > 40
    assert change_number(synthetic_records("test", 1)[0], 0, 99) is None  # out of range
