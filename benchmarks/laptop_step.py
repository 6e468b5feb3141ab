"""The laptop recipe's training step on a CPU: seconds, useful FLOP/s against the machine's own peak, where it goes.

``configs/laptop.yaml``'s step (Whisper tiny.en + SmolLM2-135M-Instruct, k 4, hidden 5120, output bias,
LoRA r16, AdamW, 8 clips a step, length-grouped as the training stream groups them) trained by the
project's own ``SpeechLLM`` in a Lightning ``Trainer`` on prepared clips, so the data path is not
timed. Clip durations are log-normal (median 3.5 s, 1-10 s; mean ~3.8 s), real speech with the words
spoken in it as the transcript (``data_pipeline.make_clips``).

The models: ``--models DIR`` (``DIR/whisper-tiny.en`` and ``DIR/smollm2-135m``, e.g. from
``shared/realmodels/build.sh``), else random weights in their shapes
(``scripts/make_real_size_models.py --laptop``: throughput depends only on the shapes, but the tiny
tokenizer writes a longer default system message than SmolLM2's 29 tokens), or ``--tiny`` (the
tiny assets: what the test suite runs).

Reported: the median seconds per optimizer step; the useful FLOPs per step and per second; this
machine's 2048 x 2048 fp32 sgemm rate with the same threads (1024 x 1024 with ``--tiny``, an eighth of the
time), measured in the same run (before and after the steps; the better of the two is the peak), and the step's
share of it; the decoder's positions per step by part; and with ``--profile`` the top rows of a ``torch.profiler``
table.

Useful FLOPs count only what a perfect implementation must do: the encoder's forward over each
clip's real frames, the projector's forward and its weight gradients, the decoder's forward and
input-gradient backward over each row's non-padding positions past the shared prompt, the shared
prompt once per step for a batch of one (forward and backward when LoRA adapters train, nothing
when only the projector does: its keys and values never change), the adapters' own products, and
the LM head at labelled positions. Usage::

    python benchmarks/laptop_step.py [--models DIR] [--steps 8] [--profile] [--try CHANGE] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from torch.nn.attention import SDPBackend
from torch.utils.data import DataLoader

import tiny_audio_pl.modeling as modeling
from data_pipeline import make_clips
from tiny_audio_pl.cli import quiet
from tiny_audio_pl.clips import ClipPreparer, collate
from tiny_audio_pl.shared_prompt import common_prefix
from tiny_audio_pl.stream import length_grouped
from tiny_audio_pl.training import SpeechLLM

ROOT = Path(__file__).resolve().parents[1]


def sgemm_gflops(size: int = 2048, repeats: int = 4) -> float:
    """This machine's fp32 matmul GFLOP/s at the current thread count: the best of 3 timings of ``repeats`` products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best / 1e9


class StepTimes(Callback):
    """Wall time of each optimizer step (one batch a step), from its batch's start to its end."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def positions(model: SpeechLLM, batch: dict[str, Any]) -> dict[str, int]:
    """The decoder's positions in one batch, by part."""
    net = model.network
    chats = net.chat_prompts(batch["prompt"], len(batch["text"]))
    shared = len(common_prefix(chats))
    audio = net.projector.output_lengths(net.encoder.frame_lengths(batch["feature_lengths"])).tolist()
    labels = [len(t) for t in batch["targets"]]
    rows = [c.length(a) - shared + t for c, a, t in zip(chats, audio, labels)]
    return {"shared_prompt": shared, "prompt_per_row": sum(len(c.prefix_ids) - shared for c in chats),
            "audio": sum(audio), "suffix": sum(len(c.suffix_ids) for c in chats), "labels": sum(labels),
            "padding": len(rows) * max(rows) - sum(rows)}


