"""Replay held to the base model (`data.replay_loss: kl`): the soft-target loss and its gradients
against autograd, replay samples pointing at the base's top-k rows, no gradient while the model
still is the base, and a kill-and-resume that trains against the same targets bit for bit."""

import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tunesmith.train.loss as loss_mod
from tests.tiny import make_family_model, write_config, write_qa_jsonl
from tests.unit.test_memory_savers import assert_gradients_of_ref
from tests.unit.test_replay import replay_file
from tunesmith.config import load_config
from tunesmith.data.packing import collate, unpacked
from tunesmith.data.sft import IGNORE, Sample
from tunesmith.train import replay_kl
from tunesmith.train.loss import SOFT, LinearCrossEntropy, LossModule, row_targets, soft_ce_sum


def _table(n, k, vocab, gen):
    p = torch.rand(n, k, generator=gen, dtype=torch.float64)
    p = p / p.sum(1, keepdim=True) * torch.rand(n, 1, generator=gen, dtype=torch.float64).clamp_min(0.3)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)]).to(torch.int32)
    return ids, p.float(), (1.0 - p.sum(1)).float()


@pytest.mark.parametrize("want_w", [False, True])
def test_soft_targets_give_autograds_loss_and_gradients(monkeypatch, want_w):
    monkeypatch.setattr(loss_mod, "CHUNK", 3)  # 7 rows → chunks of 3, 3, 1
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=gen, requires_grad=want_w)
    table = _table(4, 3, 11, gen)
    targets = torch.tensor([4, SOFT - 2, 0, SOFT, SOFT - 3, 10, SOFT - 1])  # hard and soft rows mixed
    rows = row_targets(targets, table)
    assert rows[0][0].tolist() == [4, 4, 4] and rows[1][0].tolist() == [1.0, 0.0, 0.0]
    loss = LinearCrossEntropy.apply(hidden, weight, targets, None, rows)
    logits = hidden @ weight.T
    ref = soft_ce_sum(logits, tuple(x.double() if x.is_floating_point() else x.long() for x in rows))
    hard = [0, 2, 5]  # a hard row's loss is plain cross-entropy
    torch.testing.assert_close(
        soft_ce_sum(logits[hard], tuple(x[hard].long() if i == 0 else x[hard].double() for i, x in enumerate(rows))),
        F.cross_entropy(logits[hard], targets[hard], reduction="sum"),
    )
    torch.testing.assert_close(loss, ref.float())
    (loss * 2.5).backward()
    assert_gradients_of_ref(ref, hidden, weight, want_w)


