"""A `.json` data file's records with the line each starts on.

Contract: `read_json(path)` yields (`file:line`, record) for every element of the top-level list,
or of the one list inside a top-level object ({"data": [...]}); anything else is a one-line
`UserError` naming the file. Positions come from scanning with `raw_decode`, since `json.loads`
keeps none.
"""

from __future__ import annotations

import json

from tunesmith.data.formats import _object, _type_name, loads, read_text
from tunesmith.errors import UserError, where


def read_json(path: str):
    """Elements of the top-level list (or of the one list inside a top-level object), with the
    line each element starts on: found by scanning with raw_decode, since json.loads keeps no
    positions."""
    text = read_text(path)
    if not text.strip():
        return
    data = loads(text, path)
    decoder = json.JSONDecoder()
    start = _skip_ws(text, 0)
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(
                f"{path}: expected a JSON list of records, or an object holding exactly one list "
                f'(like {{"data": [...]}}); found {len(lists)} lists'
            )
        start = _find_value(text, start, lists[0], decoder)
        data = data[lists[0]]
    elif not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {_type_name(data)}")
    if not data:
        raise UserError(f"{path}: no examples (empty list)")
    pos = _skip_ws(text, start + 1)
    line, counted = 1, 0  # counted incrementally: recounting from 0 would be quadratic
    while text[pos] != "]":
        record, end = decoder.raw_decode(text, pos)
        line, counted = line + text.count("\n", counted, pos), pos
        yield where(path, line), _object(record, path, line)
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)


def _find_value(text: str, pos: int, key: str, decoder) -> int:
    """Position of the value of top-level `key` in the JSON object starting at `pos`."""
    pos = _skip_ws(text, pos + 1)
    found = None
    while text[pos] != "}":
        name, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ':'
        if name == key:
            found = pos  # keep scanning: with duplicate keys json.loads keeps the last
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return found


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
