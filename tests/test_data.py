import io
import itertools

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import DECODER, HUBERT, SPEECH, WHISPER, connected_data
from tiny_audio_pl.clips import collate, normalize_target
from tiny_audio_pl.data import SpeechDataModule
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.hub import find_parquet_files
from tiny_audio_pl.processing import decode_audio
from tiny_audio_pl.stream import budget_batches


def _encoded(audio: np.ndarray, rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt)
    return buffer.getvalue()


def test_decode_downmixes_and_resamples():
    t = np.arange(44_100) / 44_100
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    stereo = np.stack([tone, tone], axis=1) * 0.5
    audio = decode_audio({"bytes": _encoded(stereo, 44_100, "WAV"), "path": "x.wav"}, 16_000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == pytest.approx(16_000, abs=2)
    assert np.abs(audio).max() == pytest.approx(0.5, abs=0.02)


def test_decode_reads_raw_bytes_flac():
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, 8_000).astype(np.float32)
    decoded = decode_audio(_encoded(audio, 16_000, "FLAC"), 16_000)
    assert np.abs(decoded - audio).max() < 1e-4


def test_target_normalisation():
    assert normalize_target("  THE RED  FOX ", "lower") == "the red fox"
    assert normalize_target("The red fox.", "none") == "The red fox."


def _example(length: int, text: str, skip: str = "") -> dict:
    features = None if skip else np.full((4, length), float(length), dtype=np.float32)
    return {"id": text, "text": text, "targets": [length], "features": features, "skip": skip}


def test_collate_pads_to_the_longest_clip_and_counts_skips():
    batch = collate([_example(3, "a"), _example(5, "b"), _example(0, "c", skip="too_long"), _example(2, "d")])
    assert batch["features"].shape == (3, 4, 5)  # longest kept clip, not a fixed window
    assert batch["feature_lengths"].tolist() == [3, 5, 2]
    assert torch.all(batch["features"][0, :, :3] == 3) and torch.all(batch["features"][0, :, 3:] == 0)
    assert torch.all(batch["features"][2, :, 2:] == 0)
    assert batch["text"] == ["a", "b", "d"]
    assert batch["skipped"] == {"too_long": ["c"]}


def test_collate_of_only_skipped_clips_is_an_empty_batch():
    batch = collate([_example(0, "x", skip="undecodable")])
    assert batch["text"] == [] and batch["skipped"] == {"undecodable": ["x"]}


def test_local_parquet_layout_is_found():
    files = find_parquet_files(__import__("pathlib").Path(SPEECH), None, "train")
    assert len(files) == 2 and all(f.endswith(".parquet") for f in files)
    with pytest.raises(UsageError, match="test"):
        find_parquet_files(__import__("pathlib").Path(SPEECH), None, "test")


def test_whisper_stream_yields_every_dev_clip_with_unpadded_features():
    data = connected_data(dataset=SPEECH, config_name=None, batch_size=8, num_workers=0, encoder=WHISPER,
                            decoder=DECODER)
    data.setup("validate")
    batches = list(data.val_dataloader()[0])
    assert sum(len(b["text"]) for b in batches) == 20
    first = batches[0]
    assert first["features"].shape[:2] == (8, 128)
    assert first["features"].shape[2] == first["feature_lengths"].max() < 3000  # padded to the batch, not 30 s
    assert first["text"][0] == first["text"][0].lower()


def test_waveform_stream_for_hubert_and_duration_limit():
    data = connected_data(dataset=SPEECH, config_name=None, batch_size=20, num_workers=0, encoder=HUBERT,
                            decoder=DECODER,
                            max_duration=2.5)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()[0]))
    assert batch["features"].dim() == 2  # raw waveform [B, samples]
    assert batch["feature_lengths"].max() <= 2.5 * 16_000
    assert len(batch["skipped"]["too_long"]) == 20 - len(batch["text"]) > 0


def test_missing_column_lists_the_columns_that_exist():
    data = connected_data(dataset=SPEECH, config_name=None, text_column="transcript", num_workers=0,
                            encoder=WHISPER, decoder=DECODER)
    with pytest.raises(UsageError, match=r"transcript.*'ID'.*'wav'"):
        data.check("validate")  # what the CLI runs before any model loads


def test_training_stream_is_shuffled_and_truncated_and_goes_on_pass_after_pass():
    data = connected_data(dataset=SPEECH, config_name=None, batch_size=5, num_workers=0, encoder=WHISPER,
                            decoder=DECODER,
                            max_train_samples=10, shuffle_buffer=10)
    data.setup("fit")
    batches = [b["id"] for b in itertools.islice(data.train_dataloader(), 4)]  # 2 batches of 5 clips a pass
    first, second = batches[0] + batches[1], batches[2] + batches[3]
    assert sorted(first) != first and len(first) == 10
    assert set(first) <= {f"train-{i:04d}" for i in range(20)}
    assert sorted(second) == sorted(first) and second != first  # the same clips, shuffled anew


