"""The shared prompt computed once: the same loss, gradients and transcripts as running every row's whole prompt."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from conftest import DECODER, HUBERT, WHISPER
from tiny_audio_pl.modeling import TinyAudioConfig, TinyAudioModel
from tiny_audio_pl.shared_prompt import common_prefix

PROMPTS = [None, "Say what you hear: <audio>", None, "Is the speaker male (M) or female (F)? <audio>"]


def _model(encoder: str, lora_rank: int) -> TinyAudioModel:
    torch.manual_seed(0)
    net = TinyAudioModel(TinyAudioConfig(encoder=encoder, decoder=DECODER, projector_hidden=64, lora_rank=lora_rank))
    for name, parameter in net.decoder.named_parameters():
        if "lora_B" in name:  # B starts at zero: move it, so the adapters change the prompt's keys and values
            torch.nn.init.normal_(parameter, std=0.1)
    return net


def _inputs(net: TinyAudioModel) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Four clips of 0.6-1.9 s of noise (their features padded) and four targets of different lengths."""
    rng = np.random.default_rng(0)
    noise = [rng.standard_normal(int(s * 16_000)).astype(np.float32) * 0.1 for s in (1.9, 0.6, 1.2, 0.9)]
    inputs = net.processor(noise)
    targets = net.processor.targets(["the cat sat on the mat", "a dog", "hello there world", "m"])
    return inputs["input_features"], inputs["feature_lengths"], targets


def _whole_prompt_loss(net: TinyAudioModel, audio: torch.Tensor, lengths: list[int], targets: list[list[int]]
                       ) -> torch.Tensor:
    """The loss as it was computed before: every row's whole prompt through the decoder, no cache."""
    layout = net.assemble(audio, lengths, net.chat_prompts(PROMPTS, len(targets)), targets)
    hidden = net.decoder.get_decoder()(inputs_embeds=layout.embeds, use_cache=False).last_hidden_state
    logits = net.decoder.get_output_embeddings()(hidden.flatten(0, 1)[layout.predicting])
    return F.cross_entropy(logits, layout.labels.flatten()[layout.predicting + 1], reduction="sum")


@pytest.mark.parametrize("encoder", [WHISPER, HUBERT], ids=["whisper", "hubert"])
@pytest.mark.parametrize("lora_rank", [0, 4], ids=["projector", "lora"])
def test_loss_and_every_trained_gradient_equal_the_whole_prompts(encoder, lora_rank):
    net = _model(encoder, lora_rank)
    features, feature_lengths, targets = _inputs(net)
    chats = net.chat_prompts(PROMPTS, len(targets))
    assert 0 < len(common_prefix(chats)) < min(len(c.prefix_ids) for c in chats)  # several prompts: the common part

    results = []
    for loss_of in (lambda a, n: net.loss(a, n, targets, PROMPTS, reduction="sum"),
                    lambda a, n: _whole_prompt_loss(net, a, n, targets)):
        net.zero_grad()
        loss = loss_of(*net.embed_audio(features, feature_lengths))
        loss.backward()
        results.append((loss.item(), {k: p.grad.clone() for k, p in net.trainable_parameters().items()}))
    (cached, cached_grads), (whole, whole_grads) = results
    assert cached == pytest.approx(whole, rel=1e-6)
    assert cached_grads.keys() == whole_grads.keys()
    assert any(".lora_A." in k for k in cached_grads) == bool(lora_rank)
    for name, grad in whole_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=2e-5 * grad.abs().max().item(), msg=name)


def test_the_prompt_is_computed_once_for_the_life_of_a_frozen_decoder_and_per_call_with_adapters():
    for lora_rank, expected in ((0, 1), (4, 3)):
        net = _model(WHISPER, lora_rank)
        features, feature_lengths, targets = _inputs(net)
        runs: list[tuple[int, ...]] = []

        def counted(ids: tuple[int, ...], run_prompt=net.shared_prompt._run, runs=runs) -> list:
            runs.append(ids)
            return run_prompt(ids)

        net.shared_prompt._run = counted
        audio, lengths = net.embed_audio(features, feature_lengths)
        for _ in range(3):
            net.loss(audio[:1], lengths[:1], targets[:1])  # one prompt: the whole prefix is shared
        assert len(runs) == expected and runs[0] == tuple(net.processor.prompt.prefix_ids)


@pytest.mark.parametrize("beams", [1, 3])
def test_decoding_from_the_shared_prompt_writes_what_the_whole_prompts_write(beams):
    net = _model(WHISPER, 4).eval()
    features, feature_lengths, _ = _inputs(net)
    vars(net.config).update(beam_size=beams, max_new_tokens=12)
    with torch.no_grad():
        audio, lengths = net.embed_audio(features, feature_lengths)
        cached = net.generate_from_audio(audio, lengths, PROMPTS)
        layout = net.assemble(audio, lengths, net.chat_prompts(PROMPTS, len(lengths)), padding="left")
        config = GenerationConfig(max_new_tokens=12, do_sample=False, num_beams=beams,
                                  eos_token_id=net.processor.end_id, pad_token_id=net.processor.tokenizer.pad_token_id)
        whole = net.decoder.generate(inputs_embeds=layout.embeds, attention_mask=layout.mask, generation_config=config)
    assert torch.equal(cached, whole)
    assert len(set(map(tuple, cached.tolist()))) > 1  # the rows say different things: a check that can fail
