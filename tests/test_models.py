import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import DECODER, HUBERT, SPEECH, WHISPER, connected_data
from tiny_audio_pl.decoding import Decoding
from tiny_audio_pl.encoder import AudioEncoder
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.evaluation import Evaluation
from tiny_audio_pl.modeling import IGNORE, TinyAudioConfig, TinyAudioModel


@pytest.mark.parametrize("path, prefix", [(WHISPER, "model.encoder."), (HUBERT, "hubert.")])
def test_encoder_weights_are_the_checkpoints(path, prefix):
    """transformers 5 can silently leave a Whisper encoder random: compare every tensor to the file."""
    saved = {k[len(prefix):]: v for k, v in load_file(f"{path}/model.safetensors").items() if k.startswith(prefix)}
    loaded = AudioEncoder(path).model.state_dict()
    assert saved, "no encoder tensors found in the checkpoint"
    common = saved.keys() & loaded.keys()
    assert len(common) >= len(saved) - 1  # HuBERT's unused masked_spec_embed may be absent
    for key in common:
        assert torch.equal(loaded[key], saved[key]), key


def test_labels_cover_only_the_transcript_and_end_of_turn(tiny_model):
    net, processor = tiny_model.network, tiny_model.network.processor
    audio = torch.randn(2, 5, net.decoder.config.hidden_size)
    targets = processor.targets(["the red fox", "a dog"])
    layout = net.assemble(audio, [5, 3], net.chat_prompts(None, 2), targets)
    labels, length = layout.labels, layout.labels.shape[1]
    prompt_len = len(processor.prompt.prefix_ids) + len(processor.prompt.suffix_ids)
    for i, n in enumerate([5, 3]):
        start = prompt_len + n
        assert labels[i, :start].eq(IGNORE).all()
        assert labels[i, start:start + len(targets[i])].tolist() == targets[i]
        assert labels[i, start + len(targets[i]):].eq(IGNORE).all()  # right padding
        assert layout.mask[i].sum() == start + len(targets[i])
        # the audio sits right after the prefix
        p = len(processor.prompt.prefix_ids)
        assert torch.equal(layout.embeds[i, p:p + n], audio[i, :n])
    # the layout says which positions predict a label: each one just before its label
    assert torch.equal(layout.predicting + 1, torch.nonzero(labels.flatten() != IGNORE).flatten())
    assert layout.predicting[0] // length == 0 and layout.predicting[-1] // length == 1
    assert processor.tokenizer.decode(targets[0]) == "the red fox<|im_end|>"


def test_loss_equals_full_vocabulary_loss(tiny_model, dev_batch):
    """Computing the LM head only at labelled positions gives the same objective as the full logits."""
    net = tiny_model.network
    with torch.no_grad():
        loss = tiny_model(dev_batch)
        audio, lengths = net.embed_audio(dev_batch["features"], dev_batch["feature_lengths"])
        layout = net.assemble(audio, lengths, net.chat_prompts(None, len(lengths)), dev_batch["targets"])
        embeds, mask, labels = layout.embeds, layout.mask, layout.labels
        logits = net.decoder(inputs_embeds=embeds, attention_mask=mask).logits  # [B, L, V]
        full = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def _clips(batch: dict, rows: list[int]) -> dict:
    """The clips ``rows`` of a collated batch, as a batch of their own."""
    picked = {key: [batch[key][i] for i in rows] for key in ("text", "targets", "id", "duration", "prompt")}
    return {**picked, "features": batch["features"][rows], "feature_lengths": batch["feature_lengths"][rows]}


def _tally(model, batch: dict, name: str):
    """The grounding sums the evaluation gathers for ``batch``, as the loop's validation step asks it."""
    evaluation = Evaluation(logged_examples=0)
    evaluation.score(model.network, {**batch, "set": name}, batch["targets"])
    return evaluation.tallies[name]


