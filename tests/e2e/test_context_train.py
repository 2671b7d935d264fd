"""`tunesmith train` with `data.context` on: a tiny model trains on questions with retrieved chunks
through the CLI, and a missing documents folder is one line, exit 2, nothing written."""

import json

from tests.e2e.test_bad_input import assert_one_line, run_cli, snapshot
from tests.tiny import NAMES, write_config, write_qa_jsonl
from tunesmith.cli import main


def write_docs(folder):
    folder.mkdir()
    for i, name in enumerate(NAMES):
        (folder / f"doc{i}.md").write_text(f"Record {i}. The answer is {name}, as the old ledger says.\n")
    return folder


def test_train_with_context(tmp_path, tiny_model_dir, capsys):
    docs = write_docs(tmp_path / "docs")
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml", tiny_model_dir, data, out,
        data={"context": True, "max_length": 256, "context_distractor_only": 0.25, "context_counterfactual": 0.5},
        compare={"documents": str(docs), "top_k": 2},
    )  # fmt: skip
    code = main(["train", str(cfg)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert (out / "adapter_model.safetensors").is_file()
    # 24 plain conversations + 24 with context, each with its answer's chunk found by its rare name
    line = next(x for x in printed.out.splitlines() if "data.context:" in x)
    assert "24 conversations also trained with retrieved chunks" in line and "found for 24 (100%)" in line, line
    assert "6 with distractors only, 9 with the answer swapped" in line, line
    # data check --config says what training with context makes of the data, before training
    code = main(["data", "check", str(data), "--config", str(cfg), "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "24 conversations also trained with retrieved chunks" in printed.out, printed.out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["context"]["n_context"] == 24 and report["context"]["n_cut"] == 0


def test_missing_documents_is_one_line(tmp_path, tiny_model_dir, capsys):
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml", tiny_model_dir, data, out, data={"context": True, "documents": str(tmp_path / "nope")}
    )
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "train", str(cfg))
    assert_one_line(code, err, "config key data.documents", "nope is not a folder")
    assert snapshot(tmp_path) == before and not out.exists()
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, out, data={"context": True})
    code, err = run_cli(capsys, "train", str(cfg))
    assert_one_line(code, err, "config key data.documents", "needs a documents folder")
