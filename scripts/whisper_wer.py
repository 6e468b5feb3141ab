"""The bar for a projector on a Whisper encoder: the WER of that Whisper's own decoder on the same clips.

Greedy decoding (``num_beams=1``) of every clip of a split in the LoquaciousSet schema, scored as
``tiny-audio validate`` scores: Whisper's English normaliser, then corpus WER. Usage::

    python scripts/whisper_wer.py MODEL DATASET [--split dev] [--config-name NAME] [--max-samples N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from datasets import Audio, load_dataset
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from tiny_audio_pl.hub import find_parquet_files
from tiny_audio_pl.processing import decode_audio
from tiny_audio_pl.scoring import score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Whisper checkpoint folder or hub id")
    parser.add_argument("dataset", help="a folder of parquet files in the LoquaciousSet schema")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--config-name")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, help="only the first N clips (as data.max_eval_samples)")
    args = parser.parse_args()
    files = find_parquet_files(Path(args.dataset), args.config_name, args.split)
    rows = load_dataset("parquet", data_files=files, split="train").cast_column("wav", Audio(decode=False))
    rows = rows.select(range(min(args.max_samples or len(rows), len(rows))))
    processor = WhisperProcessor.from_pretrained(args.model)
    model = WhisperForConditionalGeneration.from_pretrained(args.model).eval()
    rate = processor.feature_extractor.sampling_rate
    references, hypotheses, audio_s = [], [], 0.0
    start = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i:i + args.batch_size]
        audio = [decode_audio(value, rate) for value in batch["wav"]]
        audio_s += sum(len(a) for a in audio) / rate
        features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features  # [B, 80, 3000]
        with torch.no_grad():
            tokens = model.generate(features, num_beams=1, do_sample=False, max_new_tokens=96)
        hypotheses += processor.batch_decode(tokens, skip_special_tokens=True)
        references += batch["text"]
    seconds = time.perf_counter() - start
    scored = [score(args.split, str(i), r, h) for i, (r, h) in enumerate(zip(references, hypotheses))]
    wer = sum(u.errors for u in scored) / max(1, sum(u.reference_words for u in scored))  # as validation counts it
    print(f"{args.model} on {args.dataset} {args.split}: {len(references)} clips, {audio_s / 3600:.3f} h, "
          f"WER {100 * wer:.2f} %, real-time factor {seconds / audio_s:.3f}")


if __name__ == "__main__":
    main()
