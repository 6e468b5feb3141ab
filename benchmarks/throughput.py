"""Training throughput of the real training step: the seed's naive recipe against ours, side by side.

Every mode trains the project's own ``SpeechLLM`` with a Lightning ``Trainer`` on the same clips,
prepared by the project's ``ClipPreparer`` and batched by its ``collate``; the modes differ only in
the optimisations switched on, one more per mode, so each one's effect is measured:

- ``naive``: what the seed's system does: every clip padded to 30 s through the Whisper encoder,
  logits over the whole vocabulary at every decoder position (``transformers``' own loss), batches
  formed in arrival order;
- ``trim``: Whisper fed each batch at its longest clip, padding masked;
- ``attention``: and attention restricted to SDPA's flash / memory-efficient kernels (not cuDNN's,
  which plans anew for every new shape), the decoder run without a padding mask (its rows are
  right-padded and causal, so none is needed), which lets it use the flash kernel;
- ``head``: and the LM head only at the labelled positions;
- ``ours``: and length-grouped batches (:func:`tiny_audio_pl.stream.length_grouped` over windows of
  ``data.shuffle_buffer`` clips) of ``data.batch_size`` clips, ``trainer.accumulate_grad_batches``
  of them per optimizer step;
- ``budget``: batches filled to ``--batch-seconds`` of padded audio instead
  (:func:`tiny_audio_pl.stream.budget_batches`), ``--budget-accumulate`` per optimizer step;
- ``norms``: budget batches with the decoder's RMSNorms and MLPs compiled (fused kernels for what the
  profile shows as many small element-wise ones); ``compiled``: each whole layer of the frozen encoder
  and decoder compiled instead. Both with dynamic shapes, after untimed steps on budget batches and on
  a one-clip batch (the graphs the dynamic shapes need: size 1 is specialised). ``compiled`` was
  slower than ``budget`` on an H200 (docs/benchmarks.md), so it is not part of the project.

``--worst-case`` then measures the peak memory of one optimizer step on the two largest batches a
budget can hold: ``--batch-seconds`` of the longest clips allowed (30 s) and ``--max-batch-clips``
clips as long as still fit.

The model settings, precision and batch size come from the config under test: ``configs/smoke.yaml``
for ``--size tiny`` (the tiny assets, CPU) and ``configs/whisper.yaml`` for ``--size real`` (GPU):
Whisper-large-v3-turbo's encoder and SmolLM3-3B rebuilt from their shapes with random weights by
``scripts/make_real_size_models.py``, frozen in bf16, bf16-mixed. Batches are accumulated and
gradients clipped as the config says. Clip durations are log-normal with a median of 6 s, clipped
to 1-30 s (mean ~7 s; LoquaciousSet clips are mostly a few seconds to ~20 s), real speech with the
words spoken in it as the transcript (``data_pipeline.make_clips``).

Useful FLOPs (for model-FLOPs utilisation) are counted analytically and only for work a perfect
implementation must do: the encoder's forward over each clip's real frames, the projector's forward
and backward, the decoder's forward and input-gradient backward over non-padding positions past the shared
prompt (whose keys and values a frozen decoder computes once per run), and the
LM head at labelled positions only. Usage::

    python benchmarks/throughput.py --size tiny [--json PATH]
    python benchmarks/throughput.py --size real --json PATH    # one GPU
    python benchmarks/throughput.py --size real --modes naive,ours,budget,compiled --worst-case --json PATH
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partialmethod
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from data_pipeline import make_clips
from tiny_audio_pl.cli import quiet
from tiny_audio_pl.clips import ClipPreparer, collate
from tiny_audio_pl.modeling import TinyAudioModel
from tiny_audio_pl.stream import budget_batches, length_grouped
from tiny_audio_pl.training import SpeechLLM

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mode:
    name: str
    full_window: bool  # Whisper padded to 30 s
    default_attention: bool  # PyTorch's own SDPA kernel choice, padding mask in the decoder
    full_vocabulary_head: bool  # logits at every position
    grouped: bool  # length-grouped batches instead of arrival order
    budget: bool = False  # batches filled to a budget of seconds instead of a number of clips
    compiled: str = ""  # what of the frozen models is compiled: "norms" (RMSNorms and MLPs) or "layers" (every block)


MODES = [Mode("naive", True, True, True, False), Mode("trim", False, True, True, False),
         Mode("attention", False, False, True, False), Mode("head", False, False, False, False),
         Mode("ours", False, False, False, True), Mode("budget", False, False, False, True, budget=True),
         Mode("norms", False, False, False, True, budget=True, compiled="norms"),
         Mode("compiled", False, False, False, True, budget=True, compiled="layers")]


def naive_loss(net: TinyAudioModel, audio: torch.Tensor, audio_lengths: list[int], targets: list[list[int]],
               prompts: list[str | None] | None = None, reduction: str = "mean", mask: bool = True) -> torch.Tensor:
    """The seed's loss: ``transformers``' own, logits ``[B, L, V]`` at every position, a padding mask if ``mask``."""
    layout = net.assemble(audio, audio_lengths, net.chat_prompts(prompts, len(targets)), targets)
    with net.attention():
        mean = net.decoder(inputs_embeds=layout.embeds, labels=layout.labels, use_cache=False,
                           attention_mask=layout.mask if mask else None).loss
    return mean if reduction == "mean" else mean * sum(len(t) for t in targets)


@contextmanager
def seed_ways(default_attention: bool, full_vocabulary_head: bool) -> Iterator[None]:
    """``TinyAudioModel`` with the seed's ways patched in while the block runs: PyTorch's own choice of
    attention kernel, and :func:`naive_loss` (with the padding mask under the default kernels)."""
    with ExitStack() as stack:
        if default_attention:
            stack.enter_context(patch.object(TinyAudioModel, "attention", lambda self: nullcontext()))
        if full_vocabulary_head:
            stack.enter_context(patch.object(TinyAudioModel, "loss", partialmethod(naive_loss, mask=default_attention)))
        yield


class Stopwatch(Callback):
    """Times (and optionally profiles) the training batches after the first ``warmup``, device synchronised."""

    def __init__(self, warmup: int, profiler: torch.profiler.profile | None = None) -> None:
        self.warmup, self.profiler, self.start, self.seconds = warmup, profiler, 0.0, 0.0

    def on_train_start(self, trainer: Trainer, pl_module: SpeechLLM) -> None:
        if self.warmup == 0:
            self._start()

    def on_train_batch_end(self, trainer: Trainer, pl_module: SpeechLLM, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 == self.warmup:
            self._start()

    def _start(self) -> None:
        _synchronize()
        self.start = time.perf_counter()
        if self.profiler:
            self.profiler.start()

    def on_train_end(self, trainer: Trainer, *args: Any) -> None:
        _synchronize()
        self.seconds = time.perf_counter() - self.start
        if self.profiler:
            self.profiler.stop()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the resident-set high-water mark


def peak_memory_mb() -> float | None:
    """Peak GPU memory allocated, or on the CPU the process's peak resident set since the reset."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def compiled_modules(net: TinyAudioModel, what: str) -> list[torch.nn.Module]:
    """``layers``: every block of the frozen encoder and decoder; ``norms``: the decoder's RMSNorms (HF computes
    them in fp32 with a cast each way: many small kernels) and MLPs (SiLU x up: two more)."""
    decoder = net.decoder.get_decoder()
    if what == "layers":
        return [*net.encoder.model.layers, *decoder.layers]
    if what == "norms":
        norms = [m for m in decoder.modules() if type(m).__name__.endswith("RMSNorm")]
        return norms + [layer.mlp for layer in decoder.layers]
    return []