def useful_flops(model: SpeechLLM, batch: dict[str, Any]) -> dict[str, float]:
    """Analytic FLOPs of one optimizer step on ``batch``, by part (see the module docstring)."""
    net, parts = model.network, positions(model, batch)
    dec = net.decoder.config
    d, layers = dec.hidden_size, dec.num_hidden_layers
    head_dim = getattr(dec, "head_dim", None) or d // dec.num_attention_heads
    q, kv = dec.num_attention_heads * head_dim, dec.num_key_value_heads * head_dim
    per_position = 2 * layers * (d * q + 2 * d * kv + q * d + 3 * d * dec.intermediate_size)  # forward, linear layers
    lora = model.hparams.get("lora_rank", 0)
    mlp = dec.intermediate_size
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, mlp),
              "up_proj": (d, mlp), "down_proj": (mlp, d)}
    targets = model.hparams.get("lora_targets") or ["q_proj", "k_proj", "v_proj", "o_proj"]
    per_position_lora = 2 * layers * lora * sum(sum(shapes[t]) for t in targets)  # forward of x A and (x A) B
    rows = parts["prompt_per_row"] + parts["audio"] + parts["suffix"] + parts["labels"]
    prefix = parts["shared_prompt"] if lora else 0  # computed once, with gradients, only when adapters train
    frames = net.encoder.frame_lengths(batch["feature_lengths"]).tolist()
    encoder = 0.0
    if net.encoder.is_whisper:
        enc = net.encoder.model.config
        e = enc.d_model
        for n in frames:
            encoder += 2 * (enc.num_mel_bins * 3 * e) * 2 * n + 2 * (3 * e * e) * n  # the two convolutions
            encoder += enc.encoder_layers * (2 * (4 * e * e + 2 * e * enc.encoder_ffn_dim) * n + 4 * n * n * e)
    projector = 3 * 2 * sum(p.numel() for p in net.projector.parameters()) * parts["audio"]
    # attention: each row's queries against its own keys and the shared prompt's, causal
    attention = 0.0
    for a, t, c in zip(net.projector.output_lengths(torch.tensor(frames)).tolist(), batch["targets"],
                       net.chat_prompts(batch["prompt"], len(batch["text"]))):
        length = c.length(a) + len(t)
        attention += layers * 2 * (length * length - parts["shared_prompt"] ** 2) * q
    return {"encoder": encoder, "projector": projector,
            "decoder": (2 * per_position + 3 * per_position_lora) * (rows + prefix) + 3 * attention,
            "lm_head": 2 * 2 * d * dec.vocab_size * parts["labels"]}


def adamw_step_ms(params: list[torch.Tensor], fused: bool, repeats: int = 10) -> float:
    """Milliseconds of one AdamW step over tensors shaped like ``params`` (random gradients), median of ``repeats``."""
    weights = [torch.nn.Parameter(torch.randn_like(p)) for p in params]
    for weight in weights:
        weight.grad = torch.randn_like(weight) * 1e-3
    optimizer = torch.optim.AdamW(weights, lr=1e-4, fused=fused)
    optimizer.step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return 1000 * statistics.median(seconds)


def apply_change(change: str | None, model: SpeechLLM) -> None:
    """One of the changes measured and not kept, for ``--try``."""
    if change == "math-attention":
        modeling.ATTENTION_KERNELS = [SDPBackend.MATH]  # read by TinyAudioModel.attention() at every call
    elif change == "flush-denormal":
        torch.set_flush_denormal(True)
    elif change == "compile-norms":
        decoder = model.network.decoder.get_decoder()
        for module in [m for m in decoder.modules() if type(m).__name__.endswith("RMSNorm")] + [
                layer.mlp for layer in decoder.layers]:
            module.compile(dynamic=True)


