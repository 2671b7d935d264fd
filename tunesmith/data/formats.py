"""Data files → `Example`s: one reader per file type, one parser per record format.

Contract:
- `load_examples(entries, fmt, system_prompt, split, subset, columns)` reads every entry in order
  (a file, a dataset folder, a folder of shards or a hub name: `tunesmith.data.sources`) and
  returns a flat list of `Example`s; each carries `where` ("file:line", "folder:row N") so later
  stages can point at the record. `columns` maps format field names to record keys
  ({instruction: question}); a record without a mapped key is a `UserError`.
- File types by extension: `.jsonl` (one object per line, blank lines skipped), `.json` (a list
  of objects, or an object holding exactly one such list, e.g. {"data": [...]}), `.csv` (header
  row), `.parquet`, `.txt` (paragraphs separated by blank lines, each one `text` example).
- Formats: `alpaca` (instruction, optional input, output, optional system), `messages` (OpenAI
  list of {role, content}; assistant `tool_calls`, `tool` messages and a record-level `tools`
  list are read by `tunesmith.data.tools`), `sharegpt` (`conversations` list of {from, value},
  optional top-level system), `prompt_completion` (prompt, completion → a user/assistant
  exchange, so the chat template applies), `text`. With `fmt="auto"` each source's format is
  detected from the keys of its first record. In CSV, list-valued fields hold JSON text.
- `system_prompt` becomes the first message of every conversation that has no system message.
- Anything wrong with a record raises `UserError` with one line naming the file, the line (row
  for parquet and datasets), the field and what was expected. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tunesmith.data import tools as tool_defs
from tunesmith.errors import UserError, where

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
ROLES = ("system", "user", "assistant")
MESSAGE_ROLES = (*ROLES, "tool")  # the messages format also carries tool results (see data/tools.py)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
# every field a format reads: what data.columns may map a record's keys to
FIELDS = (
    "instruction",
    "input",
    "output",
    "system",
    "messages",
    "conversations",
    "prompt",
    "completion",
    "text",
    "tools",
)
DETECT_HINT = (
    "expected one of alpaca (instruction/output), messages, conversations, prompt/completion, text — or set data.format"
)


@dataclass
class Example:
    """One training record: a conversation (`messages`) or a plain text (`text`), never both."""

    messages: list[dict] | None
    text: str | None
    where: str
    tools: list[dict] | None = None  # function schemas offered in a tool-call conversation


def load_examples(
    paths: list[str],
    fmt: str = "auto",
    system_prompt: str | None = None,
    split: str = "train",
    subset: str | None = None,
    columns: dict[str, str] | None = None,
) -> list[Example]:
    """Every record of every entry (file, dataset folder, shard folder or hub name; see
    `tunesmith.data.sources`), in order, as `Example`s."""
    from tunesmith.data.sources import open_source  # sources reads files through this module

    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no data files given; set data.train to one or more .jsonl/.json/.csv/.parquet/.txt files")
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"data.format: expected auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    check_columns(columns)
    examples: list[Example] = []
    for path in paths:
        examples.extend(source_examples(open_source(path, split, subset), fmt, system_prompt, columns))
    return examples


def check_columns(columns: dict[str, str] | None) -> None:
    for name in columns or {}:
        if name not in FIELDS:
            raise UserError(f"config key data.columns: unknown field {name!r}; expected some of {', '.join(FIELDS)}")


def source_examples(source, fmt: str, system_prompt: str | None, columns: dict[str, str] | None = None):
    """The `Example`s of one opened `Source`; the format is detected per source from its first record."""
    examples = []
    src_fmt = fmt
    for loc, record, flavor in source.records():
        if flavor == "txt":
            if fmt not in ("auto", "text"):
                needs = ".jsonl, .json, .csv or .parquet"
                raise UserError(f"{source.name}: .txt files hold plain text; data.format {fmt} needs {needs}")
            examples.append(Example(messages=None, text=record["text"], where=loc))
            continue
        record, names = _map_columns(record, columns, loc)
        if src_fmt == "auto":
            src_fmt = _detect(record, loc)
        examples.append(_parse(record, src_fmt, loc, system_prompt, flavor == "csv", names))
    if not examples:
        raise UserError(f"{source.name}: no examples (empty file)")
    return examples


def file_records(path: str):
    """(where, record, flavor) for every record of one data file; flavor: json, csv or txt."""
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_TYPES:
        raise UserError(
            f"{path}: unknown data file type {suffix or '(no extension)'}; "
            "expected .jsonl, .json, .csv, .parquet or .txt, a dataset folder or a hub dataset name"
        )
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: data file not found")
    if not p.is_file():
        raise UserError(f"{path}: not a file; expected a data file")
    if suffix == ".txt":
        return ((ex.where, {"text": ex.text}, "txt") for ex in _read_txt(path))
    reader = {".jsonl": read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[suffix]
    flavor = "csv" if suffix == ".csv" else "json"
    return ((loc, record, flavor) for loc, record in reader(path))


def _map_columns(record: dict, columns: dict[str, str] | None, loc: str) -> tuple[dict, dict[str, str]]:
    """The record with its keys renamed to the format's field names as data.columns says, and
    field → how errors name it."""
    if not columns:
        return record, {}
    record = dict(record)
    values = {}
    for field, key in columns.items():
        if key not in record:
            raise UserError(
                f'{loc}: no column "{key}" (data.columns maps {field} to it); the record has '
                f"{', '.join(map(str, record)) or 'no columns'}"
            )
        values[field] = record.pop(key)
    record.update(values)
    return record, {field: f'"{key}" (data.columns.{field})' for field, key in columns.items()}


# ---------------------------------------------------------------- readers: file → (where, record)


def read_text(path: str) -> str:
    """The file as text; invalid UTF-8 is a `UserError` naming the line and byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: spreadsheets often write a byte-order mark
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        byte = raw[err.start]
        raise UserError(f"{where(path, line)}: not UTF-8 text (byte 0x{byte:02x}); save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    # not str.splitlines: it also splits on U+2028, U+0085 …, which JSON strings may hold raw
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_jsonl(path: str):
    """(`file:line`, object) for every non-blank line; bad JSON or a non-object is a `UserError`."""
    for n, line in enumerate(_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        yield where(path, n), _object(loads(line, path, n), path, n)


def loads(text: str, path: str, line: int | None = None):
    """`json.loads` whose failures are one line naming the place: bad JSON, nesting deeper than
    Python's stack, a number over Python's integer digit limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where(path, line or err.lineno)}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise UserError(f"{where(path, line)}: JSON nested too deeply to read") from None
    except ValueError as err:  # int("9" * 5000) exceeds the limit on integer digits
        raise UserError(f"{where(path, line)}: a number is too long ({str(err).split(':')[0]})") from None


def _read_json(path: str):
    from tunesmith.data.jsonfile import read_json  # a reader of its own: it tracks line numbers

    return read_json(path)


def _read_csv(path: str):
    # long documents in one cell are normal for SFT data; the csv module's default cap is 128 KiB
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        last_line = reader.line_num
        for row in reader:
            line = last_line + 1  # the row's first line (quoted fields may span several)
            last_line = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise UserError(
                    f"{where(path, line)}: expected {len(header)} columns ({', '.join(header)}), got {len(row)}"
                )
            yield where(path, line), {k: (v if v != "" else None) for k, v in zip(header, row)}
    except csv.Error as err:
        raise UserError(f"{where(path, reader.line_num)}: not valid CSV ({err})") from None


def _read_parquet(path: str):
    import pyarrow.parquet as pq  # imported here: only parquet users pay for it

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged or foreign file
        raise UserError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    for n, record in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {n}", record


def _read_txt(path: str) -> list[Example]:
    examples, para, first = [], [], 0
    for n, line in enumerate(_lines(read_text(path)) + [""], start=1):
        if line.strip():
            if not para:
                first = n
            para.append(line)
        elif para:
            examples.append(Example(messages=None, text="\n".join(para).rstrip(), where=where(path, first)))
            para = []
    if not examples:
        raise UserError(f"{path}: no examples (empty file)")
    return examples


def _object(record, path: str, line: int) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where(path, line)}: expected a JSON object (one record), got {_type_name(record)}")
    return record


# ---------------------------------------------------------------- formats: record → Example


def _detect(record: dict, loc: str) -> str:
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise UserError(f"{loc}: cannot detect the format from keys [{', '.join(map(str, record))}]; {DETECT_HINT}")


def _parse(record: dict, fmt: str, loc: str, system_prompt: str | None, from_csv: bool, names=None) -> Example:
    names = names or {}
    for key in REQUIRED[fmt]:
        if record.get(key) is None:
            field = names.get(key, f'"{key}"')
            raise UserError(f"{loc}: missing field {field} (format {fmt} expects {', '.join(REQUIRED[fmt])})")
    tools = None
    if fmt == "text":
        return Example(messages=None, text=_string(record, "text", loc, names=names), where=loc)
    if fmt == "alpaca":
        user = _string(record, "instruction", loc, names=names)
        extra = _string(record, "input", loc, optional=True, names=names)
        if extra:
            user = user + "\n\n" + extra
        answer = _string(record, "output", loc, names=names)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        system = _string(record, "system", loc, optional=True, names=names)
        if system:
            messages.insert(0, {"role": "system", "content": system})
    elif fmt == "prompt_completion":
        messages = [
            {"role": "user", "content": _string(record, "prompt", loc, names=names)},
            {"role": "assistant", "content": _string(record, "completion", loc, names=names)},
        ]
    elif fmt == "messages":
        turns = _turn_list(record, "messages", loc, from_csv, names)
        roles = {r: r for r in MESSAGE_ROLES}
        messages = [_message(t, i, loc, "role", "content", roles) for i, t in enumerate(turns, 1)]
        tool_defs.check_answers(messages, loc)
        if record.get("tools") is not None:
            tools = tool_defs.parse_tools(record["tools"], loc) or None
    else:
        turns = _turn_list(record, "conversations", loc, from_csv, names)
        messages = [_message(t, i, loc, "from", "value", SHAREGPT_ROLES) for i, t in enumerate(turns, 1)]
        system = _string(record, "system", loc, optional=True, names=names)
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{loc}: conversation has no assistant message; nothing to train on")
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Example(messages=messages, text=None, where=loc, tools=tools)


def _string(record: dict, key: str, loc: str, optional: bool = False, names=None) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        field = (names or {}).get(key, f'"{key}"')
        raise UserError(f"{loc}: field {field} must be a string, got {_type_name(value)}")
    return unicode_text(value, loc, key)


def unicode_text(value: str, loc: str, key: str) -> str:
    """`value`, unless a JSON escape left an unpaired surrogate (\\ud800) that no tokenizer can encode."""
    if any("\ud800" <= c <= "\udfff" for c in value):
        raise UserError(f'{loc}: field "{key}" holds an unpaired surrogate escape (\\ud800-\\udfff), not text')
    return value


def _turn_list(record: dict, key: str, loc: str, from_csv: bool, names=None) -> list:
    turns = record[key]
    field = (names or {}).get(key, f'"{key}"')
    if from_csv and isinstance(turns, str):  # CSV cells are text; list fields are stored as JSON
        try:
            turns = json.loads(turns)
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            reason = getattr(err, "msg", "nested too deeply or a number too long")
            raise UserError(f"{loc}: field {field} is not valid JSON ({reason})") from None
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else _type_name(turns)
        raise UserError(f"{loc}: field {field} must be a non-empty list of messages, got {got}")
    return turns


def _message(turn, i: int, loc: str, role_key: str, content_key: str, roles: dict) -> dict:
    if not isinstance(turn, dict):
        expected = f"an object with {role_key} and {content_key}"
        raise UserError(f"{loc}: message {i} must be {expected}, got {_type_name(turn)}")
    role = turn.get(role_key)
    if role not in roles:
        raise UserError(f"{loc}: message {i} has {role_key} {json.dumps(role)}; expected {', '.join(roles)}")
    role = roles[role]
    calls = turn.get("tool_calls") if role == "assistant" and "tool" in roles else None
    content = turn.get(content_key)
    if calls is not None and content is None:
        content = ""  # OpenAI writes null content beside tool calls
    if role == "tool" and isinstance(content, (dict, list)) and not _text_parts(content):
        content = json.dumps(content, ensure_ascii=False)  # a structured tool result, as the model sees it
    if isinstance(content, list):  # OpenAI content parts: only text parts carry anything we can train on
        if not _text_parts(content):
            raise UserError(
                f'{loc}: message {i} has non-text content parts; only {{"type": "text"}} parts are supported'
            )
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise UserError(f'{loc}: message {i} field "{content_key}" must be a string, got {_type_name(content)}')
    message = {"role": role, "content": unicode_text(content, loc, f"message {i} {content_key}")}
    if calls is not None:
        message["tool_calls"] = tool_defs.parse_tool_calls(calls, i, loc)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if turn.get(key) is not None:
                message[key] = str(turn[key])
    return message


def _text_parts(content) -> bool:
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    )


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )
