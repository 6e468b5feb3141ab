"""A wrong model or prompt fails before any weights are loaded, with a message that says what to change."""

import shutil

import pytest

from conftest import DECODER, WHISPER
from tiny_audio_pl.model import SpeechLLM


def test_unreachable_model_id_offline_says_so(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="cannot load the decoder 'no-such/model'.*HF_HUB_OFFLINE.*local directory"):
        SpeechLLM(encoder=WHISPER, decoder="no-such/model")
    with pytest.raises(OSError, match="cannot load the encoder 'no-such/encoder'"):
        SpeechLLM(encoder="no-such/encoder", decoder=DECODER)


def test_unsupported_encoder_type():
    with pytest.raises(ValueError, match="unsupported encoder type 'smollm3'"):
        SpeechLLM(encoder=DECODER, decoder=DECODER)


def test_decoder_without_chat_template(tmp_path):
    plain = tmp_path / "plain-decoder"
    shutil.copytree(DECODER, plain, ignore=shutil.ignore_patterns("chat_template.jinja"))
    with pytest.raises(ValueError, match="no chat template"):
        SpeechLLM(encoder=WHISPER, decoder=str(plain))


def test_nonsense_sizes():
    with pytest.raises(ValueError, match="projector_stack"):
        SpeechLLM(encoder=WHISPER, decoder=DECODER, projector_stack=0)


@pytest.mark.parametrize("override, key", [("--data.batch_size=0", "data.batch_size"),
                                           ("--model.projector_stack=0", "model.projector_stack"),
                                           ("--model.projector_hidden=-5", "model.projector_hidden")])
def test_cli_rejects_nonsense_sizes_while_parsing(override, key, capsys, monkeypatch):
    from conftest import ROOT
    from tiny_audio_pl.cli import main

    monkeypatch.setattr("sys.argv", ["tiny-audio"])
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(ROOT / "configs" / "smoke.yaml"), override])
    assert f'Parser key "{key}"' in capsys.readouterr().err
