"""The prompt around the audio as the real chat templates write it, and its token ids kept once rendered.

The tiny SmolLM3's template is a stand-in for SmolLM3-3B's (a dated metadata block, the reasoning switch, the
unclosed system block, the empty think pair, ``/system_override``), ``assets/smollm2_chat_template.jinja`` for
SmolLM2-Instruct's (a default system message). Each layout is checked against the template's own rendering of the
whole conversation, answer included: what the decoder learns to write is the answer and the end of the turn only.
"""

import datetime
import json

import pytest
from transformers import AutoFeatureExtractor, AutoTokenizer

from conftest import ASSETS, DECODER, WHISPER, make_workdir, run_here
from tiny_audio_pl.checkpoint import read_checkpoint
from tiny_audio_pl.errors import UsageError
from tiny_audio_pl.processing import TinyAudioProcessor

PROMPT = "Transcribe: <audio>"
ANSWER = "the red fox found a wooden box"


def processor(system_prompt: str, template: str | None = None, **kept) -> TinyAudioProcessor:
    tokenizer = AutoTokenizer.from_pretrained(DECODER)
    if template:
        tokenizer.chat_template = template
    return TinyAudioProcessor(AutoFeatureExtractor.from_pretrained(WHISPER), tokenizer, system_prompt, PROMPT, **kept)


def layout(p: TinyAudioProcessor) -> tuple[str, str]:
    """The prompt before and after the audio as text; checks that prompt + answer + end of turn is what the
    template writes for the whole conversation."""
    decode = p.tokenizer.decode
    before, after = decode(p.prompt.prefix_ids), decode(p.prompt.suffix_ids)
    messages = ([{"role": "system", "content": p.system_prompt}] if p.system_prompt else []) + [
        {"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]
    whole = p.tokenizer.apply_chat_template(messages, tokenize=False)
    assert before + "<audio>" + after + decode(p.targets([ANSWER])[0]) + "\n" == whole
    assert p.tokenizer.convert_ids_to_tokens([p.end_id]) == ["<|im_end|>"]
    return before, after


def test_smollm3_writes_a_dated_unclosed_system_block_and_the_think_pair_belongs_to_the_prompt():
    before, after = layout(processor("/no_think"))
    today = f"{datetime.date.today():%d %B %Y}"
    assert before == ("<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n"
                      f"Today Date: {today}\nReasoning Mode: /no_think\n\n## Custom Instructions\n\n"
                      "You are a helpful AI assistant named SmolLM, trained by Hugging Face.\n\n"
                      "<|im_start|>user\nTranscribe: ")  # no <|im_end|> closes the system block
    assert after == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n"


def test_smollm3_reasoning_on_keeps_the_instructions_and_writes_no_think_pair():
    before, after = layout(processor("/think Write what is said."))
    assert "Reasoning Mode: /think\n\n## Custom Instructions\n\nWrite what is said.\n\n<|im_start|>user" in before
    assert after == "<|im_end|>\n<|im_start|>assistant\n"
    assert "Reasoning Mode: /think" in layout(processor(""))[0]  # no system message: SmolLM3 reasons by default


def test_smollm3_system_override_replaces_the_block_and_shortens_the_prompt():
    overridden = processor("/no_think /system_override Write what is said.")
    before, after = layout(overridden)
    assert before == "<|im_start|>system\nWrite what is said.<|im_end|>\n<|im_start|>user\nTranscribe: "
    assert after == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n"
    assert len(overridden.prompt.prefix_ids) < len(processor("/no_think").prompt.prefix_ids) / 3


def test_smollm2_writes_its_default_system_message_when_none_is_given():
    template = (ASSETS / "smollm2_chat_template.jinja").read_text()
    before, after = layout(processor("", template))
    assert before == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nTranscribe: ")
    assert after == "<|im_end|>\n<|im_start|>assistant\n"
    assert layout(processor("Write what is said.", template))[0].startswith(
        "<|im_start|>system\nWrite what is said.<|im_end|>\n")


def test_kept_ids_are_used_instead_of_a_new_rendering_and_checked():
    kept = processor("/no_think").prompt_ids
    kept["prompts"][PROMPT][0] = kept["prompts"][PROMPT][0][:5]  # another day's rendering, say
    again = processor("/no_think", prompt_ids=kept)
    assert again.prompt.prefix_ids == kept["prompts"][PROMPT][0] and again.prompt_ids == kept
    again.chat("Say what you hear: <audio>")  # a prompt met later is rendered once and kept with the others
    assert set(again.prompt_ids["prompts"]) == {PROMPT, "Say what you hear: <audio>"}
    assert json.loads(json.dumps(again.prompt_ids)) == again.prompt_ids  # what config.json and YAML hold
    with pytest.raises(UsageError, match="exactly once"):
        again.chat("Transcribe this")
    with pytest.raises(UsageError, match="rendered for the system prompt '/no_think', not ''.*set model.prompt_ids to "
                                         "null"):
        processor("", prompt_ids=kept)
    with pytest.raises(UsageError, match="model.prompt_ids is not a kept rendering"):
        processor("/no_think", prompt_ids={"system_prompt": "/no_think", "prompts": [1, 2]})


def test_a_checkpoint_without_kept_ids_loads_with_one_line(trained, tmp_path):
    import torch

    workdir = make_workdir(tmp_path / "run")  # the checkpoint names its models as folders relative to the run's
    old = read_checkpoint(trained)
    del old["hyper_parameters"]["prompt_ids"]
    torch.save(old, workdir / "old.ckpt")
    result = run_here(workdir, "transcribe", "assets/clips/dev-0000.wav", "--ckpt", "old.ckpt")
    assert result.returncode == 0, result.stderr
    note = "keeps no prompt token ids (written before they were kept): using the prompt rendered from the decoder's"
    assert result.stderr.splitlines() == [f"old.ckpt {note} chat template today"]
    assert result.stdout.strip()