def test_grounding_losses_use_the_neighbours_audio_and_no_audio(tiny_model, dev_batch):
    net, targets = tiny_model.network, dev_batch["targets"]
    tally = _tally(tiny_model, dev_batch, "dev")
    metrics = tally.metrics()
    with torch.no_grad():
        audio, lengths = net.embed_audio(dev_batch["features"], dev_batch["feature_lengths"])
        right = net.loss(audio, lengths, targets).item()
        wrong = net.loss(audio.roll(1, 0), lengths[-1:] + lengths[:-1], targets).item()
        # no audio: the chat prompt alone before each transcript, straight through the decoder
        prompt = net.processor.prompt
        nll = [F.cross_entropy(net.decoder(torch.tensor([prompt.prefix_ids + prompt.suffix_ids + t])).logits[
            0, -len(t) - 1:-1], torch.tensor(t), reduction="sum").item() for t in targets]
    assert tally.tokens == tally.paired_tokens == sum(len(t) for t in targets)
    assert metrics["loss"] == pytest.approx(right, rel=1e-5)
    assert metrics["loss_wrong_audio"] == pytest.approx(wrong, rel=1e-5) and wrong != pytest.approx(right)
    assert metrics["audio_gain"] == pytest.approx(wrong - right, rel=1e-4)
    assert metrics["loss_no_audio"] == pytest.approx(sum(nll) / tally.tokens, rel=1e-5)

    same = _tally(tiny_model, _clips(dev_batch, [0, 0]), "same")
    assert same.metrics()["audio_gain"] == pytest.approx(0.0, abs=1e-6)  # the neighbour's audio is the clip's own
    alone = _tally(tiny_model, _clips(dev_batch, [0]), "alone")
    assert alone.paired_tokens == 0 and math.isnan(alone.metrics()["audio_gain"])  # no neighbour to swap with


def test_batched_decoding_equals_one_by_one(tiny_model, dev_batch):
    net = tiny_model.network
    batched = net.transcribe(dev_batch["features"], dev_batch["feature_lengths"])
    single = [net.transcribe(dev_batch["features"][i:i + 1, :, :n], dev_batch["feature_lengths"][i:i + 1])[0]
              for i, n in enumerate(dev_batch["feature_lengths"].tolist())]
    assert len(set(dev_batch["feature_lengths"].tolist())) > 1  # the batch really is padded
    assert any(batched)
    assert batched == single


def test_decoding_options_beam_search_repetition_guard_and_duration_cap(tiny_model, dev_batch):
    """One beam is greedy; no token pair repeats under no_repeat_ngram_size 2; max_tokens_per_second ends each
    clip's transcript by its duration. Each is a value passed to the call: the model's own settings never change."""
    net = tiny_model.network
    features, lengths = dev_batch["features"], dev_batch["feature_lengths"]
    own = Decoding.of(net.config)
    greedy = net.generate(features, lengths)
    assert torch.equal(net.generate(features, lengths, decoding=own.but(beam_size=1)), greedy)
    stops = {net.processor.end_id, net.processor.tokenizer.pad_token_id}
    for row in net.generate(features, lengths, decoding=own.but(beam_size=3, no_repeat_ngram=2)).tolist():
        pairs = [tuple(row[i:i + 2]) for i in range(len(row) - 1) if not stops & set(row[i:i + 2])]
        assert len(pairs) == len(set(pairs))
    capped = net.generate(features, lengths, decoding=own.but(max_tokens_per_second=0.5))
    for row, duration in zip(capped.tolist(), (lengths / 100).tolist()):  # Whisper: 100 mel frames a second
        assert len([t for t in row if t not in stops]) <= math.ceil(0.5 * (duration + 0.04)) + 1  # + audio rounding
    assert capped.shape[1] < greedy.shape[1]
    assert Decoding.of(net.config) == own  # a call's decoding is its own
    with pytest.raises(ValueError, match="not decoding options: top_k"):
        own.but(top_k=5)
    with pytest.raises(UsageError, match="max_new_tokens and beam_size must be >= 1"):
        own.but(beam_size=0)


def test_frozen_models_stay_frozen_in_train_mode(tiny_model):
    tiny_model.train()
    net = tiny_model.network
    try:
        assert not net.encoder.training and not net.decoder.training
        assert net.projector.training
        assert all(not p.requires_grad for p in net.encoder.parameters())
        assert all(not p.requires_grad for p in net.decoder.parameters())
        assert all(p.requires_grad for p in net.projector.parameters())
    finally:
        tiny_model.eval()


def test_hubert_encoder_runs_through_the_same_model():
    from tiny_audio_pl.training import SpeechLLM

    model = SpeechLLM(encoder=HUBERT, decoder=DECODER, projector_hidden=32)
    waveform, lengths = torch.randn(2, 16_000), torch.tensor([16_000, 12_000])
    audio, audio_lengths = model.network.embed_audio(waveform, lengths)
    # HuBERT's 320x downsampling gives 49 and 37 frames; stacked by 2: 25 and 19 audio tokens of the decoder's width
    assert audio.shape == (2, 25, 128) and audio_lengths == [25, 19]
    loss = model({"features": waveform, "feature_lengths": lengths, "text": ["a", "b c"]})
    loss.backward()
    grads = [p.grad for p in model.network.projector.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.network.encoder.parameters())  # frozen: no gradient reaches it


