"""Local data files: formats, folders, split selection and one-line errors that point at the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from booster.data.local import data_files, load_alpaca_file, read_rows, split_files
from booster.errors import UserError


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def error_of(path: str | Path, **kwargs: object) -> str:
    with pytest.raises(UserError) as info:
        load_alpaca_file(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a UserError is one line"
    return message


def test_jsonl_json_and_csv_give_the_same_examples(tmp_path):
    rows = [
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Add", "input": "1 2", "output": "3", "label": "3"},
    ]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "c.csv").write_text(
        "instruction,input,output,label\nSay hi,,hi,\nAdd,1 2,3,3\n", encoding="utf-8"
    )
    for name in ("a.jsonl", "b.json", "c.csv"):
        examples = load_alpaca_file(tmp_path / name, kind="benign")
        assert [(e.instruction, e.input, e.output) for e in examples] == [
            ("Say hi", "", "hi"),
            ("Add", "1 2", "3"),
        ]
        assert examples[1].meta["label"] == "3"
        assert all(e.kind == "benign" and name in e.source for e in examples)


def test_folder_reads_every_supported_file_in_sorted_order_and_skips_hidden(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "second", "output": "2"}])
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "first", "output": "1"}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"instruction": "third", "output": "3"}])
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / ".hidden" / "x.jsonl", [{"instruction": "never", "output": "0"}])
    (tmp_path / "notes.txt").write_text("not data")
    assert [e.instruction for e in load_alpaca_file(tmp_path)] == ["first", "second", "third"]


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(
        '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n', encoding="utf-8"
    )
    message = error_of(path)
    assert "x.jsonl line 3" in message and "invalid JSON" in message


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}],
    )
    message = error_of(path)
    assert message.endswith(
        "x.jsonl line 3: missing field 'output' (each row needs instruction and output; input is optional)"
    )


def test_output_may_be_absent_when_not_required(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "a"}])
    assert load_alpaca_file(path, require_output=False)[0].output == ""


def test_non_string_and_empty_fields_are_errors(tmp_path):
    message = error_of(write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "output": 3}]))
    assert "x.jsonl line 1" in message and "'output' is int" in message
    message = error_of(write_jsonl(tmp_path / "y.jsonl", [{"instruction": "  ", "output": "b"}]))
    assert "y.jsonl line 1" in message and "'instruction' is empty" in message


def test_empty_files_and_folders_are_errors(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    assert "e.jsonl: the file has no rows" in error_of(tmp_path / "e.jsonl")
    (tmp_path / "e.json").write_text("[]", encoding="utf-8")
    assert "e.json: the file has no rows" in error_of(tmp_path / "e.json")
    (tmp_path / "e.csv").write_text("instruction,output\n", encoding="utf-8")
    assert "e.csv: the file has no rows" in error_of(tmp_path / "e.csv")
    (tmp_path / "empty").mkdir()
    assert "folder has no" in error_of(tmp_path / "empty")
    assert "no such file or folder" in error_of(tmp_path / "missing.jsonl")


def test_json_shape_errors_name_the_item(tmp_path):
    (tmp_path / "d.json").write_text('{"instruction": "a"}', encoding="utf-8")
    assert "expected a JSON list of objects" in error_of(tmp_path / "d.json")
    (tmp_path / "l.json").write_text('[{"instruction": "a", "output": "b"}, "oops"]', encoding="utf-8")
    assert "l.json item 2: expected an object" in error_of(tmp_path / "l.json")
    (tmp_path / "s.json").write_text('[{"instruction": "a",\n "output": }]', encoding="utf-8")
    assert "s.json line 2: invalid JSON" in error_of(tmp_path / "s.json")


def test_csv_line_numbers_count_quoted_newlines(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('instruction,output\n"multi\nline",ok\nonly instruction\n', encoding="utf-8")
    rows = read_rows(path)
    assert rows[0].fields["instruction"] == "multi\nline"
    assert "x.csv line 4: missing field 'output'" in error_of(path)


def test_csv_row_with_extra_values_is_an_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("instruction,output\na,b,c\n", encoding="utf-8")
    assert "x.csv line 2: 3 values for 2 columns" in error_of(path)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    assert "unsupported file type" in error_of(tmp_path / "x.txt")


def test_split_files_by_name_and_fallback(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    train = write_jsonl(folder / "task_train.jsonl", [{"instruction": "a", "output": "b"}])
    test = write_jsonl(folder / "task_validation.jsonl", [{"instruction": "c", "output": "d"}])
    assert split_files(folder, "train") == ([train], True)
    assert split_files(folder, "test") == ([test], True)
    assert split_files(train, "train") == ([train], True)
    with pytest.raises(UserError, match="holds train data, not test"):
        split_files(train, "test")
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "a", "output": "b"}])
    assert split_files(plain, "test") == ([plain], False)
    assert data_files(folder) == [train, test]
