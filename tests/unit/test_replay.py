"""Replay against forgetting (`data.replay`): the share of replay samples in the training stream,
exact resume with replay on, the self-distillation cache, and bad replay settings refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import write_config, write_qa_jsonl
from tunesmith.config import load_config
from tunesmith.data import replay
from tunesmith.data.sft import build_datasets, ensure_chat_template
from tunesmith.models import load_tokenizer
from tunesmith.train.distributed import Dist
from tunesmith.train.rows import RowStream, make_rows

MARK = "capital"  # a word of the tiny tokenizer's corpus, never in write_qa_jsonl's records


def replay_file(path: Path, n: int) -> Path:
    rows = [{"instruction": f"Where is place {i}?", "output": f"It is in {MARK} {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def marked(tok, sample) -> bool:
    return MARK in tok.decode(sample.input_ids)


def build(tmp_path, model_dir, data: dict, name="c", seed=42):
    qa = write_qa_jsonl(tmp_path / "qa.jsonl", n=30)
    cfg = load_config(write_config(tmp_path / f"{name}.yaml", model_dir, qa, tmp_path / name, data=data))
    tok = load_tokenizer(str(model_dir))
    ensure_chat_template(tok, None)
    return tok, *build_datasets(cfg.data, tok, seed, tmp_path / "cache")


def test_replay_samples_are_the_configured_share_of_the_stream(tmp_path, tiny_model_dir):
    pool = replay_file(tmp_path / "general.jsonl", 4)  # smaller than the 10 needed: whole passes, repeated
    tok, train, val, stats = build(
        tmp_path, tiny_model_dir, data={"replay": 0.25, "replay_source": str(pool), "val_fraction": 0.2}
    )
    n_task = 24  # 30 examples, 6 held out
    assert stats.n_replay == round(0.25 / 0.75 * n_task) == 8
    assert sum(marked(tok, s) for s in train) == 8 and len(train) == n_task + 8
    assert not any(marked(tok, s) for s in val)  # validation stays task data
    texts = [tok.decode(s.input_ids) for s in train if marked(tok, s)]
    assert sorted(texts.count(t) for t in set(texts)) == [2, 2, 2, 2]  # every pool sample before any repeat
    # through packing and one epoch of the shuffled row order: the same 8 marked samples, at the share
    rows = make_rows(train, True, 64, tok.pad_token_id)
    stream = RowStream(len(rows), 1, 42, Dist())
    seen = [rows[i] for _ in range(len(rows)) for i in stream.next()]
    assert sorted(map(id, seen)) == sorted(map(id, rows))  # one epoch: every row once
    assert sum(tok.decode(row.input_ids[: row.n_real]).count(MARK) for row in seen) == 8
    # the draw is a function of the seed; a rebuild without the cache gives the same samples
    shutil.rmtree(tmp_path / "cache")
    _, again, _, _ = build(
        tmp_path, tiny_model_dir, data={"replay": 0.25, "replay_source": str(pool), "val_fraction": 0.2}
    )
    assert [s.input_ids for s in again] == [s.input_ids for s in train]
    _, other, _, _ = build(
        tmp_path, tiny_model_dir, seed=7, data={"replay": 0.25, "replay_source": str(pool), "val_fraction": 0.2}
    )
    assert sum(marked(tok, s) for s in other) == 8


def test_resume_with_replay_is_bit_exact(tmp_path, tiny_model_dir):
    from tunesmith.train.loop import run_training

    qa = write_qa_jsonl(tmp_path / "qa.jsonl", n=24)
    pool = replay_file(tmp_path / "general.jsonl", 5)
    settings = dict(
        adapter={"method": "full"},
        data={"max_length": 48, "replay": 0.3, "replay_source": str(pool)},
        train={"max_steps": 8, "save_every": 4, "keep_last": 4, "lr": 1e-2, "warmup_steps": 0, "progress": False},
    )
    run_training(load_config(write_config(tmp_path / "ref.yaml", tiny_model_dir, qa, tmp_path / "ref", **settings)))
    halfway = tmp_path / "ref" / "checkpoints" / "step-00000004"
    assert halfway.is_dir()
    shutil.rmtree(Path(load_config(tmp_path / "ref.yaml").data.cache_dir or tmp_path / "home" / "data-cache"))
    settings["train"]["resume"] = str(halfway)  # the replay samples are drawn again, from scratch
    run_training(load_config(write_config(tmp_path / "cut.yaml", tiny_model_dir, qa, tmp_path / "cut", **settings)))
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[0])["step"] == 5  # it did resume halfway


def answering_model(src: Path, dst: Path) -> Path:
    """The tiny model made to answer "qui" and stop: its output hangs on one hidden unit, which the
    prompt's last token leaves positive ("qui") and "qui" itself makes negative (end of turn)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.infer.generate import stop_ids

    model = AutoModelForCausalLM.from_pretrained(src)
    tok = load_tokenizer(str(src))
    word, stop = tok("quick", add_special_tokens=False)["input_ids"][0], stop_ids(tok)[-1]
    with torch.no_grad():
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
        model.model.norm.weight.zero_()
        model.model.norm.weight[2] = 1.0
        model.lm_head.weight[word, 2], model.lm_head.weight[stop, 2] = 50.0, -50.0
        model.model.embed_tokens.weight[word, 2] = -100.0
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def test_self_distillation_answers_once_and_reuses_the_cache(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from tunesmith.infer.replay import prepare_replay

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say a word.", "Name a colour.", "Hi?")))
    monkeypatch.setattr(replay, "PROMPTS", prompts)
    monkeypatch.setitem(replay.GENERATION, "max_new_tokens", 6)
    model_dir = answering_model(tiny_model_dir, tmp_path / "answering")
    qa = write_qa_jsonl(tmp_path / "qa.jsonl", n=20)
    cfg = load_config(write_config(tmp_path / "c.yaml", model_dir, qa, tmp_path / "out", data={"replay": 0.2}))
    assert cfg.data.replay_source == "self"

    path, generated = prepare_replay(cfg, quiet=True)
    assert generated and path.is_file()
    records = json.loads(path.read_text())["records"]
    assert len(records) == 3 and all(r["messages"][1]["content"].strip() for r in records)
    stamp = path.stat().st_mtime_ns
    again, generated = prepare_replay(cfg, quiet=True)
    assert again == path and not generated and path.stat().st_mtime_ns == stamp  # reused, not regenerated

    tok = load_tokenizer(str(model_dir))
    ensure_chat_template(tok, None)
    train, _, stats = build_datasets(cfg.data, tok, 42, tmp_path / "home" / "data-cache")
    assert stats.n_replay == 5 and len(train) == 25  # round(0.2 / 0.8 * 20)
    answers = {r["messages"][1]["content"] for r in records}
    assert sum(any(a in tok.decode(s.input_ids) for a in answers) for s in train[-5:]) == 5

    from tunesmith.cli import main  # the whole verb reuses the answers and counts the replay samples

    assert main(["train", str(tmp_path / "c.yaml"), "train.max_steps=2"]) == 0
    assert "+ 5 replay samples" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == stamp and (tmp_path / "out" / "run.json").is_file()

    cfg.data.system_prompt = "Be brief."  # the prompts render differently: a new set of answers
    other, generated = prepare_replay(cfg, quiet=True)
    assert generated and other != path


def test_cut_off_answers_end_at_a_whole_sentence_and_empty_ones_are_left_out(tmp_path):
    answers = ["one", " ", "three, cut", "First. Then (a list):\n1. Done!\n2. Not do"]
    kept = replay.write_answers(tmp_path / "a.json", ["p1", "p2", "p3", "p4"], answers, "m", [True, True, False, False])
    contents = [r["messages"][1]["content"] for r in replay.read_answers(tmp_path / "a.json")]
    assert kept == 2 and contents == ["one", "First. Then (a list):\n1. Done!"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.replay=1.0", "config key data.replay: expected a fraction 0 <= value < 1"),
        ("data.replay=-0.1", "config key data.replay: expected a fraction"),
        ("data.replay_source={tmp}/missing.jsonl", "missing.jsonl: data file not found"),
        ("data.replay_source={tmp}/general.xml", "unknown data file type .xml"),
        ("data.replay_source={tmp}/empty.jsonl", "empty.jsonl: no examples"),
    ],
)
def test_bad_replay_settings_are_one_line_and_write_nothing(tmp_path, tiny_model_dir, capsys, override, needle):
    from tunesmith.cli import main

    (tmp_path / "general.xml").write_text("<a/>")
    (tmp_path / "empty.jsonl").write_text("")
    qa = write_qa_jsonl(tmp_path / "qa.jsonl", n=10)
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, qa, tmp_path / "out", data={"replay": 0.2})
    assert main(["train", str(cfg), override.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_self_replay_with_no_answers_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from tunesmith.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say a word."}) + "\n")
    monkeypatch.setattr(replay, "PROMPTS", prompts)
    monkeypatch.setitem(replay.GENERATION, "max_new_tokens", 4)
    qa = write_qa_jsonl(tmp_path / "qa.jsonl", n=10)  # the raw tiny model answers with special tokens only
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, qa, tmp_path / "out", data={"replay": 0.2})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "answered none of the replay prompts" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_replay_source_paths_resolve_and_self_stays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "self").mkdir()  # even beside a folder of that name, `self` means self-distillation
    assert load_config(None, ["data.replay=0.1"]).data.replay_source == "self"
    assert load_config(None, ["data.replay_source=self"]).data.replay_source == "self"
    cfg = load_config(None, ["data.replay=0.1", "data.replay_source=general.jsonl"])
    assert cfg.data.replay_source == str(tmp_path / "general.jsonl")
    assert load_config(None, ["data.replay=0"]).data.replay == 0.0  # 0: off
