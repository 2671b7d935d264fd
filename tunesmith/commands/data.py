"""`tunesmith data check DATA... [--eval EVAL...] [--config C] [--model M] [--max-length N] [--json PATH]`.

A thin wrapper over `tunesmith.data.lint.check`: prints the summary table, optionally writes the
JSON report; exit 0 (warnings included), 2 for a file that cannot be read.
"""

import json
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.errors import UserError


def run(args) -> int:
    from tunesmith.data.lint import check, summary
    from tunesmith.data.sft import ensure_chat_template
    from tunesmith.models import load_tokenizer, resolve_model

    cfg = load_config(args.config) if args.config else load_config(None)
    model = args.model or cfg.model.name
    max_length = args.max_length if args.max_length is not None else cfg.data.max_length
    if max_length < 1:
        raise UserError(f"--max-length: expected a number of tokens >= 1, got {max_length}")
    tokenizer = load_tokenizer(resolve_model(model), cfg.model.trust_remote_code, cfg.model.revision)
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    report = check(args.data, args.eval, cfg.data.format, cfg.data.system_prompt, tokenizer, max_length,
                   cfg.data.train_on_prompt)
    report["model"] = model
    print(summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0
