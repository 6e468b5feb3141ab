"""``tiny-audio demo``: try a model in the browser, and listen to a run's errors (Gradio, ``.[demo]``).

- ``--ckpt CHECKPOINT_OR_MODEL_FOLDER``: upload or record audio and get the transcript the way
  ``tiny-audio transcribe`` makes it (long audio cut into windows at pauses, each window's text
  shown), the real-time factor, and the model's facts (encoder, decoder, steps, last validation).
  Audio that cannot be used (not audio, empty, longer than ``--max-minutes``) is a message in the
  page, and the app keeps serving.
- ``--run RUN_FOLDER_OR_TSV`` (once, or twice to compare two runs): the per-utterance file of a
  validation, worst first (or, for two runs, most different first), filterable by set and by text;
  a row shows its audio, read from the dataset by id as validation read it, and the reference and
  hypothesis with the word errors marked as they were counted.

It listens on 127.0.0.1 unless ``--host`` says otherwise, and prints its URL on one line.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import soundfile as sf
import yaml
from kaldialign import align

from tiny_audio_pl.compare import short_name
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.export import load_model
from tiny_audio_pl.hub import local_folder
from tiny_audio_pl.modeling import TinyAudioModel
from tiny_audio_pl.processing import decode_audio
from tiny_audio_pl.runs import RunFolder
from tiny_audio_pl.scoring import normalize_for_wer, read_utterances

GAP = "*"  # kaldialign's mark for a word that is not there


def model_facts(model: TinyAudioModel, source: str) -> str:
    """The model card's facts, as Markdown: what it is, how long it trained, its last validation (an export's
    config holds them, and ``load_model`` puts a checkpoint's there)."""
    config = model.config
    training = getattr(config, "training", None) or {}
    validation = training.get("validation") or {}
    scores = ", ".join(f"{name} {value:.4g}" for name, value in sorted(validation.get("metrics", {}).items())
                       if name.endswith("wer") or name.endswith("/loss"))
    return (f"**{source}**  \nencoder `{config.encoder}`, decoder `{config.decoder}`, projector stack "
            f"{config.projector_stack} x hidden {config.projector_hidden}"
            + (f"  \ntrained {training.get('global_step')} steps" if training.get("global_step") is not None else "")
            + (f"  \nlast validation (step {validation.get('step')}): {scores}" if scores else ""))


def transcribe_audio(model: TinyAudioModel, path: str | None, max_seconds: float) -> tuple[str, str, str]:
    """The transcript, the windows with their texts (Markdown), and a status line; a message, never a traceback."""
    if not path:
        return "", "", "No audio: upload a file or record a clip first."
    processor = model.processor
    try:
        audio = processor.load(path)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as error:
        return "", "", f"Cannot read this file as audio ({type(error).__name__}): use wav, flac, ogg or mp3."
    seconds = len(audio) / processor.sample_rate
    if seconds > max_seconds:
        return "", "", (f"The audio is {seconds / 60:.1f} min long, more than this demo's {max_seconds / 60:g} min: "
                        "use `tiny-audio transcribe` for long files.")
    try:
        windows = processor.windows(audio)
    except ValueError as error:
        return "", "", f"Cannot transcribe this audio: {error}."
    start = time.perf_counter()
    texts = model.transcribe_windows([[window] for window in windows], len(windows))  # each window's own text
    compute = time.perf_counter() - start
    transcript = " ".join(text for text in texts if text)
    shown = "\n".join(f"{i + 1}. {text or '(nothing)'}" for i, text in enumerate(texts))
    status = (f"{seconds:.1f} s of audio in {len(windows)} window(s) of at most 30 s, transcribed in {compute:.2f} s: "
              f"real-time factor {compute / max(seconds, 1e-9):.3f}")
    return transcript, shown, status


# Each kind of error its own colour, named under the texts; the texts are shown as scored, which is not as the table
# shows them (as written).
ERROR_CSS = (".substitution {background: #ffe08a} .deletion {background: #fdd; text-decoration: line-through} "
             ".insertion {background: #cfc; text-decoration: none}")
LEGEND = ('<p><small><span class="substitution">substituted</span> <del class="deletion">deleted</del> '
          '<ins class="insertion">inserted</ins>; both texts as scored: Whisper\'s English normaliser (lower case, no '
          'punctuation, numbers and spellings unified), where the table shows them as written</small></p>')


def marked(reference: str, hypothesis: str) -> str:
    """The two normalised texts, aligned as they were scored (sclite's weights), as HTML with the errors marked."""
    pairs = align(normalize_for_wer(reference).split(), normalize_for_wer(hypothesis).split(), GAP, sclite_mode=True)
    ref, hyp = [], []
    for r, h in pairs:
        r, h = html.escape(r), html.escape(h)
        if r == h:
            ref.append(r)
            hyp.append(h)
        elif h == GAP:
            ref.append(f'<del class="deletion">{r}</del>')
        elif r == GAP:
            hyp.append(f'<ins class="insertion">{h}</ins>')
        else:
            ref.append(f'<span class="substitution">{r}</span>')
            hyp.append(f'<span class="substitution">{h}</span>')
    return (f"<p>reference: {' '.join(ref)}</p><p>hypothesis: {' '.join(hyp)}</p>{LEGEND}")


