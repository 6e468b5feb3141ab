"""Regenerate the tiny offline assets under ``assets/`` (run from the repository root).

The smoke config and the tests must run with no network, so the repository carries miniature
versions of everything the production recipe downloads:

- ``assets/tiny-speech``: real synthesized speech (espeak-ng) in the LoquaciousSet parquet schema
  (``ID``, ``duration``, ``wav`` as {bytes, path}, ``spk_id``, ``sex``, ``text`` in upper case),
  with ``train`` and ``dev`` splits. Sentences come from a small grammar so the decoder cannot
  guess them: the audio has to carry the words.
- ``assets/clips``: the first two dev clips as plain WAV files, with their transcripts.
- ``assets/tiny-smollm3``: a SmolLM3-architecture decoder with a byte-level BPE tokenizer trained
  on the grammar's text, pretrained briefly under a plain ChatML layout to repeat a sentence shown in
  its context (see ``make_decoder``), so that, like a real instruct model, it can read its input,
  answers in the assistant turn and stops with ``<|im_end|>``. It is saved with the tracked
  ``chat_template.jinja``, a stand-in for SmolLM3's (the dated metadata block, the reasoning switch, the
  empty think pair, ``/system_override``), so the tests meet the prompt the recipe trains on.
- ``assets/tiny-whisper``: a full Whisper-architecture checkpoint (encoder and decoder, as
  ``openai/whisper-large-v3-turbo`` is published), 128 mel bins, pretrained briefly as a speech
  recogniser on other synthesized sentences (only its encoder is used here).
- ``assets/tiny-hubert``: a HuBERT-architecture CTC checkpoint (as ``facebook/hubert-xlarge-ls960-ft``
  is published) with random weights and the real 320x convolutional downsampling (50 frames/s).

Everything is seeded (CPU, one thread); needs ``espeak-ng`` (``apt-get install espeak-ng``) and the
package installed (``pip install -e .``), whose prompt and encoder code the pretraining reuses. Usage::

    python scripts/make_tiny_assets.py            # all assets
    python scripts/make_tiny_assets.py speech     # one of: speech, clips, decoder, whisper, hubert
"""

from __future__ import annotations

import datetime
import io
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch

ASSETS = Path("assets")
SAMPLE_RATE = 16_000

SUBJECTS = ["the old man", "a small dog", "my sister", "the teacher", "our neighbour", "the green bird",
            "a tired farmer", "the young pilot", "his brother", "the red fox", "a quiet child", "the doctor"]
VERBS = ["found", "painted", "carried", "watched", "opened", "cleaned", "sold", "lost", "built", "moved",
         "counted", "dropped"]
OBJECTS = ["a wooden box", "the blue door", "seven apples", "an old map", "the heavy stone", "three letters",
           "a broken chair", "the silver key", "twelve candles", "a paper boat", "the long rope", "two baskets"]
PLACES = ["near the river", "in the kitchen", "after dinner", "before noon", "at the station", "on monday",
          "under the bridge", "by the window", "in the garden", "during the storm", "at midnight", "on the hill"]
VOICES = [("en-us", "M"), ("en-gb", "M"), ("en-us+f3", "F"), ("en-gb-scotland", "M"), ("en-us+f2", "F"),
          ("en-029", "M")]


def sentence(rng: random.Random) -> str:
    """One sentence of the grammar, lower case, e.g. 'the red fox carried a wooden box near the river'."""
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.6:
        words.append(rng.choice(PLACES))
    return " ".join(words)


