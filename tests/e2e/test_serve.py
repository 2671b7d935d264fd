"""`tunesmith serve` as a real process on loopback, spoken to with the official `openai` client.

A tiny LoRA run (system prompt "Answer briefly.") is served from the GGUF `serve` exports into the
run dir on first start; llama.cpp answers, nothing is mocked. Every request is bounded (max_tokens,
client timeouts) and every wait has a deadline. The module's main server requires an API key; it is
stopped with SIGTERM by the last test of its group.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.tiny import write_config, write_qa_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.train.loop import run_training

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")
KEY = "test-key-0123"
SYSTEM = "Answer briefly."
START_TIMEOUT = 180  # seconds: the first start exports the GGUF (torch + peft import on 2 shared cores)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`tunesmith serve ARGS --port <free>` with stdout/stderr in files (never a pipe that fills up)."""

    def __init__(self, tmp: Path, *args: str, key: str | None = None):
        self.port, self.key, self.tmp = free_port(), key, tmp
        self.out, self.err = tmp / "serve.out", tmp / "serve.err"
        argv = [EXE, "serve", *args, "--port", str(self.port), "--threads", "1"]
        if key:
            argv += ["--api-key", key]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TUNESMITH_HOME": str(tmp / "home")}
        env.pop("TUNESMITH_API_KEY", None)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        self._wait_ready()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str | None = "default") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=self.key if key == "default" else key, timeout=60, max_retries=0
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}: {self.err.read_text()[-2000:]}")
            try:
                status, _ = http("GET", f"{self.base_url}/models", key=self.key, timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop(signal.SIGKILL)
        pytest.fail(f"serve did not answer within {START_TIMEOUT}s: {self.err.read_text()[-2000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise


def http(method: str, url: str, body: bytes | None = None, key: str | None = None, timeout: float = 60):
    """(status, body) of one raw HTTP request, for what the openai client will not send."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("serve-run")
    data = write_qa_jsonl(tmp / "qa.jsonl")
    cfg = write_config(
        tmp / "c.yaml",
        tiny_model_dir,
        data,
        tmp / "run",
        train={"max_steps": 3},
        data={"system_prompt": SYSTEM, "cache_dir": str(tmp / "cache")},
    )
    return run_training(load_config(cfg)).output_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory, run_dir):
    srv = Server(tmp_path_factory.mktemp("serve-main"), str(run_dir), key=KEY)
    yield srv
    if srv.proc.poll() is None:
        srv.stop(signal.SIGKILL)


def ask(client, text: str, max_tokens: int = 8, **kw):
    return client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0, **kw
    )


def test_first_start_exports_into_the_run_and_lists_the_model(server, run_dir):
    gguf = run_dir / "export" / "model-q8_0.gguf"
    assert gguf.is_file() and (run_dir / "export" / "Modelfile").is_file()
    out = server.out.read_text()
    assert f"exporting {run_dir} to {gguf}" in out and f"at {server.base_url}" in out
    assert f"system prompt from {run_dir / 'tunesmith.yaml'}" in out
    assert [m.id for m in server.client().models.list().data] == [run_dir.name]


def test_chat_and_stream(server):
    client = server.client()
    reply = ask(client, "What is the answer 3?")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    chunks = list(ask(client, "What is the answer 3?", stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    # greedy: the same tokens, streamed or not. A random model may emit a lone UTF-8 lead byte, which
    # llama-cpp-python drops in both modes but at different points, so the ASCII text is compared
    assert ascii_of(streamed) == ascii_of(choice.message.content)


def ascii_of(text: str) -> str:
    return "".join(c for c in text if c.isascii())


def test_eight_concurrent_requests(server):
    client = server.client()
    questions = [f"What is the answer {i}?" for i in range(8)]
    results, errors = {}, []

    def one(q):
        try:
            results[q] = ask(client, q, max_tokens=6).choices[0].message.content
        except Exception as err:  # noqa: BLE001 — reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=one, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and sorted(results) == sorted(questions)
    # queued, not mixed up: each answer is the one the question gets alone
    for q in questions[:3]:
        assert ask(client, q, max_tokens=6).choices[0].message.content == results[q]


def test_text_completion(server):
    done = server.client().completions.create(model="x", prompt="The capital of Zorbia", max_tokens=5, temperature=0)
    assert isinstance(done.choices[0].text, str) and done.usage.completion_tokens >= 1


def test_run_system_prompt_reaches_the_model(server, run_dir):
    """The chat the server formats equals the run's chat template rendered with the run's system
    prompt, sent as raw text to /v1/completions: same prompt token count, same greedy tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run_dir))
    client = server.client()

    def rendered(messages):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user = {"role": "user", "content": "What is the answer 5?"}
    chat = ask(client, user["content"], max_tokens=6)
    with_system = rendered([{"role": "system", "content": SYSTEM}, user])
    raw = client.completions.create(model="x", prompt=with_system, max_tokens=6, temperature=0)
    bare = client.completions.create(model="x", prompt=rendered([user]), max_tokens=1, temperature=0)
    assert chat.usage.prompt_tokens == raw.usage.prompt_tokens > bare.usage.prompt_tokens
    assert chat.choices[0].message.content == raw.choices[0].text
    # a request's own system message is kept, not doubled
    own = [{"role": "system", "content": "Be terse."}, user]
    mine = client.chat.completions.create(model="x", messages=own, max_tokens=1, temperature=0)
    theirs = client.completions.create(model="x", prompt=rendered(own), max_tokens=1, temperature=0)
    assert mine.usage.prompt_tokens == theirs.usage.prompt_tokens


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="x", messages=[], max_tokens=4)
    assert empty.value.body["type"] == "invalid_request_error" and empty.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as typed:
        ask(client, "hi", max_tokens="many")
    assert typed.value.body["param"] == "max_tokens"
    status, body = http("POST", f"{server.base_url}/chat/completions", b'{"messages": [', key=KEY)
    assert status == 400 and b'"invalid_request_error"' in body and b"not valid JSON" in body
    assert ask(client, "Still there?").choices[0].message.content is not None
    assert "Traceback" not in server.err.read_text()


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError) as wrong:
        server.client(key="not-the-key").models.list()
    assert wrong.value.status_code == 401 and wrong.value.body["code"] == "invalid_api_key"
    status, body = http("POST", f"{server.base_url}/chat/completions", b'{"messages": []}')  # no key at all
    assert status == 401 and b'"invalid_api_key"' in body


