"""Several datasets mixed by weight, each with its own columns and prompt: the multi-task config."""

import itertools
from collections import Counter

import pytest

from conftest import DECODER, NO_WORKERS, ROOT, SMOKE, SPEECH, WHISPER, connected_data, run_here
from tiny_audio_pl.data import Source, SpeechDataModule
from tiny_audio_pl.errors import UsageError

MIX = ROOT / "configs" / "smoke_multi_task.yaml"
SEX_PROMPT = "Is the speaker male (M) or female (F)? <audio>"


def test_mixed_stream_carries_each_sources_prompt_and_target():
    sources = [Source("transcribe", SPEECH, "train", audio_column="wav", id_column="ID", weight=3.0),
               Source("sex", SPEECH, "train", audio_column="wav", text_column="sex", id_column="ID",
                      prompt=SEX_PROMPT, weight=1.0)]
    data = connected_data(dataset=SPEECH, config_name=None, batch_size=8, num_workers=0, encoder=WHISPER,
                            decoder=DECODER,
                            train_sources=sources, max_train_samples=80)
    data.setup("fit")
    clips = [clip for batch in itertools.islice(data.train_dataloader(), 10)  # one pass
             for clip in zip(batch["prompt"], batch["text"])]
    assert len(clips) == 80
    tasks = Counter("sex" if prompt == SEX_PROMPT else "transcribe" for prompt, _ in clips)
    assert 45 <= tasks["transcribe"] <= 75 and tasks["sex"] >= 5  # about 3 : 1
    assert {text for prompt, text in clips if prompt == SEX_PROMPT} <= {"m", "f"}
    assert all(len(text.split()) > 2 for prompt, text in clips if prompt is None)


def test_a_source_says_only_what_differs_from_the_data_settings():
    data = connected_data(dataset=SPEECH, config_name=None, max_eval_samples=5, encoder=WHISPER, decoder=DECODER,
                            train_sources=[Source("sex", text_column="sex", prompt=SEX_PROMPT)],
                            eval_sets=[Source("dev"), Source("other", dataset="elsewhere", split="test",
                                                             config_name="x", max_samples=9)])
    (train,) = data.train_streams()
    assert (train.dataset, train.split, train.audio_column, train.text_column, train.id_column) == (
        SPEECH, "train", "wav", "sex", "ID")
    assert train.max_samples is None and train.prompt == SEX_PROMPT
    dev, other = data.evaluation_sets()
    assert (dev.dataset, dev.split, dev.text_column, dev.max_samples) == (SPEECH, "dev", "text", 5)
    assert (other.dataset, other.split, other.config_name, other.max_samples) == ("elsewhere", "test", "x", 9)
    assert Source("none", config_name="").filled(config_name="large").config_name is None  # "": no configuration


def test_bad_sources_fail_with_the_field_names():
    with pytest.raises(UsageError, match="weights must be positive"):
        SpeechDataModule(train_sources=[Source("a", SPEECH, "train", weight=0.0)])
    with pytest.raises(UsageError, match="fields of Source"):
        SpeechDataModule(eval_sets=[{"name": "a", "dataset": SPEECH, "split": "dev", "colum": "x"}])


def test_multi_task_config_trains_and_scores_each_task(workdir):
    result = run_here(workdir, "fit", "-c", SMOKE, "-c", str(MIX), "--trainer.max_steps", "6",
                      "--trainer.val_check_interval", "6", "--model.max_new_tokens", "6",
                      "--trainer.enable_progress_bar", "false", *NO_WORKERS)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()
            if line.startswith(("transcribe_dev ", "speaker_sex_dev "))}
    assert rows == {"transcribe_dev": "8", "speaker_sex_dev": "8"}
    utterances = (workdir / "lightning_logs/version_0/utterances/step=6.tsv").read_text().splitlines()
    assert sum(line.startswith("speaker_sex_dev\t") and line.split("\t")[2] in ("m", "f") for line in utterances) == 8


def test_mixed_stream_resumes_exactly_with_workers():
    """The interleaved stream's saved position restores it exactly, as a single stream's does."""
    def loader():
        sources = [Source("t", SPEECH, "train", audio_column="wav", id_column="ID", weight=3.0),
                   Source("s", SPEECH, "train", audio_column="wav", text_column="sex", id_column="ID",
                          prompt=SEX_PROMPT)]
        data = connected_data(dataset=SPEECH, config_name=None, batch_size=3, num_workers=2, encoder=WHISPER,
                                decoder=DECODER,
                                shuffle_buffer=8, seed=5, train_sources=sources, max_train_samples=60)
        data.setup("fit")
        return data.train_dataloader()

    def clips(batches) -> list[tuple[str, str | None]]:
        return [clip for batch in batches for clip in zip(batch["id"], batch["prompt"])]

    first = loader()
    batches = iter(first)
    fetched = [next(batches) for _ in range(7)]  # as Lightning: 6 trained on, the 7th fetched ahead
    state = first.state_dict()
    rest = clips(itertools.islice(batches, 30))  # on into the second pass
    assert {prompt for _, prompt in rest} == {None, SEX_PROMPT}
    resumed = loader()
    resumed.load_state_dict(state)
    assert clips(itertools.islice(resumed, 31)) == clips(fetched[6:]) + rest
