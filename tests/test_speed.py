"""The speed optimisations keep the objective, and both benchmarks run."""

import json
import sys

import laptop_step
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

import throughput
from conftest import DECODER, WHISPER
from data_pipeline import main as data_pipeline
from throughput import seed_ways
from tiny_audio_pl.stream import length_grouped
from tiny_audio_pl.training import SpeechLLM


def _loss_and_grads(model: SpeechLLM, batch: dict) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.network.projector.parameters()]


def test_optimised_step_has_the_naive_steps_loss_and_gradients(dev_batch):
    """Same batch, same encoder input: the trimmed-padding, labelled-only, mask-free step equals the naive one."""
    torch.manual_seed(0)
    model = SpeechLLM(encoder=WHISPER, decoder=DECODER, projector_hidden=64)
    ours, ours_grads = _loss_and_grads(model, dev_batch)
    with seed_ways(default_attention=True, full_vocabulary_head=True):  # transformers' loss, padding mask, any kernel
        naive, naive_grads = _loss_and_grads(model, dev_batch)
    assert ours == pytest.approx(naive, rel=1e-5)
    for mine, theirs in zip(ours_grads, naive_grads):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6)


def test_whisper_full_window_is_the_one_change_of_objective(dev_batch):
    """Padding every clip to 30 s changes what Whisper sees (its own silence), so the loss moves a little."""
    torch.manual_seed(0)
    model = SpeechLLM(encoder=WHISPER, decoder=DECODER, projector_hidden=64).eval()
    with torch.no_grad():
        trimmed = model(dev_batch).item()
        model.network.encoder.full_window = True
        full = model(dev_batch).item()
    assert trimmed != full
    assert abs(trimmed - full) / full < 0.2  # same task, different encoder input: see docs/benchmarks.md


def _sub_batch(batch: dict, rows: list[int]) -> dict:
    """Clips ``rows`` of a collated batch as a batch of their own, padded to their own longest clip."""
    lengths = batch["feature_lengths"][rows]
    return {"features": batch["features"][rows][..., :int(lengths.max())], "feature_lengths": lengths,
            "text": [batch["text"][i] for i in rows], "prompt": [None] * len(rows)}


def _first_step_gradients(model: SpeechLLM, batches: list[dict]) -> list[torch.Tensor]:
    """The projector's gradient of one optimizer step over ``batches`` (accumulated), as the optimizer used it."""
    trainer = Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=len(batches), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch))
    return [p.grad.clone() for p in model.network.projector.parameters()]  # nothing zeroes them after the last step


def test_an_optimizer_step_weighs_every_target_token_alike(dev_batch):
    """4 uneven micro-batches accumulated give the gradient of one batch of all their clips: the mean over
    the step's tokens, not a mean of the micro-batches' means (which weighs the tokens of small batches more)."""
    torch.manual_seed(0)
    model = SpeechLLM(encoder=WHISPER, decoder=DECODER, projector_hidden=64)
    start = {k: v.clone() for k, v in model.network.projector.state_dict().items()}
    parts = [[0], [1, 2], [3], [4, 5]]
    accumulated = _first_step_gradients(model, [_sub_batch(dev_batch, rows) for rows in parts])
    model.network.projector.load_state_dict(start)
    whole = _first_step_gradients(model, [_sub_batch(dev_batch, list(range(6)))])
    for mine, theirs in zip(accumulated, whole):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6), (mine - theirs).abs().max()

    model.network.projector.load_state_dict(start)
    model.zero_grad()
    for rows in parts:  # what a mean of per-micro-batch means would give
        (model(_sub_batch(dev_batch, rows)) / len(parts)).backward()
    means = [p.grad for p in model.network.projector.parameters()]
    assert not all(torch.allclose(m, w, rtol=1e-2) for m, w in zip(means, whole))


def test_length_grouping_is_a_permutation_of_similar_length_batches():
    rng = np.random.default_rng(0)
    durations = rng.lognormal(np.log(6.0), 0.6, 1000).clip(1, 30).tolist()
    order = length_grouped(durations, 8, np.random.default_rng(1))
    assert sorted(order) == list(range(1000))

    def padding(order: list[int]) -> float:
        batches = [np.array(durations)[order[i:i + 8]] for i in range(0, len(order), 8)]
        return 1 - sum(b.sum() for b in batches) / sum(b.max() * len(b) for b in batches)

    assert padding(order) < 0.1 < 0.3 < padding(list(range(1000)))
    firsts = [durations[order[i]] for i in range(0, 1000, 8)]
    assert firsts != sorted(firsts)  # batches come in random order, not short to long
    again = length_grouped(durations, 8, np.random.default_rng(2))
    assert {frozenset(again[i:i + 8]) for i in range(0, 1000, 8)} != {frozenset(order[i:i + 8])
                                                                     for i in range(0, 1000, 8)}


def _run(benchmark, monkeypatch, *args: str) -> None:
    """A benchmark's ``main`` with these command-line arguments, in this process (its imports are already here)."""
    monkeypatch.setattr(sys, "argv", [benchmark.__name__, *args])
    benchmark()


def test_benchmarks_run_and_write_their_figures(tmp_path, monkeypatch):
    """One command each, as in docs/benchmarks.md (short versions)."""
    throughput_json = tmp_path / "throughput.json"
    _run(throughput.main, monkeypatch, "--size", "tiny", "--batches", "2", "--warmup", "1", "--modes", "naive,ours",
         "--json", str(throughput_json))
    figures = json.loads(throughput_json.read_text())
    for key in ("naive_samples_per_s", "ours_samples_per_s", "ratio", "padding_share", "peak_mem_mb"):
        assert key in figures
    assert figures["ratio"] > 1 and figures["padding_share"]["ours"] < figures["padding_share"]["naive"]

    pipeline = tmp_path / "pipeline.json"
    _run(data_pipeline, monkeypatch, "--clips", "16", "--json", str(pipeline))
    assert json.loads(pipeline.read_text())["whisper_per_worker"]["samples_per_s"] > 0


def test_laptop_benchmark_reports_the_step_against_this_machines_peak(tmp_path, monkeypatch):
    """The laptop step's benchmark on the tiny assets (docs/benchmarks.md runs it on the real models)."""
    report = tmp_path / "laptop.json"
    _run(laptop_step.main, monkeypatch, "--tiny", "--steps", "2", "--threads", "1", "--profile", "--json", str(report))
    figures = json.loads(report.read_text())
    assert figures["seconds_per_step"] > 0 and figures["sgemm_peak_gflops"] > 0
    assert figures["trained_loss"] == ["train/loss"]  # the decoder's step is timed, not the alignment stage's
    share = figures["useful_gflops"] / figures["sgemm_peak_gflops"]
    assert 0 < figures["share_of_peak"] == pytest.approx(share, abs=5e-3)  # written to two decimals
    parts = figures["decoder_positions_per_step"]
    assert parts["shared_prompt"] > 0 and parts["audio"] > 0 and parts["labels"] > 0  # the prompt is run once
    assert parts["prompt_per_row"] == 0  # one prompt: nothing of it is left to run per row
    assert all(figures["useful_gflop_per_step"][part] > 0 for part in ("encoder", "projector", "decoder", "lm_head"))
    assert any("aten::mm" in row for row in figures["profile"])
