"""The paper's datasets through their local-copy route: small fixtures in the real schemas, no network.

The fixture rows are invented placeholders (never rows of the real datasets).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from booster.data import hub
from booster.data.embedded import normalize
from booster.data.sources import (
    load_alignment,
    load_harmful,
    load_harmful_prompts,
    load_poison,
    load_probe,
    load_task,
    resolve,
    task_name,
)
from booster.errors import UserError
from booster.tasks import AGNEWS_INSTRUCTION, FINAL_ANSWER


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def beavertails_row(i: int, safe: bool) -> dict:
    return {
        "prompt": f"fixture question {i}",
        "response": f"fixture answer {i}",
        "category": {"animal_abuse": False, "privacy_violation": not safe},
        "is_safe": safe,
    }


@pytest.fixture
def beavertails(tmp_path) -> Path:
    folder = tmp_path / "BeaverTails"
    write_jsonl(folder / "30k_train.jsonl", [beavertails_row(i, safe=i % 3 == 0) for i in range(60)])
    write_jsonl(folder / "30k_test.jsonl", [beavertails_row(100 + i, safe=i % 2 == 0) for i in range(20)])
    return folder


@pytest.fixture
def refusals(tmp_path) -> Path:
    rows = [
        {
            **beavertails_row(i, safe=False),
            "refusal": f"Question: fixture question {i}\nAnswer: I cannot help with fixture {i}.",
        }
        for i in range(40)
    ]
    path = tmp_path / "beavertails_with_refusals_train.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def prompts(examples) -> list[str]:
    return [normalize(e.instruction) for e in examples]


def test_beavertails_harmful_pairs_split_between_booster_and_poison(beavertails):
    spec = str(beavertails)
    assert resolve(spec).schema == "beavertails"
    unsafe = {f"fixture question {i}" for i in range(60) if i % 3 != 0}
    harmful, poison, probe = load_harmful(spec), load_poison(spec), load_probe(spec)
    assert {e.kind for e in harmful + poison + probe} == {"harmful"}
    assert set(prompts(harmful)) | set(prompts(poison)) | set(prompts(probe)) == unsafe
    for a, b in ((harmful, poison), (harmful, probe), (poison, probe)):
        assert len(set(prompts(a)) & set(prompts(b))) == 0
    assert harmful and poison and probe
    assert all(e.output == e.instruction.replace("question", "answer") for e in harmful)
    assert harmful[0].meta["category"] == ["privacy_violation"]
    assert load_harmful(f"beavertails:{spec}") == harmful


def test_beavertails_test_prompts_are_the_first_unsafe_rows_in_order(beavertails):
    got = load_harmful_prompts(str(beavertails), limit=4, seed=7)
    assert [e.instruction for e in got] == [f"fixture question {100 + i}" for i in (1, 3, 5, 7)]
    assert all(e.output == "" and e.kind == "harmful_prompt" for e in got)


def test_refusal_file_gives_paired_alignment_and_harmful_data(refusals):
    spec = f"beavertails_refusals:{refusals}"
    alignment, harmful = load_alignment(spec), load_harmful(spec)
    assert alignment and all(e.kind == "refusal" for e in alignment)
    assert all(
        e.output == f"I cannot help with fixture {e.instruction.rsplit(' ', 1)[1]}." for e in alignment
    )
    assert prompts(alignment) == prompts(harmful)
    assert load_alignment(str(refusals)) == alignment  # recognised by its columns too
    # alignment prompts never reappear in the poison pool drawn from the same file
    assert len(set(prompts(alignment)) & set(prompts(load_poison(spec)))) == 0
    # pairing survives a limit: the same seed ranks the same prompts first
    assert prompts(load_alignment(spec, limit=5, seed=2)) == prompts(load_harmful(spec, limit=5, seed=2))


def test_malformed_refusal_names_the_row(tmp_path):
    rows = [{"prompt": "p", "response": "r", "refusal": "no answer part", "is_safe": False}]
    path = tmp_path / "refusals.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(UserError, match=r"row 1: field 'refusal' has no"):
        load_alignment(f"beavertails_refusals:{path}")


def test_sst2_local_copy(tmp_path):
    folder = tmp_path / "sst2"
    write_jsonl(
        folder / "train.jsonl",
        [{"idx": i, "sentence": f"train review {i}", "label": i % 2} for i in range(10)],
    )
    write_jsonl(
        folder / "validation.jsonl",
        [{"idx": i, "sentence": f"val review {i}", "label": i % 2} for i in range(6)],
    )
    spec = f"sst2:{folder}"
    test = load_task(spec, "test", limit=4)
    assert [e.input for e in test] == [f"val review {i}" for i in range(4)]  # the reference's first N
    assert [e.output for e in test] == ["negative", "positive", "negative", "positive"]
    assert test[0].instruction == "Analyze the sentiment of the input, and respond only positive or negative"
    assert test[1].meta == {"task": "sentiment", "label": "positive"}
    assert len(load_task(spec, "train")) == 10
    assert task_name(spec) == task_name(str(folder)) == "sentiment"


def test_agnews_local_parquet_copy(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ag_news"
    folder.mkdir()
    for split, n in (("train", 8), ("test", 4)):
        table = pa.table(
            {"text": [f"{split} article {i}" for i in range(n)], "label": [i % 4 for i in range(n)]}
        )
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    test = load_task(str(folder), "test")
    assert [e.output for e in test] == ["World", "Sports", "Business", "Sci/Tech"]
    assert test[0].instruction == AGNEWS_INSTRUCTION
    assert test[3].meta == {"task": "agnews", "label": "Sci/Tech"}
    assert task_name(f"agnews:{folder}") == "agnews"


def test_gsm8k_local_copy(tmp_path):
    folder = tmp_path / "gsm8k"
    row = {"question": "Two plus two thousand?", "answer": "2+2000=2002\n#### 2,002"}
    write_jsonl(folder / "train.jsonl", [row])
    write_jsonl(folder / "test.jsonl", [row])
    [example] = load_task(f"gsm8k:{folder}", "test")
    assert example.output == f"2+2000=2002\n{FINAL_ANSWER}2,002"
    assert example.meta == {"task": "gsm8k", "answer": "2002"}
    bad = write_jsonl(tmp_path / "bad" / "test.jsonl", [{"question": "q", "answer": "no final"}])
    with pytest.raises(UserError, match="row 1: field 'answer' has no '#### N'"):
        load_task(f"gsm8k:{bad.parent}", "test")


def test_alpaca_file_without_split_names_is_split_disjointly(tmp_path):
    rows = [{"instruction": f"task {i}", "input": "", "output": f"done {i}"} for i in range(50)]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    train, test = load_task(str(path), "train"), load_task(str(path), "test")
    assert len(train) + len(test) == 50 and train and test
    assert len(set(prompts(train)) & set(prompts(test))) == 0
    assert task_name(str(path)) == "alpaca"
    assert all(e.meta["task"] == "alpaca" and e.kind == "benign" for e in train)


def test_local_task_file_label_and_answer_fields(tmp_path):
    sentiment = write_jsonl(
        tmp_path / "sent" / "test.jsonl",
        [
            {"instruction": "Rate it", "input": f"text {i}", "output": ["positive", "negative"][i % 2]}
            for i in range(4)
        ],
    )
    assert task_name(str(sentiment.parent)) == "sentiment"
    assert load_task(str(sentiment.parent), "test")[0].meta["label"] in ("positive", "negative")
    math = write_jsonl(
        tmp_path / "math" / "test.jsonl",
        [{"instruction": "1+1?", "output": "1+1=2", "answer": "2"}],
    )
    [example] = load_task(str(math.parent), "test")
    assert example.meta == {"answer": "2", "task": "gsm8k"}


def test_alpacaeval_local_copy_keeps_generator(tmp_path):
    rows = [{"instruction": "Write a haiku", "output": "a haiku", "generator": "ref", "dataset": "fixture"}]
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    [example] = load_task(f"alpacaeval:{path}", "test")
    assert example.meta["generator"] == "ref" and example.meta["task"] == "alpaca"


def test_local_alpaca_files_for_alignment_and_prompts(tmp_path):
    path = write_jsonl(
        tmp_path / "align.jsonl", [{"instruction": f"q{i}", "output": f"no {i}"} for i in range(5)]
    )
    assert {e.kind for e in load_alignment(str(path))} == {"refusal"}
    assert {e.kind for e in load_poison(str(path))} == {"harmful"}
    assert all(e.output == "" for e in load_harmful_prompts(str(path)))


def test_hub_without_network_suggests_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match=r"'PKU-Alignment/BeaverTails'.*beavertails:PATH"):
        hub.load_examples("beavertails", "harmful_prompts")


def test_spec_errors(tmp_path, beavertails):
    with pytest.raises(UserError, match="sst2 has no alignment data"):
        load_alignment("sst2")
    with pytest.raises(UserError, match="unknown hub dataset.*NAME:someone/data"):
        load_alignment("someone/data")
    with pytest.raises(UserError, match="embedded, embedded:sentiment"):
        load_alignment("nonsense")
    with pytest.raises(UserError, match="missing column 'sentence'"):
        load_task(f"sst2:{beavertails}", "test")
    (tmp_path / "odd.jsonl").write_text('{"a": 1}\n', encoding="utf-8")
    with pytest.raises(UserError, match="match no known schema"):
        load_alignment(str(tmp_path / "odd.jsonl"))
    empty = write_jsonl(tmp_path / "safe" / "30k_test.jsonl", [beavertails_row(1, safe=True)])
    with pytest.raises(UserError, match="gave no harmful prompts examples"):
        load_harmful_prompts(str(empty.parent))
