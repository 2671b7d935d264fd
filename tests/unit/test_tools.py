"""Tool-call conversations: parsing the OpenAI shapes, matching results to calls, detecting
templates that render tools, and labels on exactly the assistant's calls and answers."""

import json

import pytest

from tests.tiny import TOOL_CHATML
from tunesmith.data.formats import load_examples
from tunesmith.data.sft import IGNORE, _tokenize
from tunesmith.data.tools import support
from tunesmith.errors import UserError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def conversation(arguments='{"city": "Quell"}', call_id="c1", answer_id="c1"):
    call = {"type": "function", "id": call_id, "function": {"name": "get_weather", "arguments": arguments}}
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "What is the weather in Quell?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": answer_id, "content": {"sky": "sunny"}},
            {"role": "assistant", "content": "It is sunny in Quell."},
        ],
    }


def write(tmp_path, *records):
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_calls_are_normalised(tmp_path):
    (ex,) = load_examples([str(write(tmp_path, conversation()))])
    call = ex.messages[1]["tool_calls"][0]
    assert call == {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Quell"}}, "id": "c1"}
    assert ex.messages[1]["content"] == ""
    assert ex.messages[2] == {"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": "c1"}
    assert ex.tools == [WEATHER]


@pytest.mark.parametrize(
    "record, expected",
    [
        (conversation(answer_id="c9"), ':1: message 3 is a tool result (tool_call_id "c9") with no matching earlier'),
        (conversation(arguments="{city: Quell"), ':1: message 2 tool call 1 "arguments" is not valid JSON'),
        (conversation(arguments="[1]"), ':1: message 2 tool call 1 field "arguments" must be an object'),
        ({**conversation(), "tools": "nope"}, ':1: field "tools" is not valid JSON'),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"x": 1}]}]},
            ":1: message 2 tool call 1 must be",
        ),
    ],
)
def test_bad_tool_records_are_one_line(tmp_path, record, expected):
    path = write(tmp_path, record)
    with pytest.raises(UserError) as err:
        load_examples([str(path)])
    assert str(err.value).startswith(f"{path}{expected}"), str(err.value)


def test_a_result_answers_each_call_once(tmp_path):
    record = conversation(call_id=None, answer_id=None)
    record["messages"].insert(3, {"role": "tool", "name": "get_weather", "content": "again"})
    path = write(tmp_path, record)
    with pytest.raises(UserError, match='message 4 is a tool result \\(name "get_weather"\\) with no matching'):
        load_examples([str(path)])


def test_template_support_is_detected(tiny_tokenizer):
    assert "tool calls" not in support(tiny_tokenizer)  # the plain ChatML template drops them
    tiny_tokenizer.chat_template = TOOL_CHATML
    assert support(tiny_tokenizer) == {"tool calls", "tool results", "the tools list"}


def test_template_without_tools_names_the_record(tmp_path, tiny_tokenizer):
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write(tmp_path, plain, conversation())
    examples = load_examples([str(path)])
    _tokenize(tiny_tokenizer, examples[0], False)  # no tools: fine
    with pytest.raises(UserError) as err:
        _tokenize(tiny_tokenizer, examples[1], False)
    assert str(err.value).startswith(f"{path}:2: the chat template does not render tool calls or the tools list")


def test_labels_cover_exactly_the_assistant_calls_and_answers(tmp_path, tiny_tokenizer):
    """Token by token: a token is labelled iff its text lies inside an assistant turn's output
    (the tool call block or the answer, each with its <|im_end|>); system/tools, user turns and
    tool results are not."""
    tiny_tokenizer.chat_template = TOOL_CHATML
    (ex,) = load_examples([str(write(tmp_path, conversation()))])
    ids, labels = _tokenize(tiny_tokenizer, ex, False)
    assert_labels_on_assistant_turns(tiny_tokenizer, ids, labels)


def assert_labels_on_assistant_turns(tokenizer, ids, labels):
    pieces = [tokenizer.decode([i]) for i in ids]
    text = "".join(pieces)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Quell"}}\n</tool_call><|im_end|>'
    answer = "It is sunny in Quell.<|im_end|>"
    assert '<tools>\n{"type": "function"' in text and "<tool_response>\n{" in text
    spans = [(text.index(call), text.index(call) + len(call)), (text.index(answer), text.index(answer) + len(answer))]
    pos = 0
    for token, piece, label in zip(ids, pieces, labels):
        inside = any(a <= pos and pos + len(piece) <= b for a, b in spans)
        assert label == (token if inside else IGNORE), (pos, piece, label)
        pos += len(piece)
    learnt = "".join(p for p, label in zip(pieces, labels) if label != IGNORE)
    assert learnt == call + answer
