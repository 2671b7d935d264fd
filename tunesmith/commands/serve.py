"""`tunesmith serve MODEL|RUN [--port 8000] [--host 127.0.0.1] [--quant q8_0] [--api-key KEY] [--threads N]
[--ctx N]` → `export.serve.serve`: an OpenAI-compatible HTTP server (llama.cpp, through llama-cpp-python)
over the GGUF `export` writes, with the run's chat template and system prompt.

Exit codes: 0 stopped by Ctrl-C or SIGTERM; 2 bad input (one line, nothing written).
"""

from __future__ import annotations

import os

HELP = "serve a run or GGUF over an OpenAI-compatible HTTP API (llama.cpp)"
FLAGS = {
    "quant": "--quant",
    "port": "--port",
    "host": "--host",
    "api_key": "--api-key",
    "threads": "--threads",
    "ctx": "--ctx",
}
API_KEY_ENV = "TUNESMITH_API_KEY"


def add_arguments(p) -> None:
    p.add_argument("model", help="run dir (exported once to RUN/export/model-QUANT.gguf), HF model dir, or .gguf file")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--quant", help="GGUF quant type to export and serve (default q8_0; not with a .gguf file)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: half the CPU cores)")
    p.add_argument(
        "--ctx", type=int, help="context length in tokens (default 2048 or the model's if less; 0: the model's)"
    )


def run(args) -> int:
    from tunesmith.export.serve import serve

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return serve(
        args.model,
        host=args.host,
        port=args.port,
        quant=args.quant,
        api_key=api_key,
        threads=args.threads,
        ctx=args.ctx,
    )
