"""The alignment stage: CTC over the decoder's vocabulary, the projector trained alone, then the decoder's loss."""

import math

import torch

from conftest import DECODER, NO_WORKERS, SMOKE, WHISPER, run_here
from tiny_audio_pl.alignment import TokenAlignment
from tiny_audio_pl.checkpoint import read_checkpoint
from tiny_audio_pl.training import SpeechLLM


def test_the_transcripts_embeddings_in_order_read_as_the_transcript(tiny_model):
    embeddings = tiny_model.network.decoder.get_input_embeddings().weight.detach()  # [V, D]
    alignment = TokenAlignment(embeddings)
    tokens = [[5, 9, 9, 40], [77, 3]]
    blank = embeddings.mean(0)  # no direction about the mean: it reads as blank
    rows = [[blank, embeddings[5], embeddings[9], blank, embeddings[9], embeddings[40], blank],
            [embeddings[77], embeddings[77], blank, embeddings[3], blank, blank, blank]]
    audio = torch.stack([torch.stack(row) for row in rows])  # [2, 7, D]
    right = alignment(audio, [7, 5], tokens) / 6
    wrong = alignment(audio, [7, 5], [list(reversed(t)) for t in tokens]) / 6
    assert right < 1 < 4 < wrong  # nats per token (0.57 and 5.4 with the tiny decoder's 128-wide embeddings)


def test_alignment_stage_trains_the_projector_alone_then_the_decoder_takes_over(workdir, dev_batch):
    result = run_here(workdir, "fit", "-c", SMOKE, "--model.lora_rank", "4", "--model.align_steps", "20",
                      "--trainer.max_steps", "24", "--checkpoint.every_n_train_steps", "20",
                      "--trainer.val_check_interval", "20", "--data.max_eval_samples", "4", "--model.max_new_tokens",
                      "4", "--trainer.enable_progress_bar", "false", *NO_WORKERS)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = workdir / "lightning_logs/version_0/checkpoints"
    aligned, last = (read_checkpoint(folder / name) for name in ("step=20.ckpt", "last.ckpt"))
    # The stage's validation scores the projector alone (its best path; no decoder pass, so no audio gain).
    assert math.isnan(aligned["validation"]["metrics"]["val/audio_gain"]) and aligned["validation"]["step"] == 20
    aligned, last = aligned["state_dict"], last["state_dict"]
    assert all(not value.any() for name, value in aligned.items() if ".lora_B." in name)  # no decoder pass yet
    assert any(value.any() for name, value in last.items() if ".lora_B." in name)  # then the decoder's loss

    def alignment_loss(state: dict | None) -> float:
        torch.manual_seed(0)
        model = SpeechLLM(encoder=WHISPER, decoder=DECODER, projector_hidden=256,
                          lora_rank=4, align_steps=1).eval()
        if state is not None:
            model.network.load_trained(state, "test")
        with torch.no_grad():
            audio, lengths = model.network.embed_audio(dev_batch["features"], dev_batch["feature_lengths"])
            return model.alignment(audio, lengths, [t[:-1] for t in model.targets(dev_batch)]).item()

    assert alignment_loss(aligned) < 0.8 * alignment_loss(None)  # on clips it never saw
