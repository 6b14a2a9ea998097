"""GSM8K records and the seed-42 problem sample (codi-spec section 6).

    records = load_records("path/to/train.jsonl", "train")   # or "gsm8k" (hub) or "synthetic"
    problems = sample_problems(records, 100, seed=42, split="train")
    problems[0].id, problems[0].answer        # ('train_53', '...')
    dataset_fingerprint(problems)             # sha256 of the ids and questions

Every problem in bad input raises DatasetError with a message that names the file, the
line (for JSONL) and the missing key.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from codi_attn.answers import parse_gold
from codi_attn.hub import error_line

__all__ = ["Problem", "DatasetError", "load_records", "sample_problems", "dataset_fingerprint",
           "gold_answer", "resolve_n"]

HUB_NAME = "gsm8k"
SYNTHETIC_NAME = "synthetic"
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset that cannot be read or a record that is not a GSM8K record."""


@dataclass(frozen=True)
class Problem:
    """One sampled GSM8K problem. ``id`` is ``{split}_{index in the split}``."""

    id: str
    question: str
    answer: str  # gold text after '####', stripped
    solution: str  # the full answer field (reasoning steps and '#### N')


def gold_answer(solution: str) -> str:
    """The text after the last '####' of a GSM8K answer field, stripped ('' when absent)."""
    head, sep, tail = solution.rpartition("####")
    return tail.strip() if sep else ""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def _check_record(rec, where: str) -> dict:
    """Check one record: a dict with non-empty string 'question' and an 'answer' ending in '#### N', N a number."""
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected a JSON object with 'question' and 'answer', "
                           f"got {type(rec).__name__}")
    for key in ("question", "answer"):
        if key not in rec:
            raise DatasetError(f"{where}: record has no {key!r} key (keys: {sorted(rec)})")
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise DatasetError(f"{where}: {key!r} must be a non-empty string, got {rec[key]!r:.60}")
    gold = gold_answer(rec["answer"])
    if not gold:
        raise DatasetError(f"{where}: 'answer' has no gold answer after '####': {rec['answer'][-60:]!r}")
    if parse_gold(gold) is None:
        raise DatasetError(f"{where}: the gold answer after '####' is not a number: {gold[:60]!r} (GSM8K golds "
                           f"are plain numbers such as 72, -4 or 1,000)")
    return rec


def _read_file(path: Path) -> list[dict]:
    if not path.exists():
        hint = "" if path.suffix or len(path.parts) > 1 else \
            f" (and it is not one of the dataset names {HUB_NAME}, {SYNTHETIC_NAME})"
        raise DatasetError(f"dataset file {path} does not exist{hint}")
    if not path.is_file():
        raise DatasetError(f"dataset {path} is not a file (pass a .jsonl or .json file of GSM8K records)")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        raise DatasetError(f"dataset file {path}: expected a .jsonl or .json file, got {suffix or 'no suffix'!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (some Windows editors write one) is no JSON
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"dataset file {path} cannot be read: {e}") from e
    records = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}, line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
            records.append(_check_record(rec, f"{path}, line {lineno}"))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
        if not isinstance(data, list):
            raise DatasetError(f"{path}: a .json dataset must be a list of records, got {type(data).__name__}")
        records = [_check_record(rec, f"{path}, record {i}") for i, rec in enumerate(data)]
    if not records:
        raise DatasetError(f"dataset file {path} holds no records")
    return records


def _read_hub(split: str) -> list[dict]:
    try:
        import datasets
        ds = datasets.load_dataset("gsm8k", "main", split=split)
    except Exception as e:  # offline, no cache, hub down: all end the same way for the user
        raise DatasetError(
            f"could not load the GSM8K {split} split from the Hugging Face hub ({error_line(e)}). Without network, "
            f"pass a local copy of OpenAI's grade-school-math {split}.jsonl: --dataset /path/to/gsm8k/{split}.jsonl"
        ) from e
    return [_check_record(dict(rec), f"hub gsm8k/main {split}, row {i}") for i, rec in enumerate(ds)]


def load_records(dataset: str, split: str) -> list[dict]:
    """GSM8K records ({'question', 'answer'}) of ``split`` from ``dataset``.

    ``dataset`` is "gsm8k" (the hub's gsm8k/main), "synthetic" (generated offline by
    codi_attn.demo.task) or a path to a .jsonl file (one record a line) or a .json file (a
    list of records). A file is taken as it is: ``split`` only names its problems.
    """
    _check_split(split)
    if dataset == HUB_NAME:
        return _read_hub(split)
    if dataset == SYNTHETIC_NAME:
        from codi_attn.demo.task import synthetic_records  # lazy: only the offline demo needs it
        return [_check_record(rec, f"synthetic {split}, record {i}")
                for i, rec in enumerate(synthetic_records(split))]
    return _read_file(Path(dataset).expanduser())


def resolve_n(n_problems: str | int | None, n_records: int) -> int | None:
    """Parse the n_problems parameter: '0', 'all', None -> None (the whole split), else an int
    in 1..n_records. Raises DatasetError naming n_problems otherwise."""
    if n_problems is None or str(n_problems).strip().lower() in ("0", "all", ""):
        return None
    try:
        n = int(str(n_problems).strip())
    except ValueError:
        raise DatasetError(f"n_problems must be a positive integer, 0 or 'all', got {n_problems!r}") from None
    if n < 0:
        raise DatasetError(f"n_problems must be a positive integer, 0 or 'all', got {n}")
    if n > n_records:
        raise DatasetError(f"n_problems={n} is larger than the split, which has {n_records} problems "
                           f"(use 0 or 'all' for the whole split)")
    return n or None


def sample_problems(records: list[dict], n: int | None, seed: int = 42, split: str = "train") -> list[Problem]:
    """The design's sample: ``random.seed(seed); sorted(random.sample(range(len(records)), n))``.

    ``n`` None or 0 takes every record (in order). Ids are ``{split}_{index}``. Checks that
    ids are unique, questions non-empty and every answer has a gold number after '####'.
    """
    _check_split(split)
    if n is None or n == 0:
        indices = list(range(len(records)))
    else:
        if n < 0:
            raise DatasetError(f"n_problems must be a positive integer, 0 or None, got {n}")
        if n > len(records):
            raise DatasetError(f"n_problems={n} is larger than the split, which has {len(records)} problems")
        # random.Random(seed).sample == random.seed(seed); random.sample(...), without
        # touching the global random state
        indices = sorted(random.Random(seed).sample(range(len(records)), n))
    problems = []
    for idx in indices:
        rec = _check_record(records[idx], f"{split} record {idx}")
        problems.append(Problem(id=f"{split}_{idx}", question=rec["question"],
                                answer=gold_answer(rec["answer"]), solution=rec["answer"]))
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise DatasetError("sample holds duplicate problem ids")
    return problems


def dataset_fingerprint(problems: list[Problem]) -> str:
    """sha256 (hex) over the problems' ids and questions, in order: equal samples, equal print."""
    h = hashlib.sha256()
    for p in problems:
        h.update(p.id.encode("utf-8"))
        h.update(b"\0")
        h.update(p.question.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
