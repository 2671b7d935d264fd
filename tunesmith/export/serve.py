"""`tunesmith serve`'s runner: a GGUF (exported once, cached) behind llama-cpp-python's OpenAI-compatible server.

Contract:
- `served_gguf(model, quant=None) -> Served` decides what is served, writing nothing: a `.gguf`
  file is served as it is (`quant` must then be None); anything `export` takes (a run dir, a merged
  or HF model dir, a bundled name) is served from the file `tunesmith export MODEL --quant QUANT`
  writes by default (`RUN/export/model-<quant>.gguf`; default quant q8_0). That file is reused
  when present, and exported again when it is older than the run's weights. The system prompt is
  the run's `data.system_prompt` (`RUN/tunesmith.yaml`; for a `.gguf` inside `RUN/export/`, that
  run's). Bad input (no such model, an unknown quant) is a one-line `UserError`.
- `bind(host, port) -> socket` takes the address before anything is exported or loaded, so a port in
  use is a one-line `UserError` with nothing written; port 0 takes any free one.
- `serve(model, host, port, quant, api_key, threads, ctx)` does the above, exports when needed,
  loads the GGUF into `llama_cpp.server.app.create_app` (chat format: the GGUF's own
  `tokenizer.chat_template`, rendered by llama-cpp-python's Jinja2 formatter), wraps it in
  `serve_front.OpenAIFront` (API key, request checks, system prompt) and runs it with uvicorn in
  this process until SIGINT/SIGTERM, then prints one line and returns 0. Requests are answered one
  at a time (llama-cpp-python holds one model context); concurrent ones queue.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.models import BUNDLED, check_gguf
from tunesmith.rundir import RunDir

DEFAULT_QUANT = "q8_0"
DEFAULT_CTX = 2048  # tokens, unless the model was trained on fewer
# llama-cpp-python's settings read any environment variable named like a field (N_GPU_LAYERS, API_KEY,
# ...); only these prefixed ones reach `serve` (TUNESMITH_LLAMA_N_GPU_LAYERS=99), the flags win
ENV_PREFIX = "TUNESMITH_LLAMA_"
# llama-cpp-python's `server` extra: the gguf extra alone installs only the first
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


@dataclass
class Served:
    gguf: Path  # the file llama.cpp loads
    name: str  # the model id /v1/models lists
    system_prompt: str | None  # inserted into chats without a system message
    system_from: Path | None  # the tunesmith.yaml it came from
    export_from: str | None = None  # the model to export first (None: the GGUF is there and current)
    quant: str | None = None


def _known_quants() -> tuple[str, ...]:
    """What `export_gguf` takes: `config.GGUF_QUANTS` where the K-quants are listed, else `gguf.QUANTS`."""
    from tunesmith import config
    from tunesmith.export.gguf import QUANTS

    return tuple(getattr(config, "GGUF_QUANTS", QUANTS))


def _stale(gguf: Path, run: RunDir) -> bool:
    """The cached GGUF is older than the weights it was exported from (the run was trained again)."""
    weights = list(run.path.glob("*.safetensors"))  # the adapter, or a full/merged model's shards
    return bool(weights) and max(p.stat().st_mtime for p in weights) > gguf.stat().st_mtime


def served_gguf(model: str, quant: str | None = None) -> Served:
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"model {model}: a file must be a .gguf; otherwise give a run dir or an HF model dir")
        if quant is not None:
            raise UserError(f"a .gguf file is served as it is; drop --quant, or give the run dir to export {quant}")
        check_gguf(path)
        run = RunDir(path.parent.parent) if path.parent.name == "export" else None
        system = run.system_prompt if run is not None and run.has_config else None
        return Served(path, path.stem, system, run.config_path if system is not None else None)
    quant = quant or DEFAULT_QUANT
    known = _known_quants()
    if quant not in known:
        raise UserError(f"expected one of {', '.join(known)}, got {quant}", key="quant")
    if model not in BUNDLED and not path.exists():
        raise UserError(
            f"model {model}: not found; expected a run dir, an HF model dir, a .gguf file "
            f"or one of: {', '.join(BUNDLED)}"
        )
    from tunesmith.export.gguf import default_export_path

    gguf = default_export_path(model, quant)
    run = RunDir(path)
    system = run.system_prompt if run.is_run else None
    name = model if model in BUNDLED else path.resolve().name
    current = gguf.is_file() and not (run.is_run and _stale(gguf, run))
    return Served(
        gguf, name, system, run.config_path if system is not None else None, None if current else model, quant
    )


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise UserError(f"expected a port number 0-65535, got {port}", key="port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(
            f"cannot listen on {host!r} ({err.strerror}); expected an address like 127.0.0.1", key="host"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        reason = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
        raise UserError(f"{host}:{port} {reason}; pick another port", key="port") from None
    return sock


def _log_config() -> dict:
    """uvicorn's own format; one access line per request, its start/stop chatter left out."""
    from uvicorn.config import LOGGING_CONFIG

    config = {**LOGGING_CONFIG, "loggers": {k: dict(v) for k, v in LOGGING_CONFIG["loggers"].items()}}
    config["loggers"]["uvicorn.error"]["level"] = "WARNING"
    config["loggers"]["uvicorn.access"]["level"] = "INFO"
    return config