def batches_in_order(durations: list[float], batch_size: int, grouped: bool, window: int, seed: int = 0
                     ) -> list[list[int]]:
    """Arrival order, or the training stream's length grouping over windows of ``window`` clips."""
    order = list(range(len(durations)))
    if grouped:
        rng = np.random.default_rng(seed)
        order = [start + i for start in range(0, len(order), window)
                 for i in length_grouped(durations[start:start + window], batch_size, rng)]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batches_by_budget(durations: list[float], seconds: float, max_clips: int, window: int, seed: int = 0
                      ) -> list[list[int]]:
    """The training stream's budget batches over windows of ``window`` clips."""
    rng = np.random.default_rng(seed)
    return [[start + i for i in batch] for start in range(0, len(durations), window)
            for batch in budget_batches(durations[start:start + window], rng, seconds, max_clips)]


def decoder_lengths(model: SpeechLLM, batch: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """Per clip: decoder positions (prompt + audio + target), audio tokens and labelled positions."""
    net = model.network
    frames = net.encoder.frame_lengths(batch["feature_lengths"])
    audio = net.projector.output_lengths(frames).tolist()
    targets = [len(t) for t in model.targets(batch)]
    return [net.processor.prompt.length(a) + t for a, t in zip(audio, targets)], audio, targets


def useful_flops(model: SpeechLLM, batch: dict[str, Any]) -> float:
    """Analytic FLOPs of the work a perfect implementation must do for one batch (see module docstring)."""
    net = model.network
    enc = net.encoder.model.config
    dec = net.decoder.config
    d, heads = dec.hidden_size, dec.num_attention_heads
    head_dim = getattr(dec, "head_dim", None) or d // heads
    q, kv = heads * head_dim, dec.num_key_value_heads * head_dim
    dec_linear = 2 * dec.num_hidden_layers * (d * q + 2 * d * kv + q * d + 3 * d * dec.intermediate_size)
    proj_params = sum(p.numel() for p in net.projector.parameters())
    total = 0.0
    shared = len(net.processor.prompt.prefix_ids)  # the shared prompt: computed once per run (frozen decoder)
    lengths, audio, targets = decoder_lengths(model, batch)
    frames = net.encoder.frame_lengths(batch["feature_lengths"]).tolist()
    for n, length, a, t in zip(frames, lengths, audio, targets):
        e = enc.d_model
        total += 2 * (enc.num_mel_bins * 3 * e) * 2 * n + 2 * (3 * e * e) * n  # the two convs over 2n, n frames
        total += enc.encoder_layers * (2 * (4 * e * e + 2 * e * enc.encoder_ffn_dim) * n + 4 * n * n * e)
        total += 3 * 2 * proj_params * a  # projector forward + backward (weights and inputs)
        attention = dec.num_hidden_layers * 2 * (length * length - shared * shared) * q  # causal: half of QK^T, AV
        total += 2 * dec_linear * (length - shared) + 3 * attention  # forward + input-gradient backward
        total += 2 * 2 * d * dec.vocab_size * t  # LM head at labelled positions, forward + input gradient
    return total


def peak_flops(device: str, override_tflops: float | None) -> float | None:
    """Dense bf16 peak of the GPU (vendor figures), or ``--peak-tflops``."""
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312),
                        ("A40", 150), ("L40S", 362), ("L4", 121)):
        if key in name:
            return tflops * 1e12
    return None


