"""``run translation`` end to end on a few hundred Multi30k pairs: files, metric ranges,
determinism, resume, BPE round trip, batching, decoding, option errors, and the fused linear +
EL path (same loss, gradients and statistics as the materialised logits). Skipped without
``tokenizers``, ``sacrebleu`` or the data."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from encouraging_loss import FocalLoss
from encouraging_loss.lab.data import DatasetNotFoundError
from encouraging_loss.lab.experiment import Interrupted, Options, run_experiment
from encouraging_loss.lab.io import run_slug
from encouraging_loss.lab.losses import build_criterion, parse_loss

from .helpers import (
    SHARED_DATA,
    first_epoch_checkpoint,
    load_results,
    shared_dataset,
    torch_globals_restored,
)

pytest.importorskip("tokenizers")
pytest.importorskip("sacrebleu")

from encouraging_loss.lab.tasks.translation import (  # noqa: E402
    TASK,
    data,
    decoding,
    recipes,
    steps,
)
from encouraging_loss.lab.tasks.translation.model import Seq2SeqTransformer  # noqa: E402

LS_EL = "ls-el:0.1,log_end=0.5"


def _run(out, extra: dict | None = None, **overrides) -> dict:
    """``run translation`` on 256/24/24 staged pairs (``overrides``: :class:`Options` fields)."""
    shared_dataset("multi30k")
    settings = dict(
        losses=f"ls-ce:0.1,{LS_EL}",
        seeds=1,
        data_root=str(SHARED_DATA),
        out=str(out),
        train_size=256,
        test_size=24,
        epochs=2,
        batch_size=32,
        progress=False,
        jobs=1,  # in this process, where the tiny preset is patched in
    )
    settings.update(overrides)
    options = Options(task="translation", extra={"val_size": 24, **(extra or {})}, **settings)
    with torch_globals_restored():
        return run_experiment(options)


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    """A 1+1-layer, 32-wide model and a 400-token vocabulary: the pipeline, in seconds."""
    with pytest.MonkeyPatch.context() as patch:
        quick = recipes.PRESETS["quick"]
        small = replace(
            quick,
            d_model=32,
            heads=2,
            encoder_layers=1,
            decoder_layers=1,
            feedforward=64,
            vocab_size=400,
            max_tokens=40,
        )
        patch.setitem(recipes.PRESETS, "quick", small)
        yield small


@pytest.fixture(scope="module")
def tiny_mt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt") / "out"
    assert _run(out) is not None
    return out


def test_files_and_contract(tiny_mt_run):
    for name in ("results.json", "results.csv", "report.md", "tokenizer.json"):
        assert (tiny_mt_run / name).is_file(), name
    results = load_results(tiny_mt_run)
    assert results["task"] == "translation" and results["dataset"] == "multi30k"
    assert [r["loss"] for r in results["runs"]] == ["ls-ce:0.1", LS_EL]
    config = results["config"]
    assert (config["data"]["n_train"], config["data"]["n_val"], config["data"]["n_test"]) == (
        256,
        24,
        24,
    )
    assert config["bleu_signature"].startswith("nrefs:1|")
    for run in results["runs"]:
        assert run["bleu_signature"] == config["bleu_signature"]
        lines = (tiny_mt_run / "translations" / f"{run_slug(run['loss'], 0)}.beam5.en").read_text()
        assert lines.count("\n") == 24
    assert not any((tiny_mt_run / "checkpoints").glob("*.pt"))
    assert len(list((tiny_mt_run / "arrays").glob("*.npz"))) == 2
    text = (tiny_mt_run / "report.md").read_text()
    assert "BLEU (beam)" in text and f"`{LS_EL}` − `ls-ce:0.1`" in text
    assert "beam 5 with length penalty α=0.6" in text


def test_metric_ranges(tiny_mt_run):
    for run in load_results(tiny_mt_run)["runs"]:
        m = run["metrics"]
        assert run["status"] == "ok" and len(run["history"]) == 2
        assert 0.0 <= m["bleu"] <= 100.0 and 0.0 <= m["bleu_greedy"] <= 100.0
        assert 0.0 <= m["token_accuracy"] <= 1.0
        assert m["ppl"] == pytest.approx(math.exp(m["test_ce"]), rel=1e-6) and m["ppl"] > 1.0
        assert m["energy_mean"] <= m["energy_true_mean"]
        for epoch in run["history"]:
            assert 0.0 <= epoch["grad_share_well_classified"] <= 1.0
            assert math.isfinite(epoch["train_ce"])
            assert epoch["val_ppl"] == pytest.approx(math.exp(epoch["val_nll"]), rel=1e-6)


def test_same_seed_same_numbers(tiny_mt_run, tmp_path):
    again = _run(tmp_path / "again", losses=LS_EL)["runs"][0]
    first = load_results(tiny_mt_run)["runs"][1]
    assert first["loss"] == again["loss"] == LS_EL
    for name in ("bleu", "bleu_greedy", "token_accuracy", "ppl"):
        assert again["metrics"][name] == pytest.approx(first["metrics"][name], rel=1e-9), name
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (
        tiny_mt_run / "tokenizer.json"
    ).read_text()


def test_tuning_picks_the_rate_on_validation_without_decoding_the_test_set(tmp_path):
    results = _run(tmp_path / "tuned", losses=LS_EL, tune="lr", tune_grid="0.0005,0.002")
    chosen = results["config"]["tuning"]["by_loss"][LS_EL]
    assert chosen["lr"] in (0.0005, 0.002) and results["runs"][0]["lr"] == chosen["lr"]
    assert "bleu" in results["runs"][0]["metrics"]
    for path in (tmp_path / "tuned" / "tuning").glob("lr=*/runs/*.json"):
        assert "bleu" not in json.loads(path.read_text(encoding="utf-8"))["metrics"]
    assert len(list((tmp_path / "tuned" / "tuning").glob("lr=*/runs/*.json"))) == 2


def test_resume_gives_the_uninterrupted_result(tiny_mt_run, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        _run(out, losses=LS_EL, stop_after_epochs=1)
    assert not (out / "results.json").exists() and any((out / "checkpoints").iterdir())
    resumed = _run(out, losses=LS_EL, resume=True)["runs"][0]
    first = load_results(tiny_mt_run)["runs"][1]
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in first["history"]], rel=1e-6
    )
    assert resumed["metrics"]["token_accuracy"] == pytest.approx(
        first["metrics"]["token_accuracy"], rel=1e-9
    )


def test_bpe_round_trip_restores_raw_text(tiny_mt_run):
    tokenizer = data.load_tokenizer(tiny_mt_run / "tokenizer.json")
    raw, _ = data.load_multi30k(SHARED_DATA)
    for sentence in raw["train"][1][:50]:
        ids = tokenizer.encode(sentence).ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


def test_epoch_batches_cover_once_and_repeat():
    lengths = torch.randint(3, 30, (103,), generator=torch.Generator().manual_seed(0))
    batches = data.epoch_batches(lengths, 10, seed=5, pool=3)
    flat = torch.cat(batches).tolist()
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)
    assert len(set(flat)) == 100
    again = data.epoch_batches(lengths, 10, seed=5, pool=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_translation_batches_for_the_trainer():
    src, tgt = _tiny_batch()
    split = data.Encoded(src, tgt, (src != data.PAD).sum(1), (tgt != data.PAD).sum(1), [], [])
    batches = steps.TranslationBatches(split, split)
    assert batches.n_train == 6
    assert [len(b) for b in batches.epoch_batches(3, seed=1)] == [3, 3]
    validation = batches.validate(_tiny_model(fit=False), 4, torch.device("cpu"))
    assert set(validation) == {"val_accuracy", "val_nll", "val_ppl"}
    assert validation["val_ppl"] == pytest.approx(math.exp(validation["val_nll"]))
    with pytest.raises(ValueError, match="train, val"):
        steps.TranslationBatches((src, tgt), split)
    with pytest.raises(ValueError, match="fused_linear"):
        steps.TranslationBatches(split, split, fused_linear="on")


def test_incremental_decoding_matches_the_full_prefix():
    torch.manual_seed(1)
    model = Seq2SeqTransformer(60, d_model=16, heads=2, feedforward=32, max_positions=40)
    model.eval()
    src = torch.randint(4, 60, (5, 9))
    src[1, 6:] = data.PAD
    memory, mask = model.encode(src)
    prefix = torch.randint(4, 60, (5, 7))
    prefix[:, 0] = data.BOS
    full = model.decode(prefix, memory, mask)
    cache = None
    for position in range(prefix.shape[1]):
        state, cache = model.decode_step(prefix[:, position], position, memory, mask, cache)
        torch.testing.assert_close(state, full[:, position], rtol=1e-4, atol=1e-5)


def test_beam_of_one_is_greedy():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(50, d_model=16, heads=2, feedforward=32, max_positions=40)
    model.eval()
    src = torch.randint(4, 50, (6, 7))
    src[0, 5:] = data.PAD
    greedy = decoding.greedy_decode(model, src)
    assert decoding.beam_search(model, src, beam=1, alpha=0.0) == greedy
    assert len(decoding.beam_search(model, src, beam=4)) == 6
    with pytest.raises(ValueError, match="beam"):
        decoding.beam_search(model, src, beam=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dataset": "wmt14"}, "dataset:"),
        ({"model": "lstm"}, "model:"),
        ({"preset": "standard"}, "preset:"),
        ({"extra": {"val_size": 5}}, "val_size:"),
        ({"extra": {"fused_linear": "yes"}}, "fused-linear:"),
    ],
)
def test_bad_options_name_the_argument(settings, message, tmp_path):
    options = Options(
        task="translation", data_root=str(tmp_path), out=str(tmp_path / "o"), **settings
    )
    with pytest.raises(ValueError, match=message):
        run_experiment(options)


def test_missing_data_is_one_line(tmp_path):
    options = Options(task="translation", data_root=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(DatasetNotFoundError) as error:
        run_experiment(options)
    assert "multi30k" in str(error.value) and "\n" not in str(error.value)


# --- fused linear + EL ---------------------------------------------------------------------


def _tiny_batch(vocab: int = 70):
    """Random source/target ids with padding: ``<s> ... </s>`` targets of different lengths."""
    generator = torch.Generator().manual_seed(3)
    src = torch.randint(4, vocab, (6, 9), generator=generator)
    src[2, 5:] = data.PAD
    tgt = torch.randint(4, vocab, (6, 8), generator=generator)
    tgt[:, 0] = data.BOS
    for row, length in enumerate((8, 5, 7, 3, 8, 6)):
        tgt[row, length - 1] = data.EOS
        tgt[row, length:] = data.PAD
    return src, tgt


def _tiny_model(
    vocab: int = 70, share_embeddings: bool = True, fit: bool = True
) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    model = Seq2SeqTransformer(
        vocab, d_model=16, heads=2, feedforward=32, share_embeddings=share_embeddings
    )
    if not share_embeddings:  # an untied projection with a bias: the fused path's bias too
        model.output = nn.Linear(16, vocab)
    if not fit:
        return model
    # Fit the batch a little, so that some tokens have p_y > 0.5 (the gradient-share statistic).
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(25):
        loss, _ = steps.teacher_forced_loss(model, nn.CrossEntropyLoss(), *_tiny_batch(vocab))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _one_step(model, criterion, fused_linear, forward=None, rows=slice(None)):
    """Loss, parameter gradients and statistics of one training step (dropout seeded)."""
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    src, tgt = _tiny_batch()
    loss, statistics = steps.teacher_forced_loss(
        model, criterion, src[rows], tgt[rows], fused_linear=fused_linear, forward=forward
    )
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, statistics()


@pytest.mark.parametrize("share_embeddings", [True, False])
@pytest.mark.parametrize("loss_name", ["ls-ce:0.1", LS_EL, "el:log_end=0.75,ramp=0.5"])
def test_fused_step_matches_materialised(loss_name, share_embeddings, monkeypatch):
    # A few rows per statistics chunk, so that the chunked statistics are tested across chunks.
    monkeypatch.setattr(steps, "STATISTICS_CHUNK_LOGITS", 7 * 70)
    model = _tiny_model(share_embeddings=share_embeddings)
    criterion = build_criterion(parse_loss(loss_name))
    if hasattr(criterion, "bonus_scale"):
        criterion.bonus_scale = 0.3  # what a bonus schedule sets mid-training
    materialised = _one_step(model, criterion, fused_linear=False)
    fused = _one_step(model, criterion, fused_linear=True)
    torch.testing.assert_close(fused[0], materialised[0], rtol=1e-6, atol=1e-6)
    assert fused[1].keys() == materialised[1].keys()
    for name, grad in materialised[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name in ("correct", "count"):  # correct tokens, tokens
        assert fused[2][name] == materialised[2][name], name
    # Some gradient from tokens with p_y > 0.5, not all of it.
    assert 0 < materialised[2]["well_norm"] < materialised[2]["total_norm"]
    assert fused[2] == pytest.approx(materialised[2], rel=1e-5)


def test_fused_step_under_bfloat16_autocast():
    """``amp``: the fused loss gets bfloat16 states and weight, as autocast's projection does."""
    model = _tiny_model(share_embeddings=False)
    criterion = build_criterion(parse_loss(LS_EL))
    both = []
    for fused_linear in (False, True):
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        loss, statistics = steps.teacher_forced_loss(
            model, criterion, *_tiny_batch(), fused_linear=fused_linear, amp=True
        )
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        both.append((loss.detach(), grads, statistics()))
    (loss, grads, statistics), (fused_loss, fused_grads, fused_statistics) = both
    assert fused_loss.dtype == torch.float32
    torch.testing.assert_close(fused_loss, loss, rtol=1e-2, atol=0.0)  # a bfloat16 scalar
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=0.05, atol=grad.abs().max() * 0.02)
    assert fused_statistics == pytest.approx(statistics, rel=1e-5)  # float32 from the chunks


