"""``run translation`` end to end on a few hundred Multi30k pairs: files, metric ranges,
determinism, resume, BPE round trip, batching and decoding. Skipped without ``tokenizers``,
``sacrebleu`` or the data."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from encouraging_loss.lab.cli import main
from encouraging_loss.lab.report import run_slug

from .helpers import SHARED_DATA, load_results, shared_dataset

pytest.importorskip("tokenizers")
pytest.importorskip("sacrebleu")

from encouraging_loss.lab.tasks import translation  # noqa: E402

LS_EL = "ls-el:0.1,log_end=0.5"


def _options(out, **overrides) -> translation.TranslationOptions:
    shared_dataset("multi30k")
    settings = dict(
        losses=f"ls-ce:0.1,{LS_EL}",
        seeds=1,
        data_root=str(SHARED_DATA),
        out=str(out),
        train_size=256,
        val_size=24,
        test_size=24,
        epochs=2,
        batch_size=32,
        progress=False,
    )
    settings.update(overrides)
    return translation.TranslationOptions(**settings)


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    """A 1+1-layer, 32-wide model and a 400-token vocabulary: the pipeline, in seconds."""
    with pytest.MonkeyPatch.context() as patch:
        quick = translation.PRESETS["quick"]
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
        patch.setitem(translation.PRESETS, "quick", small)
        yield small


@pytest.fixture(scope="module")
def tiny_mt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt") / "out"
    assert translation.run(_options(out)) is not None
    return out


def test_files_and_contract(tiny_mt_run):
    for name in ("results.json", "results.csv", "report.md", "tokenizer.json"):
        assert (tiny_mt_run / name).is_file(), name
    results = load_results(tiny_mt_run)
    assert results["task"] == "translation" and results["dataset"] == "multi30k"
    assert [r["loss"] for r in results["runs"]] == ["ls-ce:0.1", LS_EL]
    data = results["config"]["data"]
    assert (data["n_train"], data["n_val"], data["n_test"]) == (256, 24, 24)
    assert results["config"]["bleu_signature"].startswith("nrefs:1|")
    for run in results["runs"]:
        lines = (tiny_mt_run / "translations" / f"{run_slug(run['loss'], 0)}.beam5.en").read_text()
        assert lines.count("\n") == 24
    text = (tiny_mt_run / "report.md").read_text()
    assert "BLEU (beam)" in text and f"`{LS_EL}` − `ls-ce:0.1`" in text


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


def test_same_seed_same_numbers(tiny_mt_run, tmp_path):
    again = translation.run(_options(tmp_path / "again", losses=LS_EL))["runs"][0]
    first = load_results(tiny_mt_run)["runs"][1]
    assert first["loss"] == again["loss"] == LS_EL
    for name in ("bleu", "bleu_greedy", "token_accuracy", "ppl"):
        assert again["metrics"][name] == pytest.approx(first["metrics"][name], rel=1e-9), name
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (
        tiny_mt_run / "tokenizer.json"
    ).read_text()


def test_resume_gives_the_uninterrupted_result(tiny_mt_run, tmp_path):
    out = tmp_path / "resumed"
    assert translation.run(_options(out, losses=LS_EL, stop_after_epochs=1)) is None
    assert any((out / "checkpoints").iterdir())
    resumed = translation.run(_options(out, losses=LS_EL, resume=True))["runs"][0]
    first = load_results(tiny_mt_run)["runs"][1]
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in first["history"]], rel=1e-6
    )
    assert resumed["metrics"]["token_accuracy"] == pytest.approx(
        first["metrics"]["token_accuracy"], rel=1e-9
    )


def test_bpe_round_trip_restores_raw_text(tiny_mt_run):
    tokenizer = translation.load_tokenizer(tiny_mt_run / "tokenizer.json")
    raw, _ = translation.load_multi30k(SHARED_DATA)
    for sentence in raw["train"][1][:50]:
        ids = tokenizer.encode(sentence).ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


def test_epoch_batches_cover_once_and_repeat():
    lengths = torch.randint(3, 30, (103,), generator=torch.Generator().manual_seed(0))
    batches = translation.epoch_batches(lengths, 10, seed=5, pool=3)
    flat = torch.cat(batches).tolist()
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)
    assert len(set(flat)) == 100
    again = translation.epoch_batches(lengths, 10, seed=5, pool=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_incremental_decoding_matches_the_full_prefix():
    torch.manual_seed(1)
    model = translation.Seq2SeqTransformer(
        60, d_model=16, heads=2, feedforward=32, max_positions=40
    )
    model.eval()
    src = torch.randint(4, 60, (5, 9))
    src[1, 6:] = translation.PAD
    memory, mask = model.encode(src)
    prefix = torch.randint(4, 60, (5, 7))
    prefix[:, 0] = translation.BOS
    full = model.decode(prefix, memory, mask)
    cache = None
    for position in range(prefix.shape[1]):
        state, cache = model.decode_step(prefix[:, position], position, memory, mask, cache)
        torch.testing.assert_close(state, full[:, position], rtol=1e-4, atol=1e-5)


def test_beam_of_one_is_greedy():
    torch.manual_seed(0)
    model = translation.Seq2SeqTransformer(
        50, d_model=16, heads=2, feedforward=32, max_positions=40
    )
    model.eval()
    src = torch.randint(4, 50, (6, 7))
    src[0, 5:] = translation.PAD
    greedy = translation.greedy_decode(model, src)
    assert translation.beam_search(model, src, beam=1, alpha=0.0) == greedy
    assert len(translation.beam_search(model, src, beam=4)) == 6
    with pytest.raises(ValueError, match="beam"):
        translation.beam_search(model, src, beam=0)


def test_cli_errors_name_the_argument(tmp_path, capsys):
    base = ["run", "translation", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*base, "--dataset", "wmt14"]) == 2
    assert "dataset:" in capsys.readouterr().err
    assert main([*base, "--preset", "standard"]) == 2
    assert "preset:" in capsys.readouterr().err
    assert main(base) == 2
    assert "multi30k" in capsys.readouterr().err
