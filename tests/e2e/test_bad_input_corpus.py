"""A corpus of malformed inputs through the real `tunesmith` console script (a subprocess importing
this checkout): each ends in one line on stderr, no traceback, the documented exit code (2 for bad
input, 1 for an unwritable output), and leaves every pre-existing file byte-identical.

One module-scoped world holds the inputs and the outputs the cases must not touch: a finished
adapter run (`run/`), copies of it broken in one way each, model dirs whose weights do not cover the
model, and the bad data files with a config each. The whole world is hashed before and after every
case. Most cases fail in validation, before torch is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import write_config, write_qa_jsonl

ROOT = Path(__file__).resolve().parents[2]
EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit
LONG = "9" * 5000  # over Python's 4300-digit limit for int()
SURROGATE = "\\ud800"  # a JSON escape of an unpaired surrogate


class _Evil:
    """Pickled into an optimizer.pt: a global that weights_only loading must refuse."""


def snapshot(path: Path) -> dict:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


def _jsonl(record: dict) -> str:
    return json.dumps(record) + "\n"


# bad data files: name → text; each gets a config `cfg-<name>.yaml` training into run/
DATA = {
    "nested.jsonl": '{"prompt": "a", "completion": ' + DEEP + "}\n",
    "nested.json": DEEP,
    "nested_obj.json": '{"data": ' + DEEP + "}",
    "longint.jsonl": '{"prompt": "a", "completion": "b", "n": ' + LONG + "}\n",
    "longint.json": '[{"prompt": "a", "completion": "b", "n": ' + LONG + "}]",
    "surrogate_alpaca.jsonl": '{"instruction": "a", "output": "b' + SURROGATE + '"}\n',
    "surrogate_messages.jsonl": '{"messages": [{"role": "user", "content": "' + SURROGATE + '"}, '
    '{"role": "assistant", "content": "b"}]}\n',
    "surrogate_sharegpt.json": '[{"conversations": [{"from": "human", "value": "a"}, '
    '{"from": "gpt", "value": "x' + SURROGATE + '"}]}]',
    "surrogate_pc.jsonl": '{"prompt": "' + SURROGATE + '", "completion": "b"}\n',
    "surrogate_text.jsonl": '{"text": "lone ' + SURROGATE + ' here"}\n',
    "surrogate_system.jsonl": '{"instruction": "a", "output": "b", "system": "' + SURROGATE + '"}\n',
    "surrogate_parts.jsonl": '{"messages": [{"role": "user", "content": [{"type": "text", "text": "'
    + SURROGATE
    + '"}]}, {"role": "assistant", "content": "b"}]}\n',
    "nested_cell.csv": 'messages\n"' + "[" * 50_000 + '"\n',
    "longint_second_line.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": ' + LONG + "}\n",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Everything the cases read, and the outputs they must leave alone."""
    w = tmp_path_factory.mktemp("world")
    home = tmp_path_factory.mktemp("home")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TUNESMITH_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TUNESMITH_BF16_UNITS": "0",
        "OMP_NUM_THREADS": "1",
    }
    qa = write_qa_jsonl(w / "qa.jsonl", n=8)
    cfg = write_config(w / "cfg.yaml", tiny_model_dir, qa, w / "run", train={"max_steps": 2})
    done = subprocess.run([EXE, "train", str(cfg), "--force"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = w / "run"
    shutil.copytree(tiny_model_dir, w / "model")
    [step] = sorted((run / "checkpoints").iterdir())

    def copy_run(name: str) -> Path:
        """A copy of the run whose saved config names the copy as its output dir, so it resumes."""
        copy = Path(shutil.copytree(run, w / name))
        saved = yaml.safe_load((copy / "tunesmith.yaml").read_text())
        saved["train"]["output_dir"] = str(copy)
        (copy / "tunesmith.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        return copy

    (copy_run("run_badyaml") / "tunesmith.yaml").write_bytes(b"model:\n  name: [unclosed\n\x00\xff garbage")
    (copy_run("run_dupyaml") / "tunesmith.yaml").write_text("model:\n  name: a\nmodel:\n  name: b\n")
    pickled = copy_run("run_bin")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    (copy_run("run_noweights") / "adapter_model.safetensors").unlink()
    garbage = copy_run("run_garbage_opt")
    (garbage / "checkpoints" / step.name / "optimizer.pt").write_bytes(b"\x80\x04not a zip archive at all")
    # a torch zip whose pickle holds a global that weights_only refuses (UnpicklingError)
    import torch

    unpickle = copy_run("run_unpickling_opt")
    torch.save({"optimizer": _Evil()}, unpickle / "checkpoints" / step.name / "optimizer.pt")
    from tunesmith.io import write_manifest

    for run in (garbage, unpickle):  # a manifest that vouches for the bad file: loading itself must refuse it
        write_manifest(run / "checkpoints" / step.name)

    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_model_dir / "model.safetensors")
    for name, kept in (("model_none", {"unrelated": torch.zeros(2)}), ("model_part", dict(list(weights.items())[:3]))):
        target = Path(shutil.copytree(tiny_model_dir, w / name))
        save_file(kept, target / "model.safetensors")
        write_config(w / f"cfg-{name}.yaml", target, qa, w / f"out-{name}")

    for name, text in DATA.items():
        (w / name).write_text(text, encoding="utf-8")
        write_config(w / f"cfg-{name}.yaml", tiny_model_dir, w / name, run, train={"max_steps": 2})
    # YAML files that are themselves the bad input
    base = yaml.safe_load(cfg.read_text())
    (w / "dup_section.yaml").write_text(cfg.read_text() + "train:\n  lr: 1.0\n")
    (w / "dup_key.yaml").write_text(cfg.read_text().replace("  lr: 0.01\n", "  lr: 0.01\n  lr: 0.02\n"))
    (w / "longint.yaml").write_text(cfg.read_text().replace("  max_steps: 2\n", f"  max_steps: {LONG}\n"))
    (w / "deep.yaml").write_text("model: " + "[" * 20_000 + "]" * 20_000 + "\n")
    (w / "nan.yaml").write_text(cfg.read_text().replace("  lr: 0.01\n", "  lr: .nan\n"))
    (w / "bigseed.yaml").write_text(cfg.read_text() + "  seed: 18446744073709551616\n")
    # relative data path: present in the current directory (w), absent beside the YAML (w/sub)
    (w / "sub").mkdir()
    relative = {**base, "data": {**base["data"], "train": ["qa.jsonl"]}}
    (w / "sub" / "relative.yaml").write_text(yaml.safe_dump(relative))
    (w / "prompts_surrogate.jsonl").write_text('{"prompt": "' + SURROGATE + '"}\n')
    (w / "prompts_nested.jsonl").write_text('{"prompt": ' + DEEP + "}\n")
    (w / "prompts_longint.jsonl").write_text('{"prompt": "a", "n": ' + LONG + "}\n")
    return w, env, step.name


def case(*argv, code=2, needles=(), sys_fs=False):
    return {"argv": argv, "code": code, "needles": needles, "sys_fs": sys_fs}


RUN = "{w}/run"
CFG = "{w}/cfg.yaml"
CASES = {
    # config values: non-finite numbers, out-of-range integers, unknown choices, devices
    "lr_nan": case("train", CFG, "train.lr=nan", needles=("train.lr", "finite")),
    "lr_dot_nan": case("train", CFG, "train.lr=.nan", needles=("train.lr", "finite")),
    "lr_inf": case("train", CFG, "train.lr=inf", needles=("train.lr", "finite")),
    "epochs_inf": case("train", CFG, "train.epochs=inf", needles=("train.epochs", "finite")),
    "epochs_huge": case("train", CFG, "train.epochs=1e400", needles=("train.epochs", "finite")),
    "alpha_inf": case("train", CFG, "adapter.alpha=inf", needles=("adapter.alpha", "finite")),
    "alpha_neg_inf": case("train", CFG, "adapter.alpha=-.inf", needles=("adapter.alpha", "finite")),
    "max_grad_norm_nan": case("train", CFG, "train.max_grad_norm=nan", needles=("train.max_grad_norm", "finite")),
    "dropout_nan": case("train", CFG, "adapter.dropout=nan", needles=("adapter.dropout", "finite")),
    "warmup_ratio_nan": case("train", CFG, "train.warmup_ratio=nan", needles=("train.warmup_ratio", "finite")),
    "weight_decay_inf": case("train", CFG, "train.weight_decay=inf", needles=("train.weight_decay", "finite")),
    "betas_nan": case("train", CFG, "train.betas=[nan, 0.9]", needles=("train.betas", "finite")),
    "timeout_inf": case("train", CFG, "train.dist_timeout_s=inf", needles=("train.dist_timeout_s", "finite")),
    "pretrain_lr_nan": case("train", CFG, "pretrain.lr=nan", needles=("pretrain.lr", "finite")),
    "seed_over_64_bits": case("train", CFG, "train.seed=18446744073709551616", needles=("train.seed", "integer")),
    "steps_float_huge": case("train", CFG, "train.max_steps=1e300", needles=("train.max_steps", "integer")),
    "seed_5000_digits": case("train", CFG, f"train.seed={LONG}", needles=("override", "Exceeds the limit")),
    "attn_bogus": case("train", CFG, "model.attn_implementation=bogus", needles=("model.attn_implementation",)),
    "attn_flash": case(
        "train", CFG, "model.attn_implementation=flash_attention_2", needles=("model.attn_implementation", "sdpa")
    ),
    "device_mps": case("train", CFG, "train.device=mps", needles=("train.device", "mps", "no Apple GPU")),
    "device_cuda_index": case("train", CFG, "train.device=cuda:7", needles=("train.device", "cuda:7")),
    "device_mps_index": case("train", CFG, "train.device=mps:1", needles=("train.device", "mps:1")),
    "system_prompt_surrogate": case("train", CFG, 'data.system_prompt="\\ud800"', needles=("data.system_prompt",)),
    "override_dup_key": case("train", CFG, "train.betas={{a: 1, a: 2}}", needles=("given twice",)),
    # YAML files
    "yaml_dup_section": case("train", "{w}/dup_section.yaml", needles=("dup_section.yaml:", "'train' is given twice")),
    "yaml_dup_key": case("train", "{w}/dup_key.yaml", needles=("dup_key.yaml:", "'lr' is given twice")),
    "yaml_5000_digits": case("train", "{w}/longint.yaml", needles=("longint.yaml", "Exceeds the limit")),
    "yaml_deep": case("train", "{w}/deep.yaml", needles=("deep.yaml",)),
    "yaml_nan": case("train", "{w}/nan.yaml", needles=("train.lr", "finite")),
    "yaml_seed_over_64_bits": case("train", "{w}/bigseed.yaml", needles=("train.seed", "integer")),
    "yaml_relative_path_beside_yaml_only": case(
        "train", "{w}/sub/relative.yaml", needles=("sub/qa.jsonl", "data file not found")
    ),
    # data files read by train (through the data check, before any model)
    **{f"train_{name}": case("train", f"{{w}}/cfg-{name}.yaml", needles=(f"{name}:",)) for name in sorted(DATA)},
    # data check: the same readers, and its --json output
    "data_check_nested": case(
        "data", "check", "{w}/nested.jsonl", "--model", "{m}", needles=("nested.jsonl:1", "nested too deeply")
    ),
    "data_check_surrogate": case(
        "data", "check", "{w}/surrogate_pc.jsonl", "--model", "{m}", needles=("surrogate_pc.jsonl:1", "surrogate")
    ),
    "data_check_json_missing_folder": case(
        "data", "check", "{w}/qa.jsonl", "--json", "{w}/no-such-dir/report.json", needles=("--json", "does not exist")
    ),
    "data_check_json_is_a_folder": case("data", "check", "{w}/qa.jsonl", "--json", RUN, needles=("--json", "folder")),
    # generate / chat flags and prompt files: all before the model loads
    "generate_batch_size_0": case("generate", RUN, "--prompt", "hi", "--batch-size", "0", needles=("--batch-size",)),
    "generate_batch_size_neg": case("generate", RUN, "--prompt", "hi", "--batch-size", "-3", needles=("--batch-size",)),
    "generate_top_p_5": case("generate", RUN, "--prompt", "hi", "--top-p", "5", needles=("--top-p",)),
    "generate_top_p_0": case("generate", RUN, "--prompt", "hi", "--top-p", "0", needles=("--top-p",)),
    "generate_top_p_nan": case("generate", RUN, "--prompt", "hi", "--top-p", "nan", needles=("--top-p",)),
    "generate_temperature_nan": case("generate", RUN, "--prompt", "hi", "--temperature", "nan", needles=("--temp",)),
    "generate_temperature_inf": case("generate", RUN, "--prompt", "hi", "--temperature", "inf", needles=("--temp",)),
    "generate_out_missing_folder": case(
        "generate", RUN, "--prompt", "hi", "--out", "{w}/missing/out.jsonl", needles=("--out", "does not exist")
    ),
    "generate_out_is_run_dir": case("generate", RUN, "--prompt", "hi", "--out", RUN, needles=("--out", "exists")),
    "generate_out_existing_file": case(
        "generate", RUN, "--prompt", "hi", "--out", "{w}/run/run.json", needles=("--out", "already exists")
    ),
    "generate_prompt_undecodable": case("generate", RUN, "--prompt", b"caf\xe9", needles=("--prompt", "UTF-8")),
    "generate_file_surrogate": case(
        "generate", RUN, "--file", "{w}/prompts_surrogate.jsonl", needles=("prompts_surrogate.jsonl:1",)
    ),
    "generate_file_nested": case(
        "generate", RUN, "--file", "{w}/prompts_nested.jsonl", needles=("prompts_nested.jsonl:1", "nested")
    ),
    "generate_file_longint": case(
        "generate", RUN, "--file", "{w}/prompts_longint.jsonl", needles=("prompts_longint.jsonl:1", "too long")
    ),
    "generate_device_mps": case("generate", RUN, "--prompt", "hi", "--device", "mps", needles=("--device", "mps")),
    "chat_top_p_5": case("chat", RUN, "--top-p", "5", needles=("--top-p",)),
    # run dirs and weights: corrupt config, pickled adapter, missing adapter, partial base weights
    "generate_run_corrupt_yaml": case("generate", "{w}/run_badyaml", "--prompt", "hi", needles=("tunesmith.yaml",)),
    "generate_run_dup_yaml": case("generate", "{w}/run_dupyaml", "--prompt", "hi", needles=("given twice",)),
    "generate_pickled_adapter": case(
        "generate", "{w}/run_bin", "--prompt", "hi", needles=("adapter_model.bin", "adapter_model.safetensors")
    ),
    "generate_adapter_without_weights": case(
        "generate", "{w}/run_noweights", "--prompt", "hi", needles=("adapter_model.safetensors",)
    ),
    "train_base_weights_none": case(
        "train", "{w}/cfg-model_none.yaml", "--force", needles=("model_none", "lack", "model.embed_tokens.weight")
    ),
    "generate_base_weights_part": case("generate", "{w}/model_part", "--prompt", "hi", needles=("lack",)),
    # resume from a checkpoint whose optimizer.pt is garbage, a raw pickle, or a torch file with a foreign global
    **{
        f"resume_{kind}_optimizer": case(
            "train", CFG, f"train.output_dir={{w}}/run_{kind}_opt", "--resume", "--force", needles=("optimizer.pt",)
        )
        for kind in ("garbage", "unpickling")
    },
    # environment faults: exit 1, one line naming the path
    "train_output_on_sys": case(
        "train", CFG, "train.output_dir=/sys/tunesmith-out", code=1, needles=("/sys",), sys_fs=1
    ),
    "generate_out_on_sys": case(
        "generate", RUN, "--prompt", "hi", "--out", "/sys/out.jsonl", code=1, needles=("/sys",), sys_fs=True
    ),
}


def _argv(parts, w: Path) -> list:
    return [p if isinstance(p, bytes) else p.format(w=w, m=w / "model") for p in parts]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(world, name):
    w, env, _ = world
    spec = CASES[name]
    if spec["sys_fs"] and (not os.path.isdir("/sys") or os.statvfs("/sys").f_blocks != 0):
        pytest.skip("needs /sys as a filesystem that holds no files (Linux)")
    before = snapshot(w)
    proc = subprocess.run(
        [EXE, *_argv(spec["argv"], w)], cwd=w, env=env, capture_output=True, timeout=300, stdin=subprocess.DEVNULL
    )
    err = proc.stderr.decode("utf-8", "replace").strip()
    assert proc.returncode == spec["code"], err[-3000:]
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith("tunesmith: error: "), err
    for needle in spec["needles"]:
        assert needle in err, err
    assert snapshot(w) == before


def test_no_verb_is_a_short_usage():
    proc = subprocess.run(
        [EXE], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 5 and lines[0].startswith("usage: tunesmith VERB"), proc.stderr
    assert "train" in proc.stderr and "Traceback" not in proc.stderr and not proc.stdout


def test_corpus_size():
    assert len(CASES) >= 60
