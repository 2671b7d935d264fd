"""`tunesmith generate MODEL --prompt TEXT | --file PROMPTS [--out JSONL]`: answer one prompt or a file of them.

Loads a base model, a full fine-tune dir or an adapter run dir (base + adapter) through
`infer.load.load_for_inference`, and formats prompts with the chat template and system prompt that
training used (the run's saved config supplies `data.system_prompt`). `tunesmith chat` shares the
model arguments and the loading (`add_model_arguments`, `load`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.data.formats import loads, unicode_text
from tunesmith.errors import EnvironmentFault, UserError

HELP = "answer one prompt or a file of prompts"


def add_model_arguments(p) -> None:
    p.add_argument("model", help="run dir (adapter or full), HF model dir, .gguf file, or smollm2-135m-instruct")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="weights to generate with; auto = bf16 where bf16 matmuls pay (AMX, CUDA), else fp32",
    )


def add_arguments(p) -> None:
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--file", help=".txt (one prompt a line) or .jsonl with a prompt/question field")
    p.add_argument("--out", help="write JSONL results here instead of printing")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice; 1 on a busy machine)"
    )


def check_sampling(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: expected an integer >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf"):  # also refuses nan
        raise UserError(f"--temperature: expected a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p: expected a number in (0, 1], got {args.top_p}")
    if getattr(args, "batch_size", 1) < 1:
        raise UserError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    for flag, text in (("--system", args.system), ("--prompt", getattr(args, "prompt", None))):
        if text is not None and any("\ud800" <= c <= "\udfff" for c in text):  # argv's undecodable bytes
            raise UserError(f"{flag}: not UTF-8 text (an undecodable byte or an unpaired surrogate)")


def check_output_file(path: str | None, flag: str, new: bool = True) -> None:
    """Before any work: `path` must be a file (a new one when `new`) in an existing, writable folder."""
    if path is None:
        return
    out = Path(path)
    if (new and out.exists()) or out.is_dir():
        raise UserError(f"{flag}: {path} already exists{' as a folder' if out.is_dir() else ''}; choose another file")
    folder = out.parent
    if not folder.is_dir():
        raise UserError(f"{flag}: {path}: the folder {folder} does not exist; create it first")
    from tunesmith.train.budget import unwritable

    problem = unwritable(folder)
    if problem:
        raise EnvironmentFault(f"{flag}: {path}: {problem}; nothing was written")


def load(args):
    """(model, tokenizer, label, system prompt) for the model the user named."""
    from tunesmith.infer.load import check_adapter_file, load_for_inference
    from tunesmith.models import pick_device
    from tunesmith.precision import inference_dtype
    from tunesmith.rundir import RunDir

    run = RunDir(args.model)  # the run's own files first: a bad one is one line before torch loads
    system = args.system if args.system is not None else run.system_prompt
    if run.kind == "adapter":
        check_adapter_file(run.path)
    device = pick_device(args.device, key="--device")
    model, tokenizer, label = load_for_inference(
        args.model, device=device, dtype=inference_dtype(args.precision, device)
    )
    return model, tokenizer, label, system


def _conversation(system: str | None, prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: prompt file not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            obj = loads(line, path, n)
            text = obj.get("prompt", obj.get("question")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{n}: expected an object with a string field prompt or question")
            prompts.append(unicode_text(text, f"{path}:{n}", "prompt"))
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"{path}: no prompts (empty file)")
    return prompts


def run(args) -> int:
    check_sampling(args)
    check_output_file(args.out, "--out")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.file)
    if args.threads < 0:
        raise UserError(f"--threads: expected an integer >= 0 (0 = torch's default), got {args.threads}")
    from tunesmith.infer.generate import generate_batch
    from tunesmith.train.cpu import use_threads, warn_if_busy

    threads = use_threads(args.threads, "--threads", warn=False)
    model, tokenizer, _, system = load(args)
    warn_if_busy(threads, "--threads")  # after the model is read: its errors stay one line
    replies = generate_batch(
        model,
        tokenizer,
        [_conversation(system, p) for p in prompts],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            for p, r in zip(prompts, replies):
                fh.write(json.dumps({"prompt": p, "response": r}) + "\n")
        print(f"tunesmith: {len(replies)} responses → {args.out}")
    elif len(prompts) == 1:
        print(replies[0])
    else:
        for p, r in zip(prompts, replies):
            print(f">>> {p}\n{r}\n")
    return 0