def build_app(served: Served, api_key: str | None = None, threads: int | None = None, ctx: int | None = None):
    """llama-cpp-python's FastAPI app over the GGUF (loaded here), behind `OpenAIFront`. `ctx` None:
    2048 tokens, or the model's trained context when that is shorter."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from pydantic import ValidationError

    from tunesmith.export.serve_front import OpenAIFront

    os.environ.pop("CONFIG_FILE", None)  # create_app would take every setting from that file instead
    has_template, trained = gguf_facts(served.gguf)
    if ctx is None:
        ctx = min(DEFAULT_CTX, trained or DEFAULT_CTX)
    model = {"model": str(served.gguf), "model_alias": served.name, "n_ctx": ctx, "verbose": False}
    if threads is not None:
        model.update(n_threads=threads, n_threads_batch=threads)
    if has_template:
        # the run's template from the GGUF, through llama-cpp-python's Jinja2 formatter; without
        # this it swaps a template it recognises for its own built-in copy of that format
        model["chat_format"] = "chat_template.default"
    # interrupt_requests=False: a queued request waits for a streaming one instead of cutting it off
    try:
        server = ServerSettings(api_key=api_key, interrupt_requests=False, _env_prefix=ENV_PREFIX)
        settings = ModelSettings(**model, _env_prefix=ENV_PREFIX)
    except ValidationError as err:
        first = err.errors()[0]
        name = ENV_PREFIX + "_".join(str(p) for p in first["loc"]).upper()
        raise UserError(f"environment variable {name}: {first['msg']}") from None
    try:
        app = create_app(server_settings=server, model_settings=[settings])
    except ValueError as err:  # llama.cpp: "Failed to load model from file: ..."
        raise UserError(f"{served.gguf}: llama.cpp cannot load it ({str(err).splitlines()[0]})") from None
    return OpenAIFront(app, system_prompt=served.system_prompt, api_key=api_key)


def gguf_facts(gguf: Path) -> tuple[bool, int | None]:
    """Whether the GGUF carries a chat template, and the context length it was trained with."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    trained = fields.get(f"{arch}.context_length")
    return "tokenizer.chat_template" in fields, int(trained.contents()) if trained is not None else None


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    quant: str | None = None,
    api_key: str | None = None,
    threads: int | None = None,
    ctx: int | None = None,
) -> int:
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"needs llama-cpp-python's server (no {', '.join(missing)}): pip install 'tunesmith[serve]'")
    if threads is not None and threads < 1:
        raise UserError(f"expected a number of threads ≥ 1, got {threads}", key="threads")
    if ctx is not None and ctx < 0:
        raise UserError(f"expected a context length ≥ 0 (0: the model's own), got {ctx}", key="ctx")
    if api_key is not None:
        api_key = api_key.strip()  # a key read from a file or variable often ends in a newline
        if not api_key:
            raise UserError("expected a non-empty key", key="api_key")
    served = served_gguf(model, quant)
    sock = bind(host, port)
    # SIGTERM while exporting or loading: unwind like Ctrl-C, so no half-written file stays behind
    previous = _on_signals((signal.SIGTERM,), _interrupt)
    try:
        if served.export_from is not None:
            from tunesmith.export.gguf import export_gguf

            print(f"tunesmith: exporting {served.export_from} to {served.gguf} ({served.quant}; later runs reuse it)")
            export_gguf(served.export_from, served.gguf, quant=served.quant, force=served.gguf.exists())
        app = build_app(served, api_key=api_key, threads=threads, ctx=ctx)
        return _run(app, sock, served, api_key is not None)
    finally:
        _restore(previous)
        sock.close()


def _interrupt(_sig, _frame):
    raise KeyboardInterrupt


def _on_signals(signals, handler) -> dict:
    """Install `handler` for `signals` (only the main thread may); returns what to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in signals}


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _run(app, sock: socket.socket, served: Served, keyed: bool) -> int:
    import uvicorn

    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    system = f"system prompt from {served.system_from}" if served.system_from else "no system prompt"
    print(
        f"tunesmith: serving {served.name} ({served.gguf}) at http://{url_host}:{port}/v1 "
        f"({system}; {'API key required' if keyed else 'no API key'}); stop with Ctrl-C or SIGTERM",
        flush=True,
    )
    config = uvicorn.Config(app, log_config=_log_config(), log_level=None, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    # uvicorn stops on SIGINT/SIGTERM and then raises the signal again for the handler it found,
    # which would kill the process (SIGTERM) or raise KeyboardInterrupt: note it here instead
    caught: list[int] = []
    previous = _on_signals((signal.SIGINT, signal.SIGTERM), lambda sig, _frame: caught.append(sig))
    try:
        server.run(sockets=[sock])
    finally:
        _restore(previous)
    why = signal.Signals(caught[0]).name if caught else "server exited"
    print(f"tunesmith: stopped serving {served.name} ({why})", flush=True)
    return 0
