import pytest

from tiny_audio_pl.evaluation import SetTally
from tiny_audio_pl.scoring import normalize_for_wer


@pytest.mark.parametrize("raw, normalized", [
    ("Hello, World!", "hello world"),
    ("THE COLOUR OF THE HARBOUR", "the color of the harbor"),  # British -> American spelling map
    ("Mr. Smith paid twenty-five dollars", "mister smith paid $25"),
    ("  it's   fine  ", "it is fine"),
])
def test_whisper_english_normaliser(raw, normalized):
    assert normalize_for_wer(raw) == normalized


def test_corpus_wer_counts_each_utterances_errors_over_all_reference_words():
    """The package's own scoring (SetTally): errors and words per utterance after normalisation, the corpus WER
    their sums' ratio (not a mean of utterance WERs), and an empty reference counts every hypothesis word."""
    tally = SetTally()
    tally.add_scores("dev", ["a", "b", "c"], ["the dog sat on the mat", "HELLO THERE", ""],
                     ["The cat sat on mat.", "hello there", "yes"])
    assert [(row.id, row.errors, row.reference_words) for row in tally.rows] == [("a", 2, 6), ("b", 0, 2), ("c", 1, 0)]
    assert [(row.substitutions, row.deletions, row.insertions) for row in tally.rows] == [(1, 1, 0), (0, 0, 0),
                                                                                          (0, 0, 1)]
    assert tally.word_counts() == (3, 8)
    assert tally.metrics()["wer"] == pytest.approx(3 / 8)  # not a mean of utterance WERs
