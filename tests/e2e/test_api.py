"""The library API a user imports: every tunesmith module imports cleanly, and `tunesmith.finetune`,
`compare`, `export_gguf` and `estimate` each work twice in one process (once anything has imported
`tunesmith.train.loop`, nothing may shadow the API's names), with a bad key as a one-line error."""

import importlib
import json
import pkgutil

import pytest

import tunesmith
from tests.tiny import NAMES, write_config, write_qa_jsonl
from tunesmith.errors import UserError


def _import_every_module() -> None:
    names = [m.name for m in pkgutil.walk_packages(tunesmith.__path__, "tunesmith.")]
    assert len(names) > 50 and "tunesmith.train.loop" in names  # the import that once shadowed the API
    for name in names:
        importlib.import_module(name)
    for api in ("finetune", "compare", "export_gguf", "estimate", "load_config"):
        assert callable(getattr(tunesmith, api)), api


def test_finetune_twice_after_importing_every_module(tmp_path, tiny_model_dir):
    _import_every_module()
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    runs = []
    for name in ("a", "b"):
        cfg = tunesmith.load_config(write_config(tmp_path / f"{name}.yaml", tiny_model_dir, data, tmp_path / name))
        runs.append(tunesmith.finetune(cfg))
    assert [r.output_dir.name for r in runs] == ["a", "b"]
    assert all((r.output_dir / "adapter_model.safetensors").is_file() for r in runs)
    assert runs[0].summary["final_train_loss"] == pytest.approx(runs[1].summary["final_train_loss"], abs=1e-6)

    for quant in ("f16", "q8_0"):
        out = tunesmith.export_gguf(str(runs[0].output_dir), quant=quant)
        assert out == runs[0].output_dir / "export" / f"model-{quant}.gguf" and out.stat().st_size > 0

    cfg = tunesmith.load_config(tmp_path / "a.yaml", ["train.output_dir=" + str(tmp_path / "c")])
    first, second = (tunesmith.estimate(cfg, probe=False) for _ in range(2))
    assert first.peak_bytes == pytest.approx(second.peak_bytes, rel=0.05) and first.trainable == second.trainable

    with pytest.raises(UserError, match="^config key adapter.method"):
        tunesmith.load_config(tmp_path / "a.yaml", ["adapter.method=lorax"])


def test_compare_twice_in_one_process(tmp_path, tiny_model_dir):
    _import_every_module()
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question": f"What is the answer {i}?", "answer": NAMES[i % len(NAMES)], "split": "seen"})
            + "\n"
            for i in range(4)
        )
    )
    compare = {
        "questions": str(questions),
        "arms": ["base", "finetuned"],
        "max_new_tokens": 4,
        "latency_samples": 1,
        "general_questions": "",
        "general_text": "",
        "bootstrap": 50,
    }
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run", compare=compare)
    first = tunesmith.compare(tunesmith.load_config(path))  # trains the run first
    second = tunesmith.compare(tunesmith.load_config(path))  # reuses the finished run
    assert [a["name"] for a in first["arms"]] == [a["name"] for a in second["arms"]] == ["base", "finetuned"]
    assert first["answers"] == second["answers"]  # greedy, same weights
    assert (tmp_path / "run" / "compare" / "results.json").is_file()