@pytest.mark.parametrize("path", [WHISPER, HUBERT])
def test_encoding_does_not_depend_on_batch_padding(path):
    """Padded frames are masked in attention and zeroed in the output, so frame stacking cannot leak them."""
    data = connected_data(dataset=SPEECH, config_name=None, batch_size=4, num_workers=0, encoder=path,
                            decoder=DECODER)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()[0]))
    encoder = AudioEncoder(path).eval()
    with torch.no_grad():
        frames, lengths = encoder(batch["features"], batch["feature_lengths"])
        for i, n in enumerate(batch["feature_lengths"].tolist()):
            alone, alone_length = encoder(batch["features"][i:i + 1, ..., :n], batch["feature_lengths"][i:i + 1])
            assert alone_length.item() == lengths[i] == alone.shape[1]
            assert torch.allclose(alone[0], frames[i, :lengths[i]], atol=1e-4)
            assert frames[i, lengths[i]:].eq(0).all()


def test_whisper_full_window_switch_pads_to_thirty_seconds(dev_batch):
    trimmed, full = AudioEncoder(WHISPER).eval(), AudioEncoder(WHISPER, full_window=True).eval()
    with torch.no_grad():
        short, lengths = trimmed(dev_batch["features"], dev_batch["feature_lengths"])
        window, window_lengths = full(dev_batch["features"], dev_batch["feature_lengths"])
    assert short.shape[1] == dev_batch["features"].shape[-1] // 2 < 1500 == window.shape[1]
    assert torch.equal(lengths, window_lengths)
    assert window[:, lengths.max():].eq(0).all()  # only each clip's own frames go on to the projector
    assert not torch.allclose(window[0, :lengths[0]], short[0, :lengths[0]], atol=1e-3)  # attends to the silence


def test_bf16_frozen_models_train_the_projector(dev_batch):
    from tiny_audio_pl.training import SpeechLLM

    model = SpeechLLM(encoder=WHISPER, decoder=DECODER, projector_hidden=32, frozen_dtype="bfloat16")
    assert model.network.decoder.dtype == torch.bfloat16 and model.network.projector.gate.weight.dtype == torch.float32
    loss = model(dev_batch)
    loss.backward()
    assert torch.isfinite(loss) and model.network.projector.down.weight.grad.abs().sum() > 0


def test_nonfinite_gradients_skip_the_step_and_too_many_stop_the_run():
    from tiny_audio_pl.training import SpeechLLM

    model = SpeechLLM(encoder=WHISPER, decoder=DECODER, projector_hidden=16, max_nonfinite_steps=3)
    model.log = lambda *args, **kwargs: None  # no trainer attached
    for _ in range(2):
        for p in model.network.projector.parameters():
            p.grad = torch.full_like(p, float("nan"))
        model.on_before_optimizer_step(None)
        assert all(p.grad is None for p in model.network.projector.parameters())
    for p in model.network.projector.parameters():
        p.grad = torch.ones_like(p)
    model.on_before_optimizer_step(None)  # a good step resets the count
    assert model._nonfinite_in_row == 0 and model._nonfinite_total == 2
    with pytest.raises(UsageError, match="3 times in a row"):
        for _ in range(3):
            for p in model.network.projector.parameters():
                p.grad = torch.full_like(p, float("inf"))
            model.on_before_optimizer_step(None)


def test_projector_bias_starts_at_the_mean_token_embedding_and_is_saved(tmp_path):
    model = TinyAudioModel(TinyAudioConfig(encoder=WHISPER, decoder=DECODER, projector_hidden=16, projector_bias=True))
    embeddings = model.decoder.get_input_embeddings().weight
    assert torch.allclose(model.projector.bias, embeddings.mean(0))
    with torch.no_grad():
        model.projector.bias.add_(1.0)  # as if trained
    model.save_pretrained(tmp_path)
    loaded = TinyAudioModel.from_pretrained(tmp_path)
    assert loaded.config.projector_bias and torch.equal(loaded.projector.bias, model.projector.bias)