def test_marked_replay_samples_point_at_their_rows():
    task = Sample([1, 2, 3], [IGNORE, 2, 3])
    a, b = Sample([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), Sample([9, 6], [IGNORE, 6])
    samples, unique = replay_kl.mark([task, a, b, a], 3)
    assert samples[0] == task  # task samples keep their labels
    assert samples[1].labels == [IGNORE, IGNORE, SOFT, SOFT - 1] and samples[2].labels == [IGNORE, SOFT - 2]
    assert samples[3].labels == samples[1].labels  # a sample drawn twice: the same rows
    assert unique == [a, b] and replay_kl.mark([task], 0) == ([task], [])


def _run(model, tok, tmp_path):
    """What `replay_kl.targets` reads of the training loop's `Run`."""
    return SimpleNamespace(
        model=model,
        device=torch.device("cpu"),
        tokenizer=tok,
        autocast=nullcontext,
        make_batch=lambda rows: collate(rows, tok.pad_token_id),
        out=SimpleNamespace(path=tmp_path),
        dist=SimpleNamespace(main=True),
    )


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2's soft-capped head: the full-logits path
def test_at_the_base_the_replay_loss_has_no_gradient(tmp_path, tiny_tokenizer, family):
    tok = tiny_tokenizer
    model = make_family_model(family, len(tok))
    assert loss_mod.plain_head(model) == (family == "llama")
    texts = ["the quick brown fox jumps", "a dog sleeps under the moon", "the moon is bright"]
    replay = []
    for text in texts:
        ids = tok(text)["input_ids"]
        replay.append(Sample(ids, [IGNORE] + ids[1:]))
    run = _run(model, tok, tmp_path)
    samples, unique = replay_kl.mark(replay, len(replay))
    soft = replay_kl.targets(run, unique, None)
    assert (tmp_path / replay_kl.FILE).is_file() and soft[0].shape == (sum(len(s.input_ids) - 1 for s in replay), 16)
    batch = collate(unpacked(samples, tok.pad_token_id), tok.pad_token_id)
    trainer = LossModule(model)
    trainer.soft = soft
    model.train()
    loss, n = trainer(**batch)
    loss.backward()
    quiet = max(p.grad.abs().max() for p in model.parameters() if p.grad is not None)
    assert n == soft[0].shape[0] and quiet < 1e-5, quiet  # KL(base ‖ base) = 0: nothing to learn
    model.zero_grad()
    trainer.soft = None
    hard = collate(unpacked(replay, tok.pad_token_id), tok.pad_token_id)
    trainer(**hard)[0].backward()  # the same samples as plain cross-entropy do move it
    assert max(p.grad.abs().max() for p in model.parameters() if p.grad is not None) > 1e3 * quiet
    # its loss is the base's entropy over the k + 1 buckets
    ids, p, rest = soft
    entropy = -(p * p.clamp_min(1e-30).log()).sum() - (rest * rest.clamp_min(1e-30).log()).sum()
    torch.testing.assert_close(loss.detach(), entropy, rtol=1e-4, atol=1e-4)


def test_resume_with_kl_replay_is_bit_exact(tmp_path, tiny_model_dir):
    from tunesmith.train.loop import run_training

    qa = write_qa_jsonl(tmp_path / "qa.jsonl", n=24)
    pool = replay_file(tmp_path / "general.jsonl", 5)
    settings = dict(
        adapter={"method": "lora", "rank": 4, "alpha": 8, "dropout": 0.05},
        data={"max_length": 48, "replay": 0.3, "replay_source": str(pool), "replay_loss": "kl"},
        train={"max_steps": 8, "save_every": 4, "keep_last": 4, "lr": 1e-2, "warmup_steps": 0, "progress": False},
    )
    run_training(load_config(write_config(tmp_path / "ref.yaml", tiny_model_dir, qa, tmp_path / "ref", **settings)))
    targets = load_file(tmp_path / "ref" / replay_kl.FILE)
    assert targets["ids"].shape[1] == replay_kl.K and float(targets["rest"].min()) >= 0.0
    halfway = tmp_path / "ref" / "checkpoints" / "step-00000004"
    shutil.rmtree(Path(load_config(tmp_path / "ref.yaml").data.cache_dir or tmp_path / "home" / "data-cache"))
    settings["train"]["resume"] = str(halfway)  # into another dir: the targets come from the checkpoint's run
    run_training(load_config(write_config(tmp_path / "cut.yaml", tiny_model_dir, qa, tmp_path / "cut", **settings)))
    a = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 5
    assert (tmp_path / "cut" / replay_kl.FILE).read_bytes() == (tmp_path / "ref" / replay_kl.FILE).read_bytes()

    settings["data"]["replay_loss"] = "ce"  # the soft targets change what is learned
    settings["train"].pop("resume")
    run_training(load_config(write_config(tmp_path / "ce.yaml", tiny_model_dir, qa, tmp_path / "ce", **settings)))
    c = load_file(tmp_path / "ce" / "adapter_model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_kl_replay_resume_without_its_targets_is_one_line(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main

    qa = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    pool = replay_file(tmp_path / "general.jsonl", 4)
    data = {"max_length": 48, "replay": 0.3, "replay_source": str(pool), "replay_loss": "kl"}
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, qa, tmp_path / "out", data=data)
    assert main(["train", str(cfg), "train.max_steps=2", "train.save_every=1", "train.progress=false"]) == 0
    (tmp_path / "out" / replay_kl.FILE).unlink()
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert main(["train", str(cfg), "train.max_steps=4", "--resume"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("tunesmith: warning")]
    assert len(err) == 1 and "replay targets" in err[0] and "Traceback" not in err[0], err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_replay_loss_is_checked_and_kl_without_replay_trains_plainly(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main

    qa = write_qa_jsonl(tmp_path / "qa.jsonl", n=10)
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, qa, tmp_path / "out")
    assert main(["train", str(cfg), "data.replay=0.2", "data.replay_loss=kld"]) == 2
    err = capsys.readouterr().err
    assert "config key data.replay_loss" in err and "kld" in err and not (tmp_path / "out").exists()
    # replay off (e.g. `tunesmith quickstart data.replay=0`): kl has nothing to act on, and nothing is written for it
    assert main(["train", str(cfg), "data.replay=0", "data.replay_loss=kl", "train.max_steps=1"]) == 0
    assert (tmp_path / "out" / "run.json").is_file() and not (tmp_path / "out" / replay_kl.FILE).exists()
