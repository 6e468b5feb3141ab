import pytest
import torch

from tiny_audio_pl.projector import Projector, stack_frames


def test_stack_frames_concatenates_neighbours_and_pads_the_end():
    frames = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # [B=2, T=5, D=3]
    stacked = stack_frames(frames, 2)
    assert stacked.shape == (2, 3, 6)
    assert torch.equal(stacked[0, 0], torch.cat([frames[0, 0], frames[0, 1]]))
    assert torch.equal(stacked[1, 2], torch.cat([frames[1, 4], torch.zeros(3)]))


@pytest.mark.parametrize("k, length, tokens", [(1, 7, 7), (2, 7, 4), (2, 8, 4), (4, 9, 3)])
def test_projector_output_shape_and_lengths(k, length, tokens):
    projector = Projector(encoder_dim=16, decoder_dim=24, stack=k, hidden=32)
    out = projector(torch.randn(3, length, 16))
    assert out.shape == (3, tokens, 24)
    assert projector.output_lengths(torch.tensor([length, 1])).tolist() == [tokens, 1]


def test_projector_parameter_count_production_shape():
    # Whisper large-v3-turbo (1280) -> SmolLM3-3B (2048), k = 2, hidden 5120, on the meta device (no memory).
    with torch.device("meta"):
        projector = Projector(encoder_dim=1280, decoder_dim=2048, stack=2, hidden=5120)
    expected = 2 * 2560 * 5120 + 5120 * 2048 + 2560 + 2048  # gate + up + down + two RMSNorm gains
    assert sum(p.numel() for p in projector.parameters()) == expected == 36_704_768


def test_projector_output_starts_at_the_requested_scale():
    projector = Projector(encoder_dim=16, decoder_dim=64, stack=2, hidden=32, output_scale=0.05)
    out = projector(torch.randn(4, 10, 16) * 30)
    rms = out.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.05), rtol=1e-3)


def test_projector_bias_starts_the_output_around_the_given_mean():
    mean = torch.randn(64) * 0.1
    projector = Projector(encoder_dim=16, decoder_dim=64, stack=2, hidden=32, output_scale=0.05, output_mean=mean)
    out = projector(torch.randn(4, 10, 16) * 30)  # [4, 5, 64]
    rms = (out - mean).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.05), rtol=1e-3)
    assert projector.bias.requires_grad and torch.equal(projector.bias, mean)


def test_projector_rejects_nonsense_sizes():
    with pytest.raises(ValueError, match="stack"):
        Projector(encoder_dim=16, decoder_dim=16, stack=0)
