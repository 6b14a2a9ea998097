"""codi_attn.data: reading GSM8K records, the seed-42 sample, the fingerprint, bad input."""
import json
import random

import pytest

from codi_attn.data import (DatasetError, Problem, dataset_fingerprint, gold_answer, load_records,
                            resolve_n, sample_problems)

@pytest.fixture(scope="module")
def train_records(real_gsm8k):
    return load_records(str(real_gsm8k), "train")


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


REC = {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"}


def test_seed42_sample_matches_design(train_records):
    assert len(train_records) == 7473
    problems = sample_problems(train_records, 100, seed=42, split="train")
    # the design's recipe, computed independently with the global generator
    random.seed(42)
    expected = sorted(random.sample(range(7473), 100))
    assert [p.id for p in problems] == [f"train_{i}" for i in expected]
    assert [p.id for p in problems[:4]] == ["train_53", "train_204", "train_217", "train_244"]
    first = train_records[53]
    assert problems[0] == Problem("train_53", first["question"], first["answer"].split("####")[-1].strip(),
                                  first["answer"])
    assert all(p.question and p.answer for p in problems)


def test_sample_leaves_global_random_state_alone(train_records):
    random.seed(7)
    before = random.random()
    random.seed(7)
    sample_problems(train_records, 10)
    assert random.random() == before


def test_whole_split_and_fingerprint(train_records):
    everything = sample_problems(train_records, None)
    assert len(everything) == 7473 and everything[0].id == "train_0" and everything[-1].id == "train_7472"
    assert sample_problems(train_records, 0) == everything
    a = sample_problems(train_records, 8)
    assert dataset_fingerprint(a) == dataset_fingerprint(sample_problems(train_records, 8))
    assert len(dataset_fingerprint(a)) == 64
    assert dataset_fingerprint(a) != dataset_fingerprint(sample_problems(train_records, 8, seed=1))
    assert dataset_fingerprint(a) != dataset_fingerprint(sample_problems(train_records, 8, split="test"))


def test_gold_answer():
    assert gold_answer("a\n#### 1,234 ") == "1,234"
    assert gold_answer("no marker") == ""
    assert gold_answer("x #### 1\n#### 2") == "2"


def test_json_list_and_split_in_ids(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps([REC, {**REC, "question": "Q2?"}]))
    recs = load_records(str(path), "test")
    problems = sample_problems(recs, None, split="test")
    assert [p.id for p in problems] == ["test_0", "test_1"]
    assert problems[0].answer == "7" and problems[0].solution == REC["answer"]


def test_resolve_n():
    assert resolve_n("all", 10) is None and resolve_n("0", 10) is None and resolve_n(0, 10) is None
    assert resolve_n("7", 10) == 7 and resolve_n(10, 10) == 10
    with pytest.raises(DatasetError, match="n_problems=11 is larger than the split, which has 10"):
        resolve_n(11, 10)
    with pytest.raises(DatasetError, match="n_problems"):
        resolve_n("many", 10)
    with pytest.raises(DatasetError, match="n_problems"):
        resolve_n(-1, 10)


def test_sample_problems_names_a_negative_n_as_such():
    """A negative n is not 'larger than the split' (library callers reach sample_problems without resolve_n)."""
    with pytest.raises(DatasetError, match=r"^n_problems must be a positive integer, 0 or None, got -1$"):
        sample_problems([REC] * 3, -1)
    with pytest.raises(DatasetError, match="n_problems=4 is larger than the split, which has 3 problems"):
        sample_problems([REC] * 3, 4)


def test_n_larger_than_split():
    with pytest.raises(DatasetError, match="larger than the split"):
        sample_problems([REC, REC], 3)


def test_bad_split():
    with pytest.raises(DatasetError, match="split"):
        load_records("whatever.jsonl", "validation")


def test_missing_file(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"dataset file .*nope\.jsonl does not exist$"):
        load_records(str(tmp_path / "nope.jsonl"), "train")
    monkeypatch.chdir(tmp_path)  # a bare word that is neither a file nor a dataset name: a misspelt name
    with pytest.raises(DatasetError, match=r"^dataset file gsm8 does not exist \(and it is not one of the dataset "
                                           r"names gsm8k, synthetic\)$"):
        load_records("gsm8", "train")


def test_a_byte_order_mark_is_not_malformed_json(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "How many?", "answer": "#### 3"}).encode() + b"\n")
    assert load_records(str(path), "train")[0]["question"] == "How many?"