def _ddp_worker(rank: int, port: int, state: dict, results: dict) -> None:
    """One of two ranks: the fused path on its half of the batch, through DDP."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _tiny_model(share_embeddings=False, fit=False)
        model.load_state_dict(state)
        wrapped = nn.parallel.DistributedDataParallel(model)
        criterion = build_criterion(parse_loss(LS_EL))
        half = slice(3 * rank, 3 * rank + 3)
        for _ in range(2):  # DDP checks at the next forward that every gradient was reduced
            _, grads, _ = _one_step(model, criterion, True, forward=wrapped, rows=half)
        results[rank] = grads
    finally:
        dist.destroy_process_group()


def test_fused_gradients_reach_ddp_hooks():
    """Untied output layer, used by the fused loss only: DDP averages its gradient too."""
    reference = _tiny_model(share_embeddings=False)
    criterion = build_criterion(parse_loss(LS_EL))
    halves = [_one_step(reference, criterion, False, rows=slice(i, i + 3))[1] for i in (0, 3)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, reference.state_dict(), results), nprocs=2, join=True)
    for name in halves[0]:
        expected = (halves[0][name] + halves[1][name]) / 2
        for rank in range(2):
            torch.testing.assert_close(
                results[rank][name], expected, rtol=1e-5, atol=1e-7, msg=f"{name} rank {rank}"
            )


def test_fused_linear_on_and_off_give_the_same_run(tiny_mt_run, tmp_path):
    out = tmp_path / "fused"
    results = _run(out, losses=LS_EL, extra={"fused_linear": "on"})
    for name in ("results.json", "results.csv", "report.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "translations" / f"{run_slug(LS_EL, 0)}.beam5.en").read_text().count("\n") == 24
    assert results["config"]["fused_linear"] == {
        "mode": "on",
        "min_vocab": recipes.FUSED_LINEAR_MIN_VOCAB,
        "losses": [LS_EL],
    }
    fused = results["runs"][0]
    materialised = load_results(tiny_mt_run)["runs"][1]  # auto: 400 tokens, below the threshold
    assert fused["fused_linear"] and not materialised["fused_linear"]
    assert fused["status"] == materialised["status"] == "ok"
    for epoch_fused, epoch_materialised in zip(
        fused["history"], materialised["history"], strict=True
    ):
        for name in ("train_loss", "train_ce", "train_accuracy", "grad_share_well_classified"):
            assert epoch_fused[name] == pytest.approx(epoch_materialised[name], rel=1e-4), name
        assert epoch_fused["val_accuracy"] == pytest.approx(
            epoch_materialised["val_accuracy"], abs=1e-3
        )
    for name in ("token_accuracy", "ppl", "margin_mean", "energy_mean"):
        assert fused["metrics"][name] == pytest.approx(materialised["metrics"][name], rel=1e-3), (
            name
        )


def test_fused_linear_auto_threshold_and_losses():
    el, focal = parse_loss(LS_EL), parse_loss("focal:gamma=2")
    threshold = recipes.FUSED_LINEAR_MIN_VOCAB
    assert recipes.use_fused_linear("auto", el, threshold)
    assert not recipes.use_fused_linear("auto", el, threshold - 1)
    assert not recipes.use_fused_linear("auto", focal, threshold)  # falls back
    assert recipes.use_fused_linear("on", parse_loss("ce"), 10)
    assert not recipes.use_fused_linear("off", el, threshold)
    with pytest.raises(ValueError, match="fused-linear"):
        recipes.use_fused_linear("yes", el, threshold)


def test_fused_linear_on_with_another_loss_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"fused-linear: 'on'.*'focal:gamma=2'"):
        recipes.use_fused_linear("on", parse_loss("focal:gamma=2"), 10_000)
    with pytest.raises(ValueError, match="criterion: .*FocalLoss"):
        steps.fused_loss_options(FocalLoss())
    options = Options(
        task="translation",
        losses="ce,poly1:epsilon=1",
        data_root=str(tmp_path),
        out=str(tmp_path / "o"),
        extra={"fused_linear": "on"},
    )
    with pytest.raises(ValueError, match=r"fused-linear: 'on'.*'poly1:epsilon=1'"):
        run_experiment(options)  # before the (missing) data is read


def test_task_options_from_the_command_line():
    parser = argparse.ArgumentParser()
    TASK.add_arguments(parser.add_argument_group("translation task"))
    assert Options.from_args(parser.parse_args([])).get("fused_linear", "auto") == "auto"
    options = Options.from_args(parser.parse_args(["--fused-linear", "off", "--val-size", "50"]))
    assert options.get("fused_linear") == "off" and options.get("val_size") == 50
    with pytest.raises(SystemExit):
        parser.parse_args(["--fused-linear", "yes"])


# --- the paper presets and setting ---------------------------------------------------------
def test_paper_setting_quick_run_has_every_row_metric(tmp_path):
    """The setting's quick run, as the paper page runs it (without tuning): the row's metric is
    in every run's record, for the losses the row compares."""
    shared_dataset("multi30k")
    (setting,) = TASK.paper
    runs = dict(setting.runs["quick"])
    options = Options(
        task="translation",
        losses=setting.losses,
        data_root=str(SHARED_DATA),
        out=str(tmp_path / "paper"),
        progress=False,
        jobs=1,
        **runs,
    )
    with torch_globals_restored():
        results = run_experiment(options)
    assert results["config"]["preset"] == "paper"
    for row in setting.rows:
        for loss in (row.baseline, row.treatment):
            found = [r for r in results["runs"] if r["loss"] == loss]
            assert len(found) == runs["seeds"], loss
            assert all(0.0 <= r["metrics"][row.metric] <= 100.0 for r in found), loss
    assert setting.runs["gpu"]["preset"] == "paper-gpu"


def test_paper_gpu_preset_takes_its_first_steps_on_cpu(tmp_path):
    """The paper-sized model (not run here) trains its first epoch on a sliver of the data."""
    recipe = recipes.PRESETS["paper-gpu"]
    sizes = (recipe.d_model, recipe.encoder_layers, recipe.decoder_layers, recipe.heads)
    assert sizes == (512, 6, 6, 4) and recipe.feedforward == 1024 and recipe.max_train is None
    out = tmp_path / "gpu"
    with pytest.raises(Interrupted):
        _run(
            out,
            preset="paper-gpu",
            losses=LS_EL,
            train_size=16,
            test_size=10,
            epochs=2,
            batch_size=16,  # one update of the 512-wide, 6+6-layer model
            stop_after_epochs=1,
            device="cpu",
            threads=1,
            extra={"val_size": 10},
        )
    state = first_epoch_checkpoint(out)
    assert state["setup"]["config"]["lr"] == recipe.train.lr
