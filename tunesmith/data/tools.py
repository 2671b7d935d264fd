"""Tool calls in conversations: the OpenAI shapes read from records, and whether a chat template
can render them.

Contract:
- `parse_tool_calls(value, i, loc)` reads an assistant message's `tool_calls` (a list of
  `{"type": "function", "id"?, "function": {"name", "arguments"}}`, `arguments` an object or
  its JSON text) into `{"type": "function", "function": {"name", "arguments": dict}}` (+ `id`):
  chat templates (Qwen2.5, Llama 3.1, SmolLM3 …) write `arguments | tojson`, so they get a dict.
- `parse_tools(value, loc)` reads a record's `tools` list (function JSON schemas, or its JSON text).
- `check_answers(messages, loc)`: every `tool` message answers an earlier, unanswered call (by
  `tool_call_id` when given, else by `name`, else the oldest open call); else `UserError`.
- `uses_tools(ex)` and `require_support(tokenizer, ex)`: the latter raises `UserError` naming
  the record when the tokenizer's chat template does not write what the record needs (its tool
  calls, tool results or tools list). Support is found by rendering a probe conversation and
  looking for its marker names in the output; the answer is cached per template.
"""

from __future__ import annotations

import json

from tunesmith.errors import UserError

_CALL, _ARG, _RESULT, _TOOL = "probe_call_q7z", "probe_arg_q7z", "probe_result_q7z", "probe_tool_q7z"


def _kind(value) -> str:
    return {dict: "object", list: "list", str: "string"}.get(type(value), "null" if value is None else "a value")


def _json(value, what: str, loc: str):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"{loc}: {what} is not valid JSON ({err.msg})") from None
    return value


def parse_tool_calls(value, i: int, loc: str) -> list[dict]:
    calls = _json(value, f"message {i} field tool_calls", loc)
    if not isinstance(calls, list) or not calls:
        raise UserError(f"{loc}: message {i} field tool_calls must be a non-empty list of calls, got {_kind(calls)}")
    out = []
    for k, call in enumerate(calls, start=1):
        what = f"message {i} tool call {k}"
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UserError(
                f'{loc}: {what} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}'
            )
        args = _json(fn.get("arguments") or {}, f'{what} "arguments"', loc)
        if not isinstance(args, dict):
            raise UserError(f'{loc}: {what} field "arguments" must be an object (or its JSON text), got {_kind(args)}')
        norm = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            norm["id"] = call["id"]
        out.append(norm)
    return out


def parse_tools(value, loc: str) -> list[dict]:
    tools = _json(value, 'field "tools"', loc)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f'{loc}: field "tools" must be a list of function schemas (objects), got {_kind(tools)}')
    return tools


def check_answers(messages: list[dict], loc: str) -> None:
    open_calls: list[tuple[str | None, str]] = []  # (id, name) of calls not answered yet
    for i, m in enumerate(messages, start=1):
        if m["role"] == "assistant":
            open_calls += [(c.get("id"), c["function"]["name"]) for c in m.get("tool_calls", ())]
        elif m["role"] == "tool":
            ident, name = m.get("tool_call_id"), m.get("name")
            if ident is not None:
                match = [k for k, c in enumerate(open_calls) if c[0] == ident]
                said = f' (tool_call_id "{ident}")'
            elif name is not None:
                match = [k for k, c in enumerate(open_calls) if c[1] == name]
                said = f' (name "{name}")'
            else:
                match, said = list(range(len(open_calls))), ""
            if not match:
                raise UserError(
                    f"{loc}: message {i} is a tool result{said} with no matching earlier tool call; "
                    "each tool message answers a call in an earlier assistant message's tool_calls"
                )
            open_calls.pop(match[0])


def uses_tools(ex) -> bool:
    return bool(ex.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in ex.messages or ())


def _needs(ex) -> list[str]:
    needs = []
    if any(m.get("tool_calls") for m in ex.messages):
        needs.append("tool calls")
    if any(m["role"] == "tool" for m in ex.messages):
        needs.append("tool results")
    if ex.tools:
        needs.append("the tools list")
    return needs


def support(tokenizer) -> frozenset[str]:
    """What the tokenizer's chat template writes: a subset of {tool calls, tool results, the tools list}."""
    template = tokenizer.chat_template
    key = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    cached = getattr(tokenizer, "_tunesmith_tool_support", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    call = {"type": "function", "id": "call_q7z", "function": {"name": _CALL, "arguments": {_ARG: 1}}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": _RESULT, "tool_call_id": "call_q7z", "name": _CALL},
        {"role": "assistant", "content": "done"},
    ]
    schema = {"type": "object", "properties": {}, "required": []}
    tools = [{"type": "function", "function": {"name": _TOOL, "description": "probe", "parameters": schema}}]
    found = set()
    for with_tools in (False, True):
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools if with_tools else None, tokenize=False)
        except Exception:  # a template that refuses tool roles or calls supports neither
            continue
        if _CALL in text and _ARG in text:
            found.add("tool calls")
        if _RESULT in text:
            found.add("tool results")
        if with_tools and _TOOL in text:
            found.add("the tools list")
    result = frozenset(found)
    tokenizer._tunesmith_tool_support = (key, result)
    return result


def require_support(tokenizer, ex) -> None:
    missing = [need for need in _needs(ex) if need not in support(tokenizer)]
    if missing:
        raise UserError(
            f"{ex.where}: the chat template does not render {' or '.join(missing)}, so this tool-call "
            "conversation cannot be trained as the model would see it; use a model whose template supports "
            "tools (Qwen2.5, SmolLM3, Llama 3.1 …) or set data.chat_template"
        )
