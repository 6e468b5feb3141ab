import pytest
from torchmetrics.text import WordErrorRate

from tiny_audio_pl.evaluation import normalize_for_wer


@pytest.mark.parametrize("raw, normalized", [
    ("Hello, World!", "hello world"),
    ("THE COLOUR OF THE HARBOUR", "the color of the harbor"),  # British -> American spelling map
    ("Mr. Smith paid twenty-five dollars", "mister smith paid $25"),
    ("  it's   fine  ", "it is fine"),
])
def test_whisper_english_normaliser(raw, normalized):
    assert normalize_for_wer(raw) == normalized


def test_wer_on_known_cases():
    wer = WordErrorRate()
    # one substitution, one deletion over 6 reference words; case and punctuation are normalised away
    hyp = [normalize_for_wer("The cat sat on mat."), normalize_for_wer("HELLO THERE")]
    ref = [normalize_for_wer("the dog sat on the mat"), normalize_for_wer("hello there")]
    wer.update(hyp, ref)
    assert wer.compute().item() == pytest.approx(2 / 8)