def test_budget_batches_hold_the_budget_and_every_clip_once():
    rng = np.random.default_rng(0)
    durations = np.exp(rng.normal(np.log(6), 0.6, 500)).clip(0.5, 30).tolist()
    batches = budget_batches(durations, np.random.default_rng(1), seconds=120.0, max_clips=16)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) * max(durations[i] for i in b) <= 120.0 and len(b) <= 16 for b in batches)
    sizes = [len(b) for b in batches]
    assert min(sizes) <= 5 and max(sizes) == 16  # long clips few to a batch, short ones many
    fill = sum(durations) / sum(len(b) * max(durations[i] for i in b) for b in batches)
    assert fill > 0.85  # little padding: batches are length-grouped
    means = [np.mean([durations[i] for i in b]) for b in batches]
    assert means != sorted(means) and means != sorted(means, reverse=True)  # batches in random order
    assert budget_batches([40.0, 1.0], np.random.default_rng(0), seconds=30.0, max_clips=8) in ([[1], [0]],
                                                                                                [[0], [1]])
    with pytest.raises(UsageError, match="batch_seconds"):
        SpeechDataModule(batch_seconds=20.0, max_duration=30.0)


def _ids(batches) -> list[str]:
    return [i for b in batches for i in b["id"]]


@pytest.mark.parametrize("batching", [{"batch_size": 3}, {"batch_seconds": 12.0, "max_duration": 12.0}],
                         ids=["3-clip-batches", "12-second-batches"])
def test_training_stream_resumes_exactly_in_any_pass_with_workers(batching):
    """The saved position restores the shuffled stream exactly, in the first pass, at the boundary between
    passes and inside the second: nothing repeated, nothing skipped."""
    def loader():
        data = connected_data(dataset=SPEECH, config_name=None, num_workers=2, encoder=WHISPER, decoder=DECODER,
                                shuffle_buffer=8, seed=5, **batching)
        data.setup("fit")
        return data.train_dataloader()

    straight = loader()
    batches, states, passes = [], [], []
    for batch in itertools.islice(straight, 45):
        batches.append(batch)
        states.append(straight.state_dict())  # as Lightning saves it: one batch trained fewer than fetched
        passes.append(straight.passes)
    boundary = passes.index(1)  # the first batch of the second pass
    first_pass = _ids(batches[:boundary])
    assert sorted(first_pass) == sorted(f"train-{i:04d}" for i in range(80))  # each clip once
    assert first_pass != sorted(first_pass)  # and shuffled
    assert _ids(batches[boundary:boundary + 5]) != first_pass[:15]  # the second pass in its own order

    for fetched in (7, boundary, boundary + 8):  # trained on 6 / the whole first pass / 7 of the second
        resumed = loader()
        resumed.load_state_dict(states[fetched - 1])
        assert _ids(itertools.islice(resumed, 10)) == _ids(batches[fetched - 1:fetched + 9]), fetched


def test_an_outage_inside_an_optimizer_step_stops_the_loader_at_the_steps_start():
    """With 2 micro-batches a step, the host fails while batch 5 (the second of step 3) is fetched: the loader hands
    Lightning batches 0-3 (two full steps), a placeholder in place of batch 4, then the error; its saved position
    is the end of step 2, so a resumed run starts step 3 again at batch 4, with nothing half-trained."""
    from torch.utils.data import IterableDataset as TorchIterableDataset

    from tiny_audio_pl.errors import DataUnavailable
    from tiny_audio_pl.stream import TrainLoader

    class Batches(TorchIterableDataset):
        def __init__(self, fail_at: int | None) -> None:
            self.fail_at = fail_at

        def set_epoch(self, epoch: int) -> None:
            pass

        def __iter__(self):
            for i in range(8):
                if i == self.fail_at:
                    raise DataUnavailable("the data host h did not answer")
                yield {"i": i}

    loader = TrainLoader(Batches(fail_at=5), step_batches=2, batch_size=None, collate_fn=lambda batch: batch)
    batches = iter(loader)
    assert [next(batches) for _ in range(5)] == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}, None]
    with pytest.raises(DataUnavailable):
        next(batches)
    resumed = TrainLoader(Batches(fail_at=None), step_batches=2, batch_size=None, collate_fn=lambda batch: batch)
    resumed.load_state_dict(loader.state_dict())
    assert [b["i"] for b in itertools.islice(resumed, 4)] == [4, 5, 6, 7]
