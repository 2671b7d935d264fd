"""Values that used to slip through: YAML paths and duplicate keys, non-finite numbers, Modelfile
values that could add lines (checked with a port of Ollama's own parser), the data cache key."""

import shutil

import pytest

from tests.tiny import make_tokenizer
from tunesmith.config import DataConfig, load_config
from tunesmith.errors import UserError
from tunesmith.export.gguf import modelfile_value, write_modelfile


def test_yaml_paths_resolve_against_the_yaml_folder_only(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "d.jsonl").write_text("{}\n")  # in the current directory, not beside the YAML
    monkeypatch.chdir(tmp_path)
    yaml_file = tmp_path / "sub" / "c.yaml"
    yaml_file.write_text("data:\n  train: [d.jsonl, /abs/e.jsonl]\ncompare:\n  general_text: bundled\n")
    cfg = load_config(yaml_file, ["data.validation=v.jsonl"])
    assert cfg.data.train == [str(tmp_path / "sub" / "d.jsonl"), "/abs/e.jsonl"]
    assert cfg.data.validation == [str(tmp_path / "v.jsonl")]  # an override: the current directory
    assert cfg.compare.general_text == "bundled"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("train:\n  lr: 1\n  lr: 2\n", "c.yaml:3: key 'lr' is given twice"),
        ("train:\n  lr: 1\ntrain:\n  seed: 2\n", "c.yaml:3: key 'train' is given twice"),
        ("train:\n  lr: .nan\n", "config key train.lr: expected a finite number"),
        ("adapter:\n  alpha: .inf\n", "config key adapter.alpha: expected a finite number"),
        ("train:\n  seed: 9223372036854775808\n", "config key train.seed: expected an integer"),
        ("train:\n  seed: " + "9" * 5000 + "\n", "Exceeds the limit"),
        ("model:\n  attn_implementation: flash\n", "config key model.attn_implementation: expected one of sdpa"),
    ],
)
def test_yaml_values_refused(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError) as info:
        load_config(tmp_path / "c.yaml")
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1


def ollama_parse(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs as ollama's parser/parser.go `ParseFile` reads them: its state
    machine, rune by rune (no escapes; a value ends at a line break once it unquotes)."""

    def unquote(s):
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    def step(r, state):
        newline, space = r in "\r\n", r in " \t"
        if state == "nil":
            return ("comment", "") if r == "#" else ("nil", "") if newline or space else ("name", r)
        if state == "name":
            assert r.isalpha() or space, f"invalid command character {r!r}"
            return ("name", r) if r.isalpha() else ("value", "")
        if state == "parameter":
            assert r.isalnum() or r == "_" or space, f"invalid parameter character {r!r}"
            return ("parameter", r) if not space else ("value", "")
        if state == "comment":
            return ("nil", "") if newline else ("comment", "")
        return ("nil", r) if newline or space else ("value", r)

    commands, state, buf, name = [], "nil", "", ""
    for r in text:
        new, r = step(r, state)
        if new != state:
            if state == "name":
                name = {"from": "model"}.get(buf.lower(), buf.lower())
                new = "parameter" if name == "parameter" else new
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                commands.append((name, value))
            buf, state = "", new
        if r and (r.isprintable() or r == " "):
            buf += r
    if state == "value":
        value, ok = unquote(buf.strip())
        assert ok, "unexpected end of file"
        commands.append((name, value))
    return commands


HOSTILE = [
    'Be brief."""\nPARAMETER temperature 9\nSYSTEM """evil',
    'ends in quotes """   \r\nFROM ./other.gguf\n"""',
    '"',
    '""',
    '"""',
    '"quoted" start',
    "plain one line",
    "two\nlines",
    'x"""\n"""\n""""\n',
]


@pytest.mark.parametrize("text", HOSTILE)
def test_modelfile_values_cannot_add_lines(tmp_path, text):
    gguf = tmp_path / "model-f16.gguf"
    path = write_modelfile(gguf, make_tokenizer(), text, None, text)
    commands = ollama_parse(path.read_bytes().decode("utf-8"))  # read_text would turn \r\n into \n
    names = [name for name, _ in commands]
    assert names[:3] == ["model", "template", "system"] and set(names[3:]) <= {"stop"}, commands
    # what Ollama reads back is the value, but for a space before the last quote of a line that would close it
    for _, value in commands[1:3]:
        assert value.replace('"" "', '"""') == text
    for triple in (False, True):
        [(name, value)] = ollama_parse("SYSTEM " + modelfile_value(text, triple))
        assert name == "system" and value.replace('"" "', '"""') == text


def test_cache_key_includes_the_file_name_and_type(tmp_path):
    from tunesmith.data.sft import _cache_key
    from tunesmith.data.sources import open_sources

    def key(path):
        cfg = DataConfig(train=[str(path)])
        return _cache_key(cfg, tok, 0, *open_sources(cfg))

    tok = make_tokenizer()
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "hello there"}\n')
    txt = tmp_path / "a.txt"
    shutil.copy(jsonl, txt)
    keys = {key(p) for p in (jsonl, txt, tmp_path / "b.jsonl")}
    shutil.copy(jsonl, tmp_path / "b.jsonl")
    keys.add(key(tmp_path / "b.jsonl"))
    assert len(keys - {None}) == 3


def test_environment_faults_are_named():
    import errno

    from tunesmith.errors import environment_fault

    full = OSError(errno.ENOSPC, "No space left on device", "/out/ckpt/optimizer.pt")
    assert environment_fault(full) == "/out/ckpt/optimizer.pt: no space left on the device (ENOSPC)"
    assert environment_fault(OSError(errno.EROFS, "x", "/ro")) == "/ro: read-only filesystem (EROFS)"
    # safetensors wraps the OSError in its own exception: the text still says what happened
    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    assert environment_fault(wrapped, "out/run") == "out/run: no space left on the device (ENOSPC)"
    assert environment_fault(OSError(errno.ENOENT, "x", "/a")) is None  # not the machine's fault
    assert environment_fault(ValueError("bug")) is None