def test_directory_and_wrong_suffix(tmp_path):
    with pytest.raises(DatasetError, match="not a file"):
        load_records(str(tmp_path), "train")
    txt = tmp_path / "data.txt"
    txt.write_text("x")
    with pytest.raises(DatasetError, match=r"\.jsonl or \.json"):
        load_records(str(txt), "train")


def test_unreadable_file(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="cannot be read"):
        load_records(str(path), "train")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps(REC), json.dumps(REC), '{"question": "x", "answer"'])
    with pytest.raises(DatasetError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_records(path, "train")


@pytest.mark.parametrize("record, key", [({"answer": "#### 1"}, "question"), ({"question": "q?"}, "answer")])
def test_record_without_key(tmp_path, record, key):
    path = _write_jsonl(tmp_path / "missing.jsonl", [json.dumps(REC), json.dumps(record)])
    with pytest.raises(DatasetError, match=rf"missing\.jsonl, line 2: record has no '{key}' key"):
        load_records(path, "train")


def test_empty_question_and_no_gold(tmp_path):
    path = _write_jsonl(tmp_path / "e.jsonl", [json.dumps({**REC, "question": "  "})])
    with pytest.raises(DatasetError, match=r"line 1: 'question' must be a non-empty string"):
        load_records(path, "train")
    path = _write_jsonl(tmp_path / "g.jsonl", [json.dumps({**REC, "answer": "7"})])
    with pytest.raises(DatasetError, match=r"line 1: 'answer' has no gold answer after '####'"):
        load_records(path, "train")


@pytest.mark.parametrize("gold", ["seventy-two", "1/2"])
def test_gold_that_is_not_a_number_names_file_and_line(tmp_path, gold):
    path = _write_jsonl(tmp_path / "words.jsonl", [json.dumps(REC), json.dumps({**REC, "answer": f"x\n#### {gold}"})])
    with pytest.raises(DatasetError, match=rf"words\.jsonl, line 2: the gold answer after '####' is not a number: "
                                           rf"'{gold}'"):
        load_records(path, "train")


def test_not_an_object_and_empty_file(tmp_path):
    path = _write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DatasetError, match="line 1: expected a JSON object"):
        load_records(path, "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="holds no records"):
        load_records(str(empty), "train")


def test_hub_offline_tells_user_to_pass_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached copy to fall back on
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets", raising=False)
    with pytest.raises(DatasetError, match=r"--dataset /path/to/gsm8k/train\.jsonl"):
        load_records("gsm8k", "train")


def test_synthetic_dataset():
    from codi_attn.demo.task import synthetic_records

    recs = load_records("synthetic", "test")
    assert recs == synthetic_records("test") and all(gold_answer(r["answer"]) for r in recs)


def test_a_sample_of_the_whole_split_is_every_record_in_order():
    """n equal to the split's size is allowed (the bound is inclusive) and, sorted, is every record."""
    recs = [{**REC, "question": f"Q{i}?"} for i in range(5)]
    assert [p.id for p in sample_problems(recs, 5, split="test")] == [f"test_{i}" for i in range(5)]


def test_a_json_file_that_is_not_a_list_is_refused_naming_it(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(REC))
    with pytest.raises(DatasetError, match=r"one\.json: a \.json dataset must be a list of records, got dict$"):
        load_records(str(path), "train")


def test_a_bad_json_record_is_named_by_its_index_in_the_list(tmp_path):
    """Records of a .json list are counted from 0, as the problem ids count them."""
    path = tmp_path / "small.json"
    path.write_text(json.dumps([REC, {"answer": "#### 1"}]))
    with pytest.raises(DatasetError, match=r"small\.json, record 1: record has no 'question' key"):
        load_records(str(path), "train")


def test_the_suffix_may_be_upper_case(tmp_path):
    path = tmp_path / "TRAIN.JSONL"
    path.write_text(json.dumps(REC) + "\n")
    assert load_records(str(path), "train") == [REC]


def test_fingerprint_keeps_each_id_apart_from_its_question():
    """The fingerprint hashes each id and question as separate fields: moving text across the boundary between
    them is another sample."""
    a = [Problem("train_1", "2 apples?", "2", "#### 2")]
    b = [Problem("train_12", " apples?", "2", "#### 2")]
    assert dataset_fingerprint(a) != dataset_fingerprint(b)
    import hashlib
    assert dataset_fingerprint(a) == hashlib.sha256(b"train_1\x002 apples?\x00").hexdigest()
