"""Self-distillation for `data.replay_source: self`: the base model answers the bundled prompts once.

Contract: `prepare_replay(cfg)` → (path of the answers file, whether it generated them now), or
(None, False) when the config asks for no self replay. The base model (`model.name`, no adapter)
answers `resources/replay/prompts.jsonl` greedily in fp32 with continuous batching
(`generate_detailed`), each prompt rendered as training renders it (the run's chat template and
system prompt); the answers (one cut off at `max_new_tokens` up to its last whole sentence, so
the model does not learn to stop mid-sentence) go to `data.replay.self_answers_path` (JSON, atomic) and are reused
while the model, prompts, generation settings, template and system prompt stay the same. Every
entry point that fine-tunes calls it before `run_training`, which reads the file through the data
layer (`data/replay.py`); that layer cannot generate itself (it sits below `infer`).
"""

from __future__ import annotations

import time


def prepare_replay(cfg, quiet: bool = False):
    d = cfg.data
    if not d.replay or d.replay_source != "self":
        return None, False
    from tunesmith.data.replay import (
        GENERATION,
        data_cache_dir,
        load_prompts,
        prompt_conversation,
        read_answers,
        self_answers_path,
        write_answers,
    )
    from tunesmith.data.sft import ensure_chat_template
    from tunesmith.models import load_tokenizer, resolve_model

    resolved = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(resolved, cfg.model.trust_remote_code, cfg.model.revision)
    ensure_chat_template(tokenizer, d.chat_template)
    path = self_answers_path(d, tokenizer, data_cache_dir(d))
    if read_answers(path) is not None:
        return path, False
    import torch

    from tunesmith.infer.generate import generate_detailed
    from tunesmith.models import load_model
    from tunesmith.train.cpu import use_threads

    use_threads(cfg.train.threads, "train.threads", warn=False)  # as training will
    prompts = load_prompts()
    if not quiet:
        print(
            f"tunesmith: replay: {cfg.model.name} answers {len(prompts)} general prompts once "
            f"(self-distillation, cached in {path.parent}) …",
            flush=True,
        )
    started = time.perf_counter()
    model = load_model(
        resolved,
        dtype=torch.float32,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
        attn_implementation=cfg.model.attn_implementation,
    )
    model.eval()
    conversations = [prompt_conversation(p, d.system_prompt) for p in prompts]
    from tqdm.auto import tqdm

    with tqdm(total=len(prompts), desc="replay", unit="answer", disable=quiet or not cfg.train.progress) as bar:
        answers, _, generated = generate_detailed(
            model,
            tokenizer,
            conversations,
            max_new_tokens=GENERATION["max_new_tokens"],
            batch_size=GENERATION["batch_size"],
            on_batch=bar.update,
        )
    del model
    # an answer cut off at max_new_tokens is kept up to its last whole sentence (write_answers)
    finished = [n < GENERATION["max_new_tokens"] for n in generated]
    kept = write_answers(path, prompts, answers, cfg.model.name, finished)
    if not quiet:
        seconds = time.perf_counter() - started
        cut = finished.count(False)
        print(f"tunesmith: replay: {kept} of {len(answers)} kept ({cut} cut at a whole sentence), {seconds:.0f} s")
    return path, True