class RunErrors:
    """One run's scored utterances (or two runs', matched), and their audio from the dataset the run scored."""

    def __init__(self, runs: list[str]) -> None:
        self.files = [self._utterances(Path(run)) for run in runs]
        tables = [{(u.set, u.id): u for u in read_utterances(path)} for path in self.files]
        self.keys = [k for k in tables[0] if all(k in table for table in tables[1:])]
        self.rows = [[table[k] for table in tables] for k in self.keys]  # [utterance][run]
        if len(tables) > 1:  # most different first
            self.rows.sort(key=lambda row: (-abs(row[1].errors - row[0].errors), -row[0].errors))
        self.config = RunFolder.of_file(self.files[0]).config
        self._audio: dict[tuple[str, str], Any] | None = None

    @staticmethod
    def _utterances(path: Path) -> Path:
        found = RunFolder(path).newest_utterances() if path.is_dir() else path if path.is_file() else None
        if found is None:
            raise UsageError(f"--run {path}: neither a run folder with utterances/step=N.tsv nor such a file")
        return found

    def table(self, chosen_set: str, text: str) -> list[list[Any]]:
        """The rows to show: set, id, each run's errors, reference words, reference, each run's hypothesis."""
        text = text.strip().lower()
        shown = []
        for row in self.rows:
            first = row[0]
            if chosen_set not in ("all", first.set):
                continue
            if text and not any(text in t.lower() for t in (first.id, first.reference, *(u.hypothesis for u in row))):
                continue
            shown.append([first.set, first.id, *(u.errors for u in row), first.reference_words, first.reference,
                          *(u.hypothesis for u in row)])
        return shown

    def audio(self, key: tuple[str, str]) -> tuple[int, Any] | None:
        """The clip's waveform, read from the evaluation sets of the run's config (None when it cannot be found)."""
        if self._audio is None:
            self._audio = self._read_audio()
        value = self._audio.get(key)
        if value is None:
            return None
        wave = decode_audio(value, 16_000)  # [samples] float32 -> the int16 a browser plays
        return 16_000, (np.clip(wave, -1.0, 1.0) * 32767).astype(np.int16)

    def _read_audio(self) -> dict[tuple[str, str], Any]:
        """Every scored clip's stored audio, by set and id, streamed as validation streamed it."""
        from tiny_audio_pl.data import SpeechDataModule

        if not self.config.is_file():
            return {}
        data = (yaml.safe_load(self.config.read_text()) or {}).get("data") or {}
        found = local_folder(data["dataset"], self.files[0]) if data.get("dataset") else None
        if found:  # a folder named relative to where the run was started
            data["dataset"] = str(found)
        module = SpeechDataModule(**data)
        wanted, found = set(self.keys), {}
        for source in module.evaluation_sets():
            for row in module.open_source(source):
                if (source.name, row["id"]) in wanted:
                    found[(source.name, row["id"])] = row["audio"]
        return found


def build_app(model: TinyAudioModel | None, facts: str, max_minutes: float, errors: RunErrors | None) -> gr.Blocks:
    """The page: a tab to transcribe with the model, a tab to browse a run's errors (each when given)."""
    with gr.Blocks(title="tiny-audio") as app:
        if model is not None:
            with gr.Tab("Transcribe", elem_id="transcribe-tab"):
                gr.Markdown(facts, elem_id="facts")
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="audio")
                button = gr.Button("Transcribe", variant="primary", elem_id="transcribe")
                transcript = gr.Textbox(label="Transcript", elem_id="transcript", interactive=False)
                windows = gr.Markdown(elem_id="windows")
                status = gr.Markdown(elem_id="status")
                button.click(lambda path: transcribe_audio(model, path, 60 * max_minutes), inputs=audio,
                             outputs=[transcript, windows, status])
        if errors is not None:
            with gr.Tab("Errors", elem_id="errors-tab"):
                names = [short_name(str(path)) for path in errors.files]
                gr.Markdown("Worst first. " if len(names) == 1 else "Most different first: " + " against ".join(
                    f"run {i + 1}, {name}" for i, name in enumerate(names)), elem_id="errors-about")
                sets = sorted({row[0].set for row in errors.rows})
                with gr.Row():
                    chosen = gr.Dropdown(["all", *sets], value="all", label="set", elem_id="errors-set")
                    text = gr.Textbox(label="text contains", elem_id="errors-text")
                runs = [f" {i + 1}" if len(names) > 1 else "" for i in range(len(names))]
                headers = ["set", "id", *(f"errors{r}" for r in runs), "words", "reference",
                           *(f"hypothesis{r}" for r in runs)]
                table = gr.Dataframe(errors.table("all", ""), headers=headers, interactive=False,
                                     elem_id="errors-table", wrap=True)
                clip = gr.Audio(label="clip", elem_id="errors-audio", interactive=False)
                diff = gr.HTML(elem_id="errors-diff")

                def pick(rows: Any, event: gr.SelectData) -> tuple[Any, str]:
                    row = rows.iloc[event.index[0]].tolist()
                    key = (row[0], row[1])
                    matched = next(r for r in errors.rows if (r[0].set, r[0].id) == key)
                    marks = "".join(f"<h4>run {i + 1}: {u.errors} errors in {u.reference_words} words</h4>"
                                    f"{marked(u.reference, u.hypothesis)}" for i, u in enumerate(matched))
                    return errors.audio(key), marks

                refresh = dict(fn=errors.table, inputs=[chosen, text], outputs=table)
                chosen.change(**refresh)
                text.submit(**refresh)
                table.select(pick, inputs=table, outputs=[clip, diff])
    return app


def serve(checkpoint: str | None, runs: list[str], host: str, port: int, max_minutes: float) -> None:
    """Load what was asked for (a model, float32 on a CPU; a run's errors) and serve the page until interrupted."""
    errors = RunErrors(runs) if runs else None
    model = load_model(checkpoint, "float32") if checkpoint else None
    facts = model_facts(model, checkpoint) if model is not None else ""
    app = build_app(model, facts, max_minutes, errors)
    app.queue()
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
               css=ERROR_CSS)
    print(f"tiny-audio demo: http://{host}:{app.server_port}", flush=True)
    app.block_thread()