def load_config(size: str, models: Path) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "configs" / ("smoke.yaml" if size == "tiny" else "whisper.yaml")).read_text())
    model = dict(config["model"])
    if size == "real":
        if not (models / "smollm3").is_dir():
            subprocess.run([sys.executable, str(ROOT / "scripts/make_real_size_models.py"), str(models)], check=True)
        model.update(encoder=str(models / "whisper"), decoder=str(models / "smollm3"))
    else:
        model.update(encoder=str(ROOT / model["encoder"]), decoder=str(ROOT / model["decoder"]))
    return {"model": model, "trainer": config["trainer"], "data": config["data"]}


def run_mode(model: SpeechLLM, mode: Mode, prepared: list[dict], batches: list[list[int]],
             warmup: list[list[int]], trainer_config: dict[str, Any], accumulate: int, device: str,
             profiler: torch.profiler.profile | None = None) -> dict[str, Any]:
    """Train on ``warmup`` then ``batches`` (timed) with the mode's switches; return its figures."""
    model.network.encoder.full_window = mode.full_window
    loader = DataLoader(prepared, batch_sampler=warmup + batches, collate_fn=collate,
                        pin_memory=device == "cuda")
    stopwatch = Stopwatch(len(warmup), profiler)
    trainer = Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                      precision=trainer_config.get("precision", "32-true"),
                      gradient_clip_val=trainer_config.get("gradient_clip_val"),
                      accumulate_grad_batches=accumulate, max_steps=(len(warmup) + len(batches)) // accumulate,
                      logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[stopwatch])
    reset_peak_memory()
    with seed_ways(mode.default_attention, mode.full_vocabulary_head):
        trainer.fit(model, train_dataloaders=loader)
    seconds = stopwatch.seconds
    clips = [prepared[i] for b in batches for i in b]
    positions = padded = labelled = 0
    flops = 0.0
    for b in batches:
        batch = collate([prepared[i] for i in b])
        lengths, _, targets = decoder_lengths(model, batch)
        positions += sum(lengths)
        padded += len(lengths) * max(lengths)
        labelled += sum(targets)
        flops += useful_flops(model, batch)
    return {"mode": mode.name, "seconds": round(seconds, 3),
            "samples_per_s": round(len(clips) / seconds, 2),
            "audio_s_per_s": round(sum(c["duration"] for c in clips) / seconds, 1),
            "decoder_tokens_per_s": round(positions / seconds, 1),
            "padding_share": round(1 - positions / padded, 4),
            "peak_mem_mb": round(peak_memory_mb() or 0.0, 1),
            "useful_tflops_per_s": round(flops / seconds / 1e12, 3), "final_loss": round(
                float(trainer.callback_metrics.get("train/loss", float("nan"))), 4)}


