"""`tunesmith data check DATA... [--eval EVAL...] [--config C] [--model M] [--max-length N] [--json PATH]`.

A thin wrapper over `tunesmith.data.lint.check`: prints the summary table, optionally writes the
JSON report; exit 0 (warnings included), 2 for a file that cannot be read. An `--eval` file in
`tunesmith compare`'s question format (question, answer, optional fact_id, split) is read by
`eval.questions.load_questions` (splits checked, mapped by the config's `compare.splits`) and
checked as (question → answer) records.
"""

from __future__ import annotations

import json

from tunesmith.config import load_config
from tunesmith.errors import UserError

HELP = "data check DATA [--eval EVAL]: duplicates, leakage, empty answers, lengths, encoding"


def add_arguments(p) -> None:
    p.add_argument("action", choices=["check"], help="check: data quality report")
    p.add_argument("data", nargs="+", help="training data: files, dataset or shard folders, hub dataset names")
    p.add_argument("--eval", nargs="+", default=[], help="evaluation data, checked for leakage from the training data")
    p.add_argument(
        "--config", help="take model, format, max_length, split, columns, system prompt and template from this YAML"
    )
    p.add_argument("--model", help="tokenizer for token lengths (default: the config's model.name)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="flag samples longer than this many tokens (default: data.max_length)",
    )
    p.add_argument("--json", help="write the full report as JSON here")


def run(args) -> int:
    from tunesmith.commands.generate import check_output_file
    from tunesmith.data.formats import Example
    from tunesmith.data.lint import check, summary
    from tunesmith.data.sft import ensure_chat_template
    from tunesmith.eval.questions import is_question_file, load_questions
    from tunesmith.io import check_not_input, write_atomic
    from tunesmith.models import load_tokenizer, resolve_model

    check_output_file(args.json, "--json", new=False)  # before the work, not after it
    if args.json:  # the report may not overwrite the data it checks
        check_not_input(args.json, [*args.data, *args.eval, args.config], key="--json")
    cfg = load_config(args.config) if args.config else load_config(None)
    model = args.model or cfg.model.name
    max_length = args.max_length if args.max_length is not None else cfg.data.max_length
    if max_length < 1:
        raise UserError(f"--max-length: expected a number of tokens >= 1, got {max_length}")
    tokenizer = load_tokenizer(resolve_model(model), cfg.model.trust_remote_code, cfg.model.revision)
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    questions = [p for p in args.eval if is_question_file(p)]
    asked = [
        Example([{"role": "user", "content": q.question}, {"role": "assistant", "content": q.answer}], None, q.source)
        for path in questions
        for q in load_questions(path, key="--eval", splits=cfg.compare.splits)
    ]
    others = [p for p in args.eval if p not in questions]
    d = cfg.data
    report = check(
        args.data, others, d.format, d.system_prompt, tokenizer, max_length, d.train_on_prompt,
        d.split, d.validation_split, d.subset, d.columns, eval_examples=asked,
    )  # fmt: skip
    report["model"] = model
    print(summary(report))
    if args.config and d.context:  # what training with retrieved context would make of this data
        from tunesmith.data.context import context_check, context_line

        report["context"] = context_check(args.data, cfg, tokenizer, max_length)
        print(context_line(report["context"], d.documents or cfg.compare.documents, max_length))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2, ensure_ascii=False))
    return 0
