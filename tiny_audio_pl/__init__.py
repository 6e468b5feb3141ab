"""tiny-audio (Lightning): train a projector between a frozen speech encoder and a frozen LLM."""

from tiny_audio_pl.data import Source, SpeechDataModule
from tiny_audio_pl.model import SpeechLLM
from tiny_audio_pl.modeling import TinyAudioConfig, TinyAudioModel
from tiny_audio_pl.processing import TinyAudioProcessor
from tiny_audio_pl.projector import Projector

__all__ = ["Projector", "Source", "SpeechDataModule", "SpeechLLM", "TinyAudioConfig", "TinyAudioModel",
           "TinyAudioProcessor"]
