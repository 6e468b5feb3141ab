"""The bar for a projector on a Whisper encoder: the WER of that Whisper's own decoder on the same clips.

Greedy decoding (``num_beams=1``) of every clip of a split in the LoquaciousSet schema, scored as
``tiny-audio validate`` scores: Whisper's English normaliser, then corpus WER. With ``--out DIR`` the
scores are written as a run folder ``tiny-audio compare`` reads (``DIR/utterances/step=0.tsv``: the
set name and utterance ids a validation of the same split writes, transcripts normalised as
``data.text_normalization`` does), so ``tiny-audio compare DIR RUN`` is a paired test on the same clips.
Usage::

    python scripts/whisper_wer.py MODEL DATASET [--split dev] [--config-name NAME] [--max-samples N] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from datasets import Audio, load_dataset
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from tiny_audio_pl.clips import normalize_target
from tiny_audio_pl.hub import find_parquet_files
from tiny_audio_pl.processing import decode_audio
from tiny_audio_pl.scoring import score, write_utterances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Whisper checkpoint folder or hub id")
    parser.add_argument("dataset", help="a folder of parquet files in the LoquaciousSet schema")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--config-name")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, help="only the first N clips (as data.max_eval_samples)")
    parser.add_argument("--out", type=Path, help="write the per-utterance scores here, as a run folder compare reads")
    parser.add_argument("--set-name", default="validation", help="the evaluation set's name, as the run being "
                        "compared names it (data.eval_sets; 'validation' for data.val_split)")
    args = parser.parse_args()
    files = find_parquet_files(Path(args.dataset), args.config_name, args.split)
    rows = load_dataset("parquet", data_files=files, split="train").cast_column("wav", Audio(decode=False))
    rows = rows.select(range(min(args.max_samples or len(rows), len(rows))))
    processor = WhisperProcessor.from_pretrained(args.model)
    model = WhisperForConditionalGeneration.from_pretrained(args.model).eval()
    rate = processor.feature_extractor.sampling_rate
    references, hypotheses, ids, audio_s = [], [], [], 0.0
    start = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i:i + args.batch_size]
        audio = [decode_audio(value, rate) for value in batch["wav"]]
        audio_s += sum(len(a) for a in audio) / rate
        features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features  # [B, 80, 3000]
        with torch.no_grad():
            tokens = model.generate(features, num_beams=1, do_sample=False, max_new_tokens=96)
        hypotheses += processor.batch_decode(tokens, skip_special_tokens=True)
        references += [normalize_target(text, "lower") for text in batch["text"]]  # as the data module does
        ids += [str(i) for i in batch["ID"]]
    seconds = time.perf_counter() - start
    scored = [score(args.set_name, i, r, h) for i, r, h in zip(ids, references, hypotheses)]
    wer = sum(u.errors for u in scored) / max(1, sum(u.reference_words for u in scored))  # as validation counts it
    print(f"{args.model} on {args.dataset} {args.split}: {len(references)} clips, {audio_s / 3600:.3f} h, "
          f"WER {100 * wer:.2f} %, real-time factor {seconds / audio_s:.3f}")
    if args.out:
        write_utterances(scored, args.out / "utterances" / "step=0.tsv")
        print(f"per-utterance results: {args.out / 'utterances' / 'step=0.tsv'} (tiny-audio compare {args.out} RUN)")


if __name__ == "__main__":
    main()