def worst_case(model: SpeechLLM, mode: Mode, preparer: ClipPreparer, seconds: float, max_clips: int,
               trainer_config: dict[str, Any], device: str) -> dict[str, dict[str, Any]]:
    """Peak memory of one optimizer step on each of the two largest batches a budget lets through:
    ``seconds`` of the longest clips allowed (30 s), and ``max_clips`` clips as long as still fit."""
    worst = {}
    for name, lengths in (("longest_clips", [30.0] * int(seconds // 30)),
                          ("most_clips", [seconds / max_clips] * max_clips)):
        clips = [preparer(row) for row in make_clips(len(lengths), durations=lengths, seed=1)]
        figures = run_mode(model, mode, clips, [list(range(len(clips)))], [], trainer_config, 1, device)
        worst[name] = {"clips": len(clips), "clip_s": round(lengths[0], 2), "peak_mem_mb": figures["peak_mem_mb"],
                       "seconds": figures["seconds"]}
        print(json.dumps({name: worst[name]}), flush=True)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--batch-size", type=int, help="clips per batch (default: the config's data.batch_size)")
    parser.add_argument("--accumulate", type=int,
                        help="batches of --batch-size per optimizer step (default: the config's "
                             "trainer.accumulate_grad_batches; 32 clips a step with a budget config)")
    parser.add_argument("--batch-seconds", type=float,
                        help="budget modes: padded seconds per batch (default: the config's data.batch_seconds, "
                             "else 64, about 8 clips)")
    parser.add_argument("--max-batch-clips", type=int, help="budget modes: clips per batch at most (default: config)")
    parser.add_argument("--budget-accumulate", type=int,
                        help="budget modes: batches per optimizer step (default: the config's accumulation)")
    parser.add_argument("--batches", type=int, help="timed batches of --batch-size per mode (default: 12 tiny, "
                        "24 real); the budget modes train on the same clips")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps per mode first (default 1, 2 tiny)")
    parser.add_argument("--modes", default=",".join(m.name for m in MODES if m.name != "compiled"),
                        help=f"comma-separated subset of {','.join(m.name for m in MODES)}")
    parser.add_argument("--worst-case", action="store_true",
                        help="then the peak memory of the two largest batches the budget allows")
    parser.add_argument("--models", type=Path, default=Path("/tmp/real-size-models"),
                        help="--size real: where the random-weight real-size models are made (once) and read")
    parser.add_argument("--peak-tflops", type=float, help="the accelerator's dense peak, if not recognised")
    parser.add_argument("--profile", action="store_true", help="then profile 2 optimizer steps of the last mode")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size == "real" and device != "cuda":
        parser.error("--size real needs a GPU")
    config = load_config(args.size, args.models)
    data, trainer_config = config["data"], config["trainer"]
    batch_size = args.batch_size or data["batch_size"]
    configured = trainer_config.get("accumulate_grad_batches", 1)
    accumulate = args.accumulate or (32 // batch_size if data.get("batch_seconds") else configured)
    seconds = args.batch_seconds or data.get("batch_seconds") or 64.0
    max_clips = args.max_batch_clips or data.get("max_batch_clips") or 64
    budget_accumulate = args.budget_accumulate or configured
    num_batches = args.batches or (12 if args.size == "tiny" else 24)
    num_warmup = (args.warmup or (2 if args.size == "tiny" else 1)) * accumulate
    if num_batches % accumulate:
        parser.error(f"--batches must be a multiple of the {accumulate} batches per optimizer step")
    modes = [m for m in MODES if m.name in args.modes.split(",")]
    torch.manual_seed(0)
    model = SpeechLLM(**config["model"])
    initial_projector = {k: v.clone() for k, v in model.network.projector.state_dict().items()}

    preparer = ClipPreparer(model.network.processor, min_duration=0.1, max_duration=30.0, max_target_tokens=10_000,
                            text_normalization="lower")
    # Untimed clips first: enough for the count modes' warmup and two budget steps (compilation).
    warm = max(num_warmup * batch_size, int(((args.warmup or 1) + 1) * budget_accumulate * seconds / 6))
    prepared = [preparer(row) for row in make_clips(warm + num_batches * batch_size)]  # each with its "duration"
    window = data.get("shuffle_buffer", 1000)
    timed = list(range(warm, len(prepared)))
    durations = [prepared[i]["duration"] for i in timed]
    warm_durations = [prepared[i]["duration"] for i in range(warm)]

    results, worst = [], {}
    for mode in modes:
        model.network.projector.load_state_dict(initial_projector)
        if mode.budget:
            steps = budget_accumulate
            batches = [[timed[i] for i in b] for b in batches_by_budget(durations, seconds, max_clips, window)]
            batches = batches[:len(batches) // steps * steps]
            warmup = batches_by_budget(warm_durations, seconds, max_clips, window)[:(args.warmup or 1) * steps]
            if mode.compiled:  # compile both graphs before timing: one clip (a size-1 batch is specialised) and more
                warmup += [[0]] * steps
        else:
            steps = accumulate
            batches = [[timed[i] for i in b] for b in batches_in_order(durations, batch_size, mode.grouped, window)]
            warmup = [list(range(i * batch_size, (i + 1) * batch_size)) for i in range(num_warmup)]
        for module in compiled_modules(model.network, mode.compiled):
            module.compile(dynamic=True)
        results.append(run_mode(model, mode, prepared, batches, warmup, trainer_config, steps, device))
        results[-1]["compiled_graphs"] = counters["stats"]["unique_graphs"]
        results[-1]["clips_per_batch"] = round(float(np.mean([len(b) for b in batches])), 1)
        results[-1]["batches_per_step"] = steps
        print(json.dumps(results[-1]), flush=True)
        if args.worst_case and mode.budget and not worst:  # before anything is compiled
            worst = worst_case(model, mode, preparer, seconds, max_clips, trainer_config, device)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        profiler = profile(activities=activities)
        run_mode(model, mode, prepared, batches[:2 * steps], warmup, trainer_config, steps, device, profiler)
        print(profiler.key_averages().table(sort_by=f"{'cuda' if device == 'cuda' else 'cpu'}_time_total",
                                            row_limit=30))

    by_mode = {r["mode"]: r for r in results}
    peak = peak_flops(device, args.peak_tflops)
    for r in results:
        r["mfu"] = round(r["useful_tflops_per_s"] * 1e12 / peak, 4) if peak else None
        # the recipe: 10,000 optimizer steps of 32 clips' worth of audio (budget batches: the same audio on average)
        r["recipe_hours"] = round(10_000 * 32 * float(np.mean(durations)) / r["audio_s_per_s"] / 3600, 2)
    report: dict[str, Any] = {
        "size": args.size, "device": torch.cuda.get_device_name() if device == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "batch_size": batch_size, "accumulate_grad_batches": accumulate,
        "batch_seconds": seconds, "max_batch_clips": max_clips, "budget_accumulate": budget_accumulate,
        "worst_case": worst,
        "timed_batches": num_batches,
        "clip_duration_s": {"mean": round(float(np.mean(durations)), 2),
                            "median": round(float(np.median(durations)), 2),
                            "max": round(float(np.max(durations)), 2)},
        "peak_tflops": peak / 1e12 if peak else None, "modes": results,
        "padding_share": {r["mode"]: r["padding_share"] for r in results},
        "peak_mem_mb": {r["mode"]: r["peak_mem_mb"] for r in results},
    }
    if "naive" in by_mode and "ours" in by_mode:
        ours = by_mode["ours"]["samples_per_s"]
        report.update(naive_samples_per_s=by_mode["naive"]["samples_per_s"], ours_samples_per_s=ours,
                      ratio=round(ours / by_mode["naive"]["samples_per_s"], 2),
                      recipe_hours_10k_steps_x32=round(10_000 * 32 / ours / 3600, 2))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
