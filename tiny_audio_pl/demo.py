"""``tiny-audio demo --ckpt CHECKPOINT_OR_MODEL_FOLDER``: try a model in the browser (Gradio, ``.[demo]``).

Upload or record audio and get the transcript the way ``tiny-audio transcribe`` makes it (long
audio cut into windows at pauses, each window's text shown), the real-time factor, and the model's
facts (encoder, decoder, steps, last validation). Audio that cannot be used (not audio, empty,
longer than ``--max-minutes``) is a message in the page, and the app keeps serving. It listens on
127.0.0.1 unless ``--host`` says otherwise, and prints its URL on one line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr
import soundfile as sf

from tiny_audio_pl.checkpoint import read_training_checkpoint
from tiny_audio_pl.export import load_model
from tiny_audio_pl.modeling import TinyAudioModel


def training_facts(path: str, model: TinyAudioModel) -> dict[str, Any]:
    """How the model was trained: an export's config says it, a training checkpoint holds it."""
    if Path(path).is_file():
        checkpoint = read_training_checkpoint(path, mmap=True)
        return {"global_step": checkpoint.get("global_step"), "validation": checkpoint.get("validation", {})}
    return getattr(model.config, "training", None) or {}


def model_facts(model: TinyAudioModel, source: str, training: dict[str, Any]) -> str:
    """The model card's facts, as Markdown: what it is, how long it trained, its last validation."""
    config = model.config
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
    texts = [model.transcribe_windows([[window]], 1)[0] for window in windows]
    compute = time.perf_counter() - start
    transcript = " ".join(text for text in texts if text)
    shown = "\n".join(f"{i + 1}. {text or '(nothing)'}" for i, text in enumerate(texts))
    status = (f"{seconds:.1f} s of audio in {len(windows)} window(s) of at most 30 s, transcribed in {compute:.2f} s: "
              f"real-time factor {compute / max(seconds, 1e-9):.3f}")
    return transcript, shown, status


def build_app(model: TinyAudioModel, facts: str, max_minutes: float) -> gr.Blocks:
    """The page: the model's facts, an audio input, the transcript, its windows and a status line."""
    with gr.Blocks(title="tiny-audio") as app:
        gr.Markdown(facts, elem_id="facts")
        audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="audio")
        button = gr.Button("Transcribe", variant="primary", elem_id="transcribe")
        transcript = gr.Textbox(label="Transcript", elem_id="transcript", interactive=False)
        windows = gr.Markdown(elem_id="windows")
        status = gr.Markdown(elem_id="status")
        button.click(lambda path: transcribe_audio(model, path, 60 * max_minutes), inputs=audio,
                     outputs=[transcript, windows, status])
    return app


def serve(checkpoint: str, host: str, port: int, max_minutes: float, **launch: Any) -> None:
    """Load the model (float32 on a CPU) and serve the page until interrupted."""
    model = load_model(checkpoint, "float32")
    app = build_app(model, model_facts(model, checkpoint, training_facts(checkpoint, model)), max_minutes)
    app.queue()
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, **launch)
    print(f"tiny-audio demo: http://{host}:{app.server_port}", flush=True)
    app.block_thread()
