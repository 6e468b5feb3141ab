"""Where a checkpoint's projected audio vectors sit among the decoder's token embeddings.

usage: python scripts/audio_vs_tokens.py CKPT SPEECH [--clips 8]

Prints, over the first clips of SPEECH's dev split, the audio vectors' median cosine with the mean
token embedding (tokens themselves: about 0.70 for SmolLM2-135M) and their median best cosine with
any token: the figures docs/experiments.md gives for projector_bias.
"""

import argparse
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from tiny_audio_pl.export import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a .ckpt written by tiny-audio fit, or an exported folder")
    parser.add_argument("speech", type=Path, help="a LoquaciousSet-schema folder with dev/*.parquet")
    parser.add_argument("--clips", type=int, default=8)
    args = parser.parse_args()
    model = load_model(args.ckpt, dtype="float32")
    tokens = model.decoder.get_input_embeddings().weight.detach().float()  # [V, D]
    mean = tokens.mean(0)
    rows = pq.read_table(sorted((args.speech / "dev").glob("*.parquet"))[0]).slice(0, args.clips).to_pylist()
    inputs = model.processor([row["wav"] for row in rows])  # decoded, features, padded
    with torch.no_grad():
        audio, counts = model.embed_audio(inputs["input_features"], inputs["feature_lengths"])  # [B, N, D]
    vectors = torch.cat([audio[i, :n] for i, n in enumerate(counts)])  # [sum N, D]
    best = (F.normalize(vectors, dim=-1) @ F.normalize(tokens, dim=-1).T).max(-1).values
    print(f"tokens: median cosine with their mean {F.cosine_similarity(tokens, mean[None], dim=-1).median():.2f}")
    print(f"audio vectors ({len(vectors)}): median cosine with the mean token "
          f"{F.cosine_similarity(vectors, mean[None], dim=-1).median():.2f}, median best cosine with a token "
          f"{best.median():.2f}")


if __name__ == "__main__":
    main()
