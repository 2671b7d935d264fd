"""`tunesmith chat MODEL`: chat interactively with a model or a run dir, streaming the replies.

The model arguments and loading are `tunesmith generate`'s. `/reset` clears the conversation,
`/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import sys

from tunesmith.commands.generate import add_model_arguments, check_sampling, load

HELP = "chat interactively with a model or run dir (streaming)"


def add_arguments(p) -> None:
    add_model_arguments(p)


def run(args) -> int:
    check_sampling(args)
    from tunesmith.infer.generate import stream_reply

    model, tokenizer, label, system = load(args)
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
