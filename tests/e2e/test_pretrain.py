"""`tunesmith pretrain` through the real CLI on tiny sizes: from scratch, continued (LoRA), bad input."""

import json
import math
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import main

CORPUS = Path(__file__).resolve().parents[2] / "tunesmith" / "resources" / "corpus" / "texts"
TINY = {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128}


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_from_scratch_learns_below_unigram_entropy_and_loads_in_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "scratch"
    cfg = write(
        tmp_path / "p.yaml",
        {
            "pretrain": {
                "corpus": [str(CORPUS)],
                "from_scratch": True,
                **TINY,
                "vocab_size": 512,
                "block_size": 32,
                "val_fraction": 0.1,
            },
            "train": {
                "output_dir": str(out),
                "max_steps": 80,
                "batch_size": 16,
                "lr": 3e-2,
                "warmup_steps": 5,
                "progress": False,
                "log_every": 20,
            },
        },
    )
    code, stdout, err = cli(capsys, "pretrain", cfg)
    assert code == 0, err
    summary = json.loads((out / "pretrain.json").read_text())
    unigram = summary["corpus"]["unigram_bits_per_token"]
    # 80 steps of a 0.1M model (measured: 6.8 vs 7.4 bits); the pipeline run measured in
    # docs/pretrain-and-pipeline.md shows how far below it goes
    assert summary["val_bits_per_token"] < unigram - 0.3, summary
    assert summary["val_bits_per_byte"] == pytest.approx(
        summary["val_loss"] * summary["corpus"]["n_tokens"] / (summary["corpus"]["n_bytes"] * math.log(2))
    )
    assert "unigram entropy" in stdout and "bits/byte" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok) <= 512
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert tok.decode(tok("Merrowick harbour")["input_ids"]) == "Merrowick harbour"


def test_continued_lora_lowers_perplexity_on_the_domain_text(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "cpt"
    cfg = write(
        tmp_path / "c.yaml",
        {
            "model": {"name": str(tiny_model_dir)},
            "adapter": {"rank": 8, "alpha": 16},
            "pretrain": {
                "corpus": [str(CORPUS / "tales-of-the-harbour.txt")],
                "method": "lora",
                "block_size": 64,
                "val_fraction": 0.1,
                "max_steps": 30,
                "lr": 2e-2,
            },
            "train": {"output_dir": str(out), "batch_size": 8, "progress": False, "warmup_steps": 2},
        },
    )
    code, stdout, err = cli(capsys, "pretrain", cfg)
    assert code == 0, err
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["val_perplexity"] < 0.95 * summary["before"]["val_perplexity"], summary
    assert "perplexity on the validation text: before" in stdout
    assert (out / "adapter_model.safetensors").is_file()


def assert_one_line(code, err, *needles):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("content,needle", [(b"  \n\n", "corpus is empty"), (b"\x89PNG\r\n\x1a\n\0\0", "looks binary")])
def test_empty_or_binary_corpus_exits_2(tmp_path, capsys, content, needle):
    (tmp_path / "a.txt").write_bytes(content)
    code, _, err = cli(
        capsys,
        "pretrain",
        "pretrain.from_scratch=true",
        f"pretrain.corpus={tmp_path / 'a.txt'}",
        f"train.output_dir={tmp_path / 'out'}",
    )
    assert_one_line(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_tokenizer_model_vocabulary_mismatch_exits_2(tmp_path, capsys, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 100
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = cli(
        capsys, "pretrain", f"model.name={model}", f"pretrain.corpus={CORPUS}", f"train.output_dir={tmp_path / 'out'}"
    )
    assert_one_line(code, err, "tokens but the model's embedding has only 100 rows")