def synthesize(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng speech for ``text`` as float32 mono at 16 kHz."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", tmp.name, text], check=True)
        audio, rate = sf.read(tmp.name, dtype="float32")
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def make_speech(num_train: int = 80, num_dev: int = 20) -> None:
    """Synthesize the tiny LoquaciousSet-schema dataset (two train shards so two workers can share)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Audio, Features, Value

    rng = random.Random(0)
    features = Features({"ID": Value("string"), "duration": Value("float32"),
                         "wav": Audio(sampling_rate=SAMPLE_RATE, decode=False), "spk_id": Value("string"),
                         "sex": Value("string"), "text": Value("string")})
    out = ASSETS / "tiny-speech"
    shutil.rmtree(out, ignore_errors=True)
    for split, count, shards in [("train", num_train, 2), ("dev", num_dev, 1)]:
        rows = []
        for i in range(count):
            text = sentence(rng)
            voice, sex = rng.choice(VOICES)
            audio = synthesize(text, voice, speed=rng.randint(150, 190))
            buffer = io.BytesIO()
            sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            uid = f"{split}-{i:04d}"
            rows.append({"ID": uid, "duration": round(len(audio) / SAMPLE_RATE, 3),
                         "wav": {"bytes": buffer.getvalue(), "path": f"{uid}.flac"},
                         "spk_id": voice, "sex": sex, "text": text.upper()})
        (out / split).mkdir(parents=True)
        for shard in range(shards):
            part = rows[shard::shards]
            # pyarrow directly: datasets' own Audio encoding would need torchcodec. The schema still
            # carries the datasets feature metadata, so the audio column loads as an Audio feature.
            table = pa.Table.from_pylist(part, schema=features.arrow_schema)
            pq.write_table(table, out / split / f"{split}-{shard:05d}.parquet")
    print(f"speech: {num_train} train + {num_dev} dev clips in {out}")


def make_clips(count: int = 2) -> None:
    """The first dev clips as plain 16 kHz WAV files, to try ``tiny-audio transcribe`` on (docs/using-a-model.md)."""
    import pyarrow.parquet as pq

    out = ASSETS / "clips"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    rows = pq.read_table(ASSETS / "tiny-speech" / "dev" / "dev-00000.parquet").slice(0, count).to_pylist()
    lines = []
    for row in rows:
        audio, rate = sf.read(io.BytesIO(row["wav"]["bytes"]), dtype="int16")
        sf.write(out / f"{row['ID']}.wav", audio, rate, subtype="PCM_16")
        lines.append(f"{row['ID']}.wav\t{row['text']}")
    (out / "transcripts.tsv").write_text("file\ttext\n" + "\n".join(lines) + "\n")
    print(f"clips: {count} dev clips as WAV in {out}")


PRETRAINING_TEMPLATE = (  # the plain ChatML layout the tiny decoder was pretrained on
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_decoder(steps: int = 2500) -> None:
    """Train a byte-level BPE tokenizer and pretrain a tiny SmolLM3 as a transcription-style chat model.

    A real instruct LLM can read a sentence from its context, however it is presented, and repeat it
    in its answer; that is what lets a projector teach it to read audio. The tiny decoder learns the
    same in miniature: the user turn ``Transcribe: X`` holds the sentence's tokens (30 %), the same
    tokens each repeated 1-5 times (50 %, so it learns to read slow, stretched input as audio
    embeddings are), or the bare ``<audio>`` placeholder (20 %, so it knows the language of the
    grammar), and the assistant answers with the sentence and ``<|im_end|>``. The loss is on the
    answer only. This runs under a plain ChatML layout; :func:`adapt_decoder` then teaches it its own
    template's prompt.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, SmolLM3Config, SmolLM3ForCausalLM

    from tiny_audio_pl.processing import render_chat

    rng = random.Random(1)
    torch.manual_seed(1)
    corpus = [sentence(rng) for _ in range(20_000)]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    prompts = ["system", "user", "assistant", "Transcribe: <audio>", "/no_think"]
    bpe.train_from_iterator(corpus + prompts * 100, trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>",
                                        pad_token="<|pad|>", chat_template=PRETRAINING_TEMPLATE)
    prompt = render_chat(tokenizer, "/no_think", "Transcribe: <audio>")
    config = SmolLM3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = SmolLM3ForCausalLM(config)
    train_decoder(model, tokenizer, corpus, rng, lambda: prompt, steps, 3e-3)
    out = ASSETS / "tiny-smollm3"
    tokenizer.chat_template = (out / "chat_template.jinja").read_text()  # the tracked stand-in of SmolLM3's
    shutil.rmtree(out, ignore_errors=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"decoder: {sum(p.numel() for p in model.parameters()):,} parameters in {out}")
    adapt_decoder()


def adapt_decoder(steps: int = 300) -> None:
    """Continue the tiny decoder's pretraining under its own chat template, as a real instruct model is trained.

    Each batch is prompted as the stand-in of SmolLM3's template writes it, with a system message drawn
    from those the configs and tests use and the date of a random day of 2025-2030 (so no day's date is
    special to it). Seeded on its own: ``python scripts/make_tiny_assets.py adapt`` on the pretrained
    decoder gives what ``decoder`` gives.
    """
    from transformers import AutoTokenizer, SmolLM3ForCausalLM

    from tiny_audio_pl.processing import ChatPrompt, render_chat

    rng = random.Random(2)
    torch.manual_seed(2)
    out = ASSETS / "tiny-smollm3"
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = SmolLM3ForCausalLM.from_pretrained(out)
    corpus = [sentence(rng) for _ in range(20_000)]
    today = f"Today Date: {datetime.date.today():%d %B %Y}"
    systems = ["/no_think", "", "/think", "/no_think /system_override Write what is said."]

    def prompt() -> ChatPrompt:
        day = datetime.date(2025, 1, 1) + datetime.timedelta(days=rng.randrange(6 * 365))
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": rng.choice(systems)}, {"role": "user", "content": "Transcribe: <audio>"}],
            tokenize=False, add_generation_prompt=True).replace(today, f"Today Date: {day:%d %B %Y}")
        before, after = text.split("<audio>")
        return ChatPrompt(tokenizer(before, add_special_tokens=False).input_ids,
                          tokenizer(after, add_special_tokens=False).input_ids)

    assert render_chat(tokenizer, "/no_think", "Transcribe: <audio>")  # the template renders
    train_decoder(model, tokenizer, corpus, rng, prompt, steps, 1e-3)
    model.eval().save_pretrained(out)
    print(f"decoder adapted to its chat template in {out}")