def test_sigterm_stops_cleanly(server, run_dir):
    assert server.stop(signal.SIGTERM) == 0
    out, err = server.out.read_text(), server.err.read_text()
    assert out.strip().splitlines()[-1] == f"tunesmith: stopped serving {run_dir.name} (SIGTERM)"
    assert "Traceback" not in err + out


def test_gguf_served_directly_with_cached_export_and_sigint(tmp_path, run_dir, server):
    gguf = run_dir / "export" / "model-q8_0.gguf"
    mtime = gguf.stat().st_mtime_ns
    srv = Server(tmp_path, str(run_dir))  # the cached export is reused, not written again; no key
    try:
        assert "exporting" not in srv.out.read_text() and gguf.stat().st_mtime_ns == mtime
        assert ask(srv.client(key="unused"), "hi", max_tokens=2).choices
    finally:
        assert srv.stop(signal.SIGINT) == 0
    assert "(SIGINT)" in srv.out.read_text() and "Traceback" not in srv.err.read_text()
    direct = Server(tmp_path, str(gguf))  # a .gguf is served as it is, with its run's system prompt
    try:
        assert f"serving {gguf.stem} ({gguf})" in direct.out.read_text()
        assert f"system prompt from {run_dir / 'tunesmith.yaml'}" in direct.out.read_text()
        assert [m.id for m in direct.client(key="unused").models.list().data] == [gguf.stem]
    finally:
        assert direct.stop(signal.SIGTERM) == 0


def one_line(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, run_dir, server):
    before = sorted(p.name for p in (run_dir / "export").iterdir())
    assert "--quant" in one_line(capsys, "serve", run_dir, "--quant", "q3_x", "--port", 0)
    assert "not found" in one_line(capsys, "serve", tmp_path / "missing-run", "--port", 0)
    assert "--quant" in one_line(capsys, "serve", run_dir / "export" / "model-q8_0.gguf", "--quant", "f16")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = one_line(capsys, "serve", run_dir, "--quant", "f16", "--port", port)
    assert "--port" in err and "in use" in err
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == before  # no model-f16.gguf


def test_request_checks_and_system_prompt_insertion():
    """The front's rules on their own (no server): what is refused, what is rewritten, what passes."""
    import json

    from tunesmith.export.serve_front import CHAT, COMPLETIONS, BadRequest, check_request

    user = {"role": "user", "content": "Hi"}
    body = json.dumps({"messages": [user], "max_tokens": 4}).encode()
    assert json.loads(check_request(CHAT, body, SYSTEM))["messages"] == [{"role": "system", "content": SYSTEM}, user]
    assert check_request(CHAT, body, None) == body  # no run system prompt: untouched
    own = json.dumps({"messages": [{"role": "system", "content": "Be terse."}, user]}).encode()
    assert check_request(CHAT, own, SYSTEM) == own
    completion = json.dumps({"prompt": "Hi"}).encode()
    assert check_request(COMPLETIONS, completion, SYSTEM) == completion  # raw text: never rewritten
    refused = {
        (CHAT, b"[1, 2]"): None,
        (CHAT, b'{"messages": "Hi"}'): "messages",
        (CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}'): "temperature",
        (COMPLETIONS, b'{"max_tokens": 4}'): "prompt",
        (COMPLETIONS, b'{"prompt": ["a", "b"]}'): "prompt",
        (COMPLETIONS, b"\xff\xfe"): None,
    }
    for (path, raw), param in refused.items():
        with pytest.raises(BadRequest) as bad:
            check_request(path, raw, SYSTEM)
        assert bad.value.status == 400 and bad.value.param == param, (raw, bad.value.message)
