"""`tunesmith pipeline`: pretrain → fine-tune → merge → export → compare from one config.

Contract: `run_pipeline(cfg, from_stage=None) -> dict` runs the stages listed in
`pipeline.stages`, always in that order, each feeding the next, under `pipeline.output_dir`:
  pretrain/            `tunesmith.pretrain.run_pretrain` (+ `pretrain-merged/` when it trains an adapter)
  finetune/            `train.loop.run_training` on `data`, starting from the previous stage's model
  merged/              the fine-tuned adapter folded into its base (a full fine-tune is passed on as is)
  export/model-Q.gguf  one GGUF per `pipeline.export_quants`, verified in llama.cpp when installed
  compare/             `tunesmith.eval.compare.run_compare` on the fine-tuned run
`pipeline.json` records every stage with the hash of what shaped it (its own effective config
and the hash of the stage before it). A rerun skips stages recorded as done with the same hash
whose output still exists; a stage whose hash changed is cleared and run again, and so is every
stage after it (their hashes chain). A stage that was started but not finished (the process was
killed) is resumed: training stages continue from their newest checkpoint (`train.resume=auto`),
the others are redone (each writes atomically). `from_stage` (`--from`) clears that stage and
the ones after it; the stages before it must be finished. Missing inputs are one-line errors.
Output safety: `pipeline.output_dir` is locked while the pipeline runs (a second pipeline into it
is refused); before anything is cleared, the stages' inputs are checked (data files, corpus,
questions) and the earlier stages' records; only folders `pipeline.json` records as a stage's
are ever deleted, and a stage folder it does not record (the user's own `export/`, say) is
refused rather than written into.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

from tunesmith.config import PIPELINE_STAGES, CompareConfig, Config, PipelineConfig, PretrainConfig, config_hash
from tunesmith.errors import UserError
from tunesmith.io import OutputLock, write_atomic

STATE = "pipeline.json"
DIRS = {"pretrain": "pretrain", "finetune": "finetune", "merge": "merged", "export": "export", "compare": "compare"}


def _load_state(root: Path) -> dict:
    path = root / STATE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UserError(
            f"{path}: unreadable pipeline record; remove it (the stages will rerun) or choose another "
            "pipeline.output_dir"
        ) from None


def _save_state(root: Path, state: dict) -> None:
    write_atomic(root / STATE, json.dumps(state, indent=2))


def _owned(state: dict, stage: str) -> list[str]:
    """The folders under the root this pipeline wrote for `stage` (none without a record)."""
    record = state.get(stage)
    if not record:
        return []
    return record.get("dirs", [DIRS[stage], f"{DIRS[stage]}-merged"])


def _clear(root: Path, state: dict, stage: str) -> None:
    for name in _owned(state, stage):
        shutil.rmtree(root / name, ignore_errors=True)


def _check_inputs(cfg: Config, root: Path, state: dict, to_run: list[str]) -> None:
    """Before anything is cleared: the inputs of the stages that will run can be read, and no
    folder they write is one `pipeline.json` does not record (it is not this pipeline's)."""
    if "pretrain" in to_run:
        from tunesmith.pretrain.textdata import corpus_files

        corpus_files(cfg.pretrain.corpus)
    if "finetune" in to_run:
        from tunesmith.data.formats import load_examples

        load_examples(cfg.data.train + cfg.data.validation, cfg.data.format, cfg.data.system_prompt)
    if "compare" in to_run and cfg.compare.questions:
        from tunesmith.eval.questions import load_questions

        load_questions(cfg.compare.questions)
    for stage in to_run:
        for name in (DIRS[stage], f"{DIRS[stage]}-merged"):
            if (root / name).exists() and name not in _owned(state, stage):
                raise UserError(
                    f"config key pipeline.output_dir: {root / name} was not written by this pipeline "
                    f"({STATE} has no record of it); move it away or choose another pipeline.output_dir"
                )


def _dirs(stage: str) -> list[str]:
    return [DIRS[stage], f"{DIRS[stage]}-merged"] if stage == "pretrain" else [DIRS[stage]]


def _pretrain_cfg(cfg: Config, out: Path) -> Config:
    from tunesmith.pretrain.run import stage_config

    name = "<trained from scratch>" if cfg.pretrain.from_scratch else cfg.model.name
    return stage_config(cfg, name, str(out))


def _finetune_cfg(cfg: Config, model: str, out: Path) -> Config:
    stage = copy.deepcopy(cfg)
    stage.model.name = model
    stage.train.output_dir = str(out)
    stage.pretrain, stage.pipeline, stage.compare = PretrainConfig(), PipelineConfig(), CompareConfig()
    return stage


def _identity(stage: str, cfg: Config, root: Path, model: str) -> str:
    """What shapes this stage's output, as a hash (resume-only keys left out)."""
    from tunesmith.rundir import RESUMABLE_CHANGES

    out = root / DIRS[stage]
    if stage == "pretrain":
        return config_hash(_pretrain_cfg(cfg, out), RESUMABLE_CHANGES + ("data",))
    if stage == "finetune":
        return config_hash(_finetune_cfg(cfg, model, out), RESUMABLE_CHANGES + ("pretrain",))
    if stage == "export":
        return json.dumps([cfg.pipeline.export_quants, cfg.pipeline.verify])
    if stage == "compare":
        from dataclasses import asdict

        return json.dumps(asdict(cfg.compare), sort_keys=True)
    return stage


def _chain(upstream: str, identity: str) -> str:
    return hashlib.sha256(f"{upstream}|{identity}".encode()).hexdigest()[:16]


def _resumable(stage_cfg: Config) -> Config:
    stage_cfg.train.resume = "auto"
    return stage_cfg


def _run_pretrain(cfg: Config, root: Path, model: str) -> tuple[str, dict]:
    from tunesmith.export.merge import merge_run
    from tunesmith.pretrain.run import run_pretrain

    out = root / DIRS["pretrain"]
    staged = copy.deepcopy(cfg)
    staged.train.resume = "auto"
    summary = run_pretrain(staged, str(out))
    if not cfg.pretrain.from_scratch and cfg.pretrain.method != "full":
        merged = merge_run(out, root / "pretrain-merged", force=True)
        return str(merged), summary
    return str(out), summary


def _run_finetune(cfg: Config, root: Path, model: str) -> tuple[str, dict]:
    from tunesmith.infer.replay import prepare_replay
    from tunesmith.train.loop import run_training

    staged = _resumable(_finetune_cfg(cfg, model, root / DIRS["finetune"]))
    prepare_replay(staged)  # data.replay_source=self: the previous stage's model answers, once
    result = run_training(staged)
    return str(result.output_dir), result.summary


def _run_merge(cfg: Config, root: Path, model: str) -> tuple[str, dict]:
    from tunesmith.export.merge import merge_run
    from tunesmith.rundir import RunDir

    if RunDir(model).kind != "adapter":
        print(f"tunesmith: pipeline: {model} is a full model; nothing to merge", flush=True)
        return model, {"merged": False}
    out = merge_run(model, root / DIRS["merge"], force=True)
    return str(out), {"merged": True}


def _run_export(cfg: Config, root: Path, model: str) -> tuple[str, dict]:
    import importlib.util

    from tunesmith.export.gguf import export_gguf
    from tunesmith.export.verify import report_table, verify_export

    verify = cfg.pipeline.verify and importlib.util.find_spec("llama_cpp") is not None
    if cfg.pipeline.verify and not verify:
        print("tunesmith: pipeline: llama-cpp-python is not installed, so the GGUFs are not verified", flush=True)
    results = {}
    for quant in cfg.pipeline.export_quants:
        path = export_gguf(model, root / DIRS["export"] / f"model-{quant}.gguf", quant=quant, force=True)
        report = verify_export(model, path, quant, verify=verify)
        print(report_table(report["table"]), flush=True)
        if verify and not report["passed"]:
            print(f"tunesmith: WARNING: {path} failed verification: {'; '.join(report['failures'])}", flush=True)
        results[quant] = {"path": str(path), "size_mib": report["size_mib"], "passed": report.get("passed")}
    return model, {"gguf": results}


def _run_compare(cfg: Config, root: Path, model: str, finetuned: str | None) -> tuple[str, dict]:
    from tunesmith.eval.compare import run_compare

    if finetuned is None:
        raise UserError("pipeline.stages: the compare stage compares a fine-tuned run; add finetune to the stages")
    staged = copy.deepcopy(cfg)
    staged.compare.run = finetuned
    staged.compare.output_dir = staged.compare.output_dir or str(root / DIRS["compare"])
    results = run_compare(staged)
    # pipeline.json keeps the headline (primary metric per arm and split); results.json has the rest
    primary = results["primary_metric"]
    headline: dict = {}
    for row in results["scores"]:
        if row["metric"] == primary:
            headline.setdefault(row["arm"], {})[row["split"]] = row["mean"]
    return staged.compare.output_dir, {
        "results": str(Path(staged.compare.output_dir) / "results.json"),
        primary: headline,
    }


def run_pipeline(cfg: Config, from_stage: str | None = None) -> dict:
    root = Path(cfg.pipeline.output_dir)
    stages = [s for s in PIPELINE_STAGES if s in cfg.pipeline.stages]
    if from_stage is not None and from_stage not in stages:
        raise UserError(
            f"{from_stage} is not a stage of this pipeline; expected one of {', '.join(stages)}", key="from_stage"
        )
    with OutputLock(root, key="pipeline.output_dir"):
        return _run(cfg, root, stages, from_stage)


def _run(cfg: Config, root: Path, stages: list[str], from_stage: str | None) -> dict:
    state = _load_state(root)
    before = stages[: stages.index(from_stage)] if from_stage else []
    for stage in before:
        record = state.get(stage)
        if not record or not record.get("done") or not Path(record["output"]).exists():
            raise UserError(
                f"stage {stage} has not finished (its output is missing), so the pipeline cannot start at "
                f"{from_stage}; run it from the start, or from {stage}",
                key="from_stage",
            )
    _check_inputs(cfg, root, state, [s for s in stages if s not in before])
    if from_stage is not None:
        for stage in stages[stages.index(from_stage) :]:
            _clear(root, state, stage)
            state.pop(stage, None)
        _save_state(root, state)
    model, upstream, finetuned, timings = cfg.model.name, "", None, []
    for i, stage in enumerate(stages):
        out = root / DIRS[stage]
        key = _chain(upstream, _identity(stage, cfg, root, model))
        record = state.get(stage)
        done = record and record.get("done") and record["hash"] == key and Path(record["output"]).exists()
        if done:
            print(f"tunesmith: pipeline: {stage} already done → {record['output']} (skipped)", flush=True)
            timings.append((stage, "skipped", 0.0, record["output"]))
        else:
            if record and record["hash"] != key:
                _clear(root, state, stage)  # its config or its input changed: another run, not a resume
                print(f"tunesmith: pipeline: {stage} changed since its last run; starting it again", flush=True)
            elif record:
                print(f"tunesmith: pipeline: resuming {stage}", flush=True)
            state[stage] = {"hash": key, "done": False, "output": str(out), "dirs": _dirs(stage)}
            _save_state(root, state)
            print(f"tunesmith: pipeline: {stage} ({i + 1}/{len(stages)})", flush=True)
            t0 = time.perf_counter()
            if stage == "compare":
                output, summary = _run_compare(cfg, root, model, finetuned)
            else:
                runner = {
                    "pretrain": _run_pretrain,
                    "finetune": _run_finetune,
                    "merge": _run_merge,
                    "export": _run_export,
                }[stage]
                output, summary = runner(cfg, root, model)
            wall = time.perf_counter() - t0
            record = {"hash": key, "done": True, "output": str(output), "wall_s": round(wall, 1), "summary": summary}
            record["dirs"] = _dirs(stage)
            state[stage] = record
            _save_state(root, state)
            timings.append((stage, "ran", wall, str(output)))
        if stage == "finetune":
            finetuned = record["output"]
        if stage != "compare":
            model = record["output"]
        upstream = key
    width = max(len(s) for s, *_ in timings)
    print("tunesmith: pipeline finished:", flush=True)
    for stage, status, wall, output in timings:
        print(f"  {stage:<{width}}  {status:<7} {wall:7.1f}s  {output}", flush=True)
    return state