def train_decoder(model: torch.nn.Module, tokenizer: Any, corpus: list[str], rng: random.Random,
                  prompt: Callable[[], Any], steps: int, lr: float) -> None:
    """Batches of 32 examples (see :func:`make_decoder`), each batch under one ``prompt()``; AdamW, one cycle."""
    from tiny_audio_pl.processing import end_of_turn

    placeholder = tokenizer("<audio>", add_special_tokens=False).input_ids
    end = end_of_turn(tokenizer)
    pad = model.config.pad_token_id

    def example(chat: Any) -> tuple[list[int], list[int]]:
        ids = tokenizer(rng.choice(corpus), add_special_tokens=False).input_ids
        draw = rng.random()
        shown = placeholder if draw < 0.2 else ids if draw < 0.5 else [i for i in ids for _ in range(rng.randint(1, 5))]
        context = chat.prefix_ids + shown + chat.suffix_ids
        return context + ids + [end], [-100] * len(context) + ids + [end]

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        chat = prompt()
        rows = [example(chat) for _ in range(32)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        loss = model(input_ids=input_ids, attention_mask=input_ids != pad, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"decoder step {step} loss {loss.item():.3f}", flush=True)


def make_whisper(steps: int = 800) -> None:
    """A full Whisper-architecture checkpoint, pretrained briefly as Whisper is: speech in, transcript out.

    The real encoder arrives pretrained, with frames that carry what was said; a random one would
    turn the smoke run into a test of memorising noise. A few minutes of sequence-to-sequence
    training on fresh espeak-ng sentences (not the dataset's clips), with the tiny decoder's BPE
    tokens as Whisper's vocabulary, gives the tiny encoder such frames (dense, read through
    cross-attention, unlike the spiky frames a CTC objective leaves). Build the decoder first.
    """
    from transformers import AutoTokenizer, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from tiny_audio_pl.encoder import AudioEncoder
    from tiny_audio_pl.processing import TinyAudioProcessor

    rng = random.Random(2)
    torch.manual_seed(2)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-smollm3")
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=128, d_model=96, encoder_layers=3,
                           encoder_attention_heads=4, encoder_ffn_dim=384, decoder_layers=2, decoder_attention_heads=4,
                           decoder_ffn_dim=384, max_source_positions=1500, max_target_positions=64,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=start, eos_token_id=end,
                           decoder_start_token_id=start, suppress_tokens=None, begin_suppress_tokens=None)
    extractor = WhisperFeatureExtractor(feature_size=128)
    out = ASSETS / "tiny-whisper"
    shutil.rmtree(out, ignore_errors=True)
    whisper = WhisperForConditionalGeneration(config)

    clips = []
    for _ in range(600):
        text = sentence(rng)
        audio = synthesize(text, rng.choice(VOICES)[0], speed=rng.randint(140, 200))
        features = extractor(audio, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="np")
        clips.append((features["input_features"][0], text))
    whisper.save_pretrained(out)
    extractor.save_pretrained(out)
    encoder = AudioEncoder(str(out))  # the trimmed-window encoder the projector will sit on
    encoder.model = whisper.model.encoder
    optimizer = torch.optim.AdamW(whisper.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    whisper.train()
    for step in range(steps):
        chosen = rng.sample(clips, 16)
        features, lengths = TinyAudioProcessor.pad([f for f, _ in chosen])
        frames, _ = encoder(features, lengths)  # [B, T, D], padding zeroed
        labels = tokenizer([t + "<|im_end|>" for _, t in chosen], add_special_tokens=False, padding=True,
                           return_tensors="pt")
        targets = labels.input_ids.masked_fill(labels.attention_mask == 0, -100)
        loss = whisper(encoder_outputs=(frames,), labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(whisper.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"whisper step {step} loss {loss.item():.3f}")
    whisper.eval().save_pretrained(out)
    print(f"whisper: {sum(p.numel() for p in whisper.model.encoder.parameters()):,} encoder parameters in {out}")


def make_hubert() -> None:
    """A HuBERT-architecture CTC checkpoint with random weights (layer-norm variant, like the XL)."""
    from transformers import HubertConfig, HubertForCTC, Wav2Vec2FeatureExtractor

    torch.manual_seed(3)
    config = HubertConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, conv_dim=(32,) * 7, feat_extract_norm="layer",
                          do_stable_layer_norm=True, conv_bias=True, num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4)
    out = ASSETS / "tiny-hubert"
    shutil.rmtree(out, ignore_errors=True)
    HubertForCTC(config).save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, do_normalize=True,
                             return_attention_mask=True).save_pretrained(out)
    print(f"hubert: {out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    builders = {"speech": make_speech, "clips": make_clips, "decoder": make_decoder, "adapt": adapt_decoder,
                "whisper": make_whisper, "hubert": make_hubert}
    # tiny Whisper's vocabulary is the tiny decoder's tokenizer: keep this order
    for name in sys.argv[1:] or [name for name in builders if name != "adapt"]:  # decoder adapts too
        builders[name]()
