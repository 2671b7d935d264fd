"""`tunesmith generate` (one prompt or a file of them) and `tunesmith chat` (interactive).

Both load a base model, a full fine-tune dir or a LoRA run dir (base + adapter) through
`adapters.load_for_inference`, and format prompts with the same chat template and system
prompt that training used (the run's `tunesmith.yaml` supplies `data.system_prompt`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunesmith.errors import UserError


def _check_sampling(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: expected an integer >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature: expected a number >= 0, got {args.temperature}")


def _load(args):
    from tunesmith.adapters import RUN_CONFIG, load_for_inference
    from tunesmith.compute import inference_dtype
    from tunesmith.models import pick_device

    device = pick_device(args.device)
    model, tokenizer, label = load_for_inference(args.model, device=device, dtype=inference_dtype(args.precision, device))
    system = args.system
    run_cfg = Path(args.model) / RUN_CONFIG
    if system is None and run_cfg.is_file():
        import yaml

        system = ((yaml.safe_load(run_cfg.read_text(encoding="utf-8")) or {}).get("data") or {}).get("system_prompt")
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
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            text = obj.get("prompt", obj.get("question")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{n}: expected an object with a string field prompt or question")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"{path}: no prompts (empty file)")
    return prompts


def run_generate(args) -> int:
    _check_sampling(args)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.file)
    if args.out and Path(args.out).exists():
        raise UserError(f"--out: {args.out} already exists; choose another file")
    from tunesmith.eval.generate import generate_batch

    model, tokenizer, _, system = _load(args)
    replies = generate_batch(
        model, tokenizer, [_conversation(system, p) for p in prompts],
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        temperature=args.temperature, top_p=args.top_p,
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


def run_chat(args) -> int:
    _check_sampling(args)
    from tunesmith.eval.generate import stream_reply

    model, tokenizer, label, system = _load(args)
    print(f"tunesmith chat — {label}\ncommands: /reset clears the conversation, /exit or Ctrl-D quits", flush=True)
    history = [{"role": "system", "content": system}] if system else []
    start = list(history)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("model> ")
        pieces = []
        for piece in stream_reply(model, tokenizer, history, args.max_new_tokens, args.temperature, args.top_p):
            sys.stdout.write(piece)
            sys.stdout.flush()
            pieces.append(piece)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
