"""Write random-weight checkpoints with the production (or laptop) architectures, for speed checks with no download.

``openai/whisper-large-v3-turbo`` (32-layer 1280-wide encoder, 128 mel bins) and
``HuggingFaceTB/SmolLM3-3B`` (36 layers, 2048 wide, 128k vocabulary) are rebuilt from their
published shapes with random weights, in bf16. The decoder borrows the tiny asset's tokenizer and
chat template (its ids are valid in the 128k vocabulary). Throughput and memory of a training step
depend only on the shapes, so ``tiny-audio fit -c configs/whisper.yaml --model.encoder OUT/whisper
--model.decoder OUT/smollm3 ...`` measures the real recipe offline. ``--laptop`` writes ``configs/laptop.yaml``'s
models instead, in fp32:
Whisper tiny.en (``OUT/whisper-tiny.en``) and SmolLM2-135M-Instruct (``OUT/smollm2-135m``), whose chat
template, like SmolLM2's, writes a default system message when none is given (the tiny tokenizer makes it
longer in tokens than SmolLM2's 29). Usage::

    python scripts/make_real_size_models.py OUT_DIR [--laptop]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

WHISPER_LARGE_V3_TURBO = dict(vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32,
                              encoder_attention_heads=20, encoder_ffn_dim=5120, decoder_layers=4,
                              decoder_attention_heads=20, decoder_ffn_dim=5120, max_source_positions=1500,
                              max_target_positions=448)
SMOLLM3_3B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=65536,
                  rope_theta=5_000_000.0, tie_word_embeddings=True, no_rope_layer_interval=4)
WHISPER_TINY_EN = dict(vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
                       encoder_ffn_dim=1536, decoder_layers=4, decoder_attention_heads=6, decoder_ffn_dim=1536,
                       max_source_positions=1500, max_target_positions=448)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rope_theta=100_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
# SmolLM2-Instruct's behaviour: its default system message when the conversation has none.
ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_DECODER = ASSETS / "tiny-smollm3"


def main(out: Path) -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        whisper = WhisperForConditionalGeneration(WhisperConfig(**WHISPER_LARGE_V3_TURBO)).to(torch.bfloat16)
    whisper.save_pretrained(out / "whisper")
    WhisperFeatureExtractor(feature_size=128).save_pretrained(out / "whisper")
    del whisper
    with torch.device(device):
        decoder = SmolLM3ForCausalLM(SmolLM3Config(**SMOLLM3_3B, eos_token_id=2, pad_token_id=3, bos_token_id=None))
    decoder.to(torch.bfloat16).save_pretrained(out / "smollm3")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_DECODER / name, out / "smollm3" / name)
    print(f"wrote {out}/whisper and {out}/smollm3")


def laptop(out: Path) -> None:
    torch.manual_seed(0)
    WhisperForConditionalGeneration(WhisperConfig(**WHISPER_TINY_EN)).save_pretrained(out / "whisper-tiny.en")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out / "whisper-tiny.en")
    decoder = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, bos_token_id=1, eos_token_id=2, pad_token_id=3))
    decoder.save_pretrained(out / "smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DECODER / name, out / "smollm2-135m" / name)
    shutil.copy(ASSETS / "smollm2_chat_template.jinja", out / "smollm2-135m" / "chat_template.jinja")
    print(f"wrote {out}/whisper-tiny.en and {out}/smollm2-135m")


if __name__ == "__main__":
    (laptop if "--laptop" in sys.argv[2:] else main)(Path(sys.argv[1]))
