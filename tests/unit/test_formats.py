"""Data files → examples: every format in every file type, auto-detection, and one-line errors."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data.formats import FORMATS, load_examples
from tunesmith.errors import UserError

U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


# Two records per format and the conversation (or text) each must become.
CASES = {
    "alpaca": (
        [
            {"instruction": "Add 2 and 3.", "input": "", "output": "5", "system": None},
            {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief."},
        ],
        [[msg(U, "Add 2 and 3."), msg(A, "5")], [msg(S, "Be brief."), msg(U, "Translate\n\nchat"), msg(A, "cat")]],
    ),
    "messages": (
        [
            {"messages": [msg(U, "Hi"), msg(A, "Hello")]},
            {"messages": [msg(S, "Terse."), msg(U, "Q?"), msg(A, "A."), msg(U, "More?"), msg(A, "No.")]},
        ],
        [
            [msg(U, "Hi"), msg(A, "Hello")],
            [msg(S, "Terse."), msg(U, "Q?"), msg(A, "A."), msg(U, "More?"), msg(A, "No.")],
        ],
    ),
    "sharegpt": (
        [
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {
                "conversations": [
                    {"from": "system", "value": "Terse."},
                    {"from": "user", "value": "Q?"},
                    {"from": "model", "value": "A."},
                ]
            },
        ],
        [[msg(U, "Hi"), msg(A, "Hello")], [msg(S, "Terse."), msg(U, "Q?"), msg(A, "A.")]],
    ),
    "prompt_completion": (
        [{"prompt": "2+2=", "completion": "4"}, {"prompt": "Capital of Zorbia?", "completion": "Quell"}],
        [[msg(U, "2+2="), msg(A, "4")], [msg(U, "Capital of Zorbia?"), msg(A, "Quell")]],
    ),
    "text": (
        [{"text": "The quick brown fox."}, {"text": "Line one\nline two"}],
        ["The quick brown fox.", "Line one\nline two"],
    ),
}


def write(path, records):
    """Writes `records` in the file type given by `path`'s name ("wrapped.json" → {"data": [...]})."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.name.startswith("wrapped"):
        path.write_text(json.dumps({"data": records, "version": 1}, indent=2), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    elif path.suffix == ".csv":
        keys = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            for r in records:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "wrapped.json", "d.csv", "d.parquet"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("detect", [True, False])
def test_every_format_in_every_file_type(tmp_path, name, fmt, detect):
    records, expected = CASES[fmt]
    path = write(tmp_path / name, records)
    examples = load_examples([str(path)], "auto" if detect else fmt)
    if fmt == "text":
        assert [e.text for e in examples] == expected and all(e.messages is None for e in examples)
    else:
        assert [e.messages for e in examples] == expected and all(e.text is None for e in examples)
    assert all(e.where.startswith(str(path) + ":") for e in examples)


def test_where_points_at_the_line(tmp_path):
    records = CASES["prompt_completion"][0]
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n" + json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    assert [e.where for e in load_examples([str(jl)])] == [f"{jl}:2", f"{jl}:4"]
    js = write(tmp_path / "b.json", records)  # indent=2: records open on lines 2 and 6
    assert [e.where for e in load_examples([str(js)])] == [f"{js}:2", f"{js}:6"]
    wrapped = write(tmp_path / "wrapped.json", records)
    assert [e.where for e in load_examples([str(wrapped)])] == [f"{wrapped}:3", f"{wrapped}:7"]
    cs = write(tmp_path / "c.csv", records)
    assert [e.where for e in load_examples([str(cs)])] == [f"{cs}:2", f"{cs}:3"]


def test_unicode_line_separators_inside_strings_are_not_line_breaks(tmp_path):
    path = tmp_path / "u.jsonl"
    record = {"prompt": "a\u2028b\x85c", "completion": "d"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\r\n" + json.dumps(record) + "\r\n", encoding="utf-8")
    examples = load_examples([str(path)])
    assert [e.messages[0]["content"] for e in examples] == ["a\u2028b\x85c"] * 2
    assert examples[1].where == f"{path}:2"


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\nFirst para\nstill first.\n\n\nSecond.\n   \nThird\n", encoding="utf-8")
    examples = load_examples([str(path)])
    assert [e.text for e in examples] == ["First para\nstill first.", "Second.", "Third"]
    assert [e.where for e in examples] == [f"{path}:3", f"{path}:7", f"{path}:9"]
    assert load_examples([str(path)], "text")[0].text == "First para\nstill first."


def test_auto_detection_is_per_file_and_files_concatenate(tmp_path):
    a = write(tmp_path / "a.jsonl", CASES["alpaca"][0])
    b = write(tmp_path / "b.csv", CASES["prompt_completion"][0])
    examples = load_examples([str(a), str(b)])
    assert [e.messages for e in examples] == CASES["alpaca"][1] + CASES["prompt_completion"][1]


def test_system_prompt_only_where_missing(tmp_path):
    path = write(tmp_path / "d.jsonl", CASES["messages"][0])
    first, second = load_examples([str(path)], system_prompt="You are kind.")
    assert first.messages[0] == msg(S, "You are kind.") and first.messages[1:] == CASES["messages"][1][0]
    assert second.messages == CASES["messages"][1][1]  # had its own system message
    text = write(tmp_path / "t.jsonl", CASES["text"][0])
    assert load_examples([str(text)], system_prompt="You are kind.")[0].text == "The quick brown fox."


def test_openai_text_parts_are_joined(tmp_path):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    path = write(tmp_path / "d.jsonl", [{"messages": [msg(U, "Hi"), {"role": A, "content": parts}]}])
    assert load_examples([str(path)])[0].messages[1] == msg(A, "Hello")


GOOD = json.dumps({"instruction": "a", "output": "b"})

# (file name, file bytes, format, what the one-line message must contain after "file:")
BAD = [
    (
        "train.jsonl",
        f"{GOOD}\n{GOOD}\n" + '{"instruction": "a" "output": "b"}\n',
        "auto",
        ":3: not valid JSON (Expecting ',' delimiter)",
    ),
    (
        "train.jsonl",
        f'{GOOD}\n{{"instruction": "a"}}\n',
        "alpaca",
        ':2: missing field "output" (format alpaca expects instruction, output)',
    ),
    ("train.jsonl", f'{GOOD}\n{{"instruction": "a"}}\n', "auto", ':2: missing field "output"'),
    (
        "train.jsonl",
        f'{GOOD}\n\n{{"instruction": "a", "output": ["x"]}}\n',
        "auto",
        ':3: field "output" must be a string, got list',
    ),
    ("train.jsonl", f"{GOOD}\n[1, 2]\n", "auto", ":2: expected a JSON object (one record), got list"),
    ("x.jsonl", '{"a": 1, "b": 2}\n', "auto", ":1: cannot detect the format from keys [a, b]; expected one of alpaca"),
    (
        "x.jsonl",
        json.dumps({"messages": [msg(U, "q"), msg(U, "again")]}) + "\n",
        "auto",
        ":1: conversation has no assistant message",
    ),
    (
        "x.jsonl",
        json.dumps({"messages": [msg(U, "q"), msg("tool", "r"), msg(A, "a")]}) + "\n",
        "auto",
        ":1: message 2 is a tool result with no matching earlier tool call",
    ),
    (
        "x.jsonl",
        json.dumps({"messages": [msg(U, "q"), msg("function", "r"), msg(A, "a")]}) + "\n",
        "auto",
        ':1: message 2 has role "function"; expected system, user, assistant, tool',
    ),
    (
        "x.jsonl",
        json.dumps({"messages": [msg(U, "q"), {"role": A, "content": 3}]}) + "\n",
        "auto",
        ':1: message 2 field "content" must be a string, got number',
    ),
    (
        "x.jsonl",
        json.dumps({"messages": []}) + "\n",
        "auto",
        ':1: field "messages" must be a non-empty list of messages, got an empty list',
    ),
    (
        "x.jsonl",
        json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n",
        "auto",
        ':1: message 1 has from "bot"; expected system, human',
    ),
    (
        "x.jsonl",
        f"{GOOD}\n".encode() + b'{"instruction": "caf\xe9", "output": "x"}\n',
        "auto",
        ":2: not UTF-8 text (byte 0xe9)",
    ),
    (
        "x.json",
        '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a", "completion": 5}\n]',
        "auto",
        ':3: field "completion" must be a string, got number',
    ),
    ("x.json", '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a",, }\n]', "auto", ":3: not valid JSON"),
    (
        "x.json",
        '[\n  {"text": "a"},\n  "just a string"\n]',
        "auto",
        ":3: expected a JSON object (one record), got string",
    ),
    (
        "data.csv",
        "instruction,output\na,b\nc,d\ne,f,g\n",
        "auto",
        ":4: expected 2 columns (instruction, output), got 3",
    ),
    (
        "data.csv",
        "instruction,response\na,b\n",
        "alpaca",
        ':2: missing field "output" (format alpaca expects instruction, output)',
    ),
    ("data.csv", "instruction,output\na,b\nc,\n", "auto", ':3: missing field "output"'),
    ("data.csv", 'messages\n"[{""role"": ""user""}"\n', "auto", ':2: field "messages" is not valid JSON'),
]


@pytest.mark.parametrize("name,content,fmt,expected", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_records_name_file_and_line(tmp_path, name, content, fmt, expected):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(UserError) as err:
        load_examples([str(path)], fmt)
    message = str(err.value)
    assert message.startswith(str(path) + ":") and "\n" not in message
    assert expected in message, message


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("x.jsonl", "", ": no examples (empty file)"),
        ("x.jsonl", "\n  \n", ": no examples (empty file)"),
        ("x.json", "[]", ": no examples (empty list)"),
        ("x.json", '{"a": [], "b": []}', ": expected a JSON list of records, or an object holding exactly one list"),
        ("x.csv", "instruction,output\n", ": no examples (empty file)"),
        ("x.txt", "\n\n", ": no examples (empty file)"),
        ("x.yaml", "a: 1", ": unknown data file type .yaml; expected .jsonl, .json, .csv, .parquet or .txt"),
        ("x.parquet", "not parquet", ": not a readable Parquet file"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_examples([str(path)])
    assert str(err.value).startswith(str(path) + expected), str(err.value)


def test_missing_file_empty_paths_and_txt_with_a_chat_format(tmp_path):
    with pytest.raises(UserError, match=r"x\.jsonl: data file not found"):
        load_examples([str(tmp_path / "x.jsonl")])
    with pytest.raises(UserError, match="no data files given"):
        load_examples([])
    txt = tmp_path / "x.txt"
    txt.write_text("hello\n")
    with pytest.raises(UserError, match=r"x\.txt: \.txt files hold plain text"):
        load_examples([str(txt)], "alpaca")


def test_bad_parquet_record_names_the_row(tmp_path):
    path = write(tmp_path / "d.parquet", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}])
    with pytest.raises(UserError, match=r"d\.parquet:row 2: missing field \"completion\""):
        load_examples([str(path)])