def load_settings(models: Path | None, tiny: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The laptop config's model settings and data settings, with the models to use."""
    config = yaml.safe_load((ROOT / "configs/laptop.yaml").read_text())
    model, data = dict(config["model"]), config["data"]
    # The step with the decoder, whose work is counted here; the config's alignment stage first (its ~0.9 s step:
    # encoder, projector and CTC only) would be what the first align_steps steps run.
    model["align_steps"] = 0
    if tiny:
        model.update(encoder=str(ROOT / "assets/tiny-whisper"), decoder=str(ROOT / "assets/tiny-smollm3"),
                     projector_hidden=256)
    else:
        if models is None:
            models = Path("/tmp/laptop-size-models")
            if not (models / "smollm2-135m").is_dir():
                subprocess.run([sys.executable, str(ROOT / "scripts/make_real_size_models.py"), str(models),
                                "--laptop"], check=True)
        model.update(encoder=str(models / "whisper-tiny.en"), decoder=str(models / "smollm2-135m"))
    return model, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="folder with whisper-tiny.en and smollm2-135m (default: random "
                        "weights in their shapes, made once in /tmp/laptop-size-models)")
    parser.add_argument("--tiny", action="store_true", help="the tiny assets instead (what the test suite runs)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after 2 untimed ones)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="compute threads (the CLI gives the main process every core: 2 here)")
    parser.add_argument("--profile", action="store_true", help="then profile two steps and print the top rows")
    parser.add_argument("--try", dest="change", choices=["math-attention", "flush-denormal", "compile-norms"],
                        help="run the step with one change measured and not kept")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet()
    torch.set_num_threads(args.threads)
    sgemm_size = 1024 if args.tiny else 2048
    peak_before = sgemm_gflops(sgemm_size)

    settings, data = load_settings(args.models, args.tiny)
    torch.manual_seed(0)
    model = SpeechLLM(**settings)
    apply_change(args.change, model)
    preparer = ClipPreparer(model.network.processor, min_duration=0.1, max_duration=30.0, max_target_tokens=10_000,
                            text_normalization="lower")
    batch_size, warmup = data["batch_size"], 2
    rng = np.random.default_rng(0)
    count = (warmup + args.steps) * batch_size
    durations = np.clip(rng.lognormal(np.log(3.5), 0.4, count), 1.0, 10.0).tolist()
    clips = [preparer(row) for row in make_clips(count, durations=durations, seed=0)]
    order = length_grouped([c["duration"] for c in clips], batch_size, rng)  # as the training stream groups them
    batches = [order[i:i + batch_size] for i in range(0, count, batch_size)]

    times = StepTimes()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[times])
    loader = DataLoader(clips, batch_sampler=batches, collate_fn=collate)
    trainer.fit(model, train_dataloaders=loader)
    peak = max(peak_before, sgemm_gflops(sgemm_size))
    trained = list(model.network.trainable_parameters().values())
    adamw = {"fused": round(adamw_step_ms(trained, fused=True), 1),
             "for_loop": round(adamw_step_ms(trained, fused=False), 1)}

    timed = [collate([clips[i] for i in b]) for b in batches[warmup:]]
    flops = [useful_flops(model, batch) for batch in timed]
    parts = {name: sum(p[name] for p in (positions(model, b) for b in timed)) / len(timed)
             for name in positions(model, timed[0])}
    seconds = statistics.median(times.seconds[warmup:])
    per_step = {name: statistics.mean(f[name] for f in flops) / 1e9 for name in flops[0]}
    useful = sum(per_step.values()) / seconds
    report = {
        "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "change": args.change,
        "models": "tiny assets" if args.tiny else str(args.models or "random weights"),
        "settings": {k: settings[k] for k in ("projector_stack", "projector_hidden", "projector_bias", "lora_rank")},
        "trained_loss": sorted(k for k in trainer.callback_metrics if k in ("train/loss", "train/align_loss")),
        "batch_size": batch_size, "timed_steps": args.steps,
        "clip_s_mean": round(float(np.mean([clips[i]["duration"] for b in batches[warmup:] for i in b])), 2),
        "seconds_per_step": round(seconds, 3), "seconds_each": [round(s, 3) for s in times.seconds[warmup:]],
        "useful_gflop_per_step": {k: round(v, 3) for k, v in per_step.items()},
        "useful_gflops": round(useful, 1), "sgemm_peak_gflops": round(peak, 1),
        "share_of_peak": round(useful / peak, 3),
        "decoder_positions_per_step": {k: round(v, 1) for k, v in parts.items()},
        "adamw_step_ms": adamw,
    }
    print(json.dumps(report, indent=2), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        profiled = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            profiled.fit(model, train_dataloaders=DataLoader(clips, batch_sampler=batches[warmup:warmup + 2],
                                                             collate_fn=collate))
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(table)
        report["profile"] = table.splitlines()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
