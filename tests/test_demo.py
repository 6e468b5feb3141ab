"""``tiny-audio demo`` in a real browser: Debian's Chromium driven by Selenium, the app started and stopped here."""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, cli, cli_env, run_here
from tiny_audio_pl.runs import RunFolder
from tiny_audio_pl.scoring import read_utterances

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and importlib.util.find_spec("gradio") and importlib.util.find_spec("selenium")),
    reason="needs Debian's chromium and chromium-driver and the demo extra (.ci/run installs them)")
CLIP = ROOT / "assets" / "clips" / "dev-0000.wav"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo(trained: Path) -> Iterator[str]:
    """The demo on the smoke checkpoint and its run, at the URL it prints (bounded wait), stopped after this file's
    tests: each opens its own browser on it, as two visitors would."""
    port = _free_port()
    process = subprocess.Popen(cli("demo", "--ckpt", str(trained), "--run", str(trained.parent.parent), "--port",
                                   str(port), "--max-minutes", "1"), cwd=trained.parents[3], env=cli_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        line = ""
        while time.time() < deadline and "tiny-audio demo: http" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, "the demo stopped before serving"
        assert "tiny-audio demo: http" in line, "the demo did not print its URL within 90 s"
        yield line.split(": ", 1)[1].strip()
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _transcribe_in_page(driver, path: Path) -> tuple[str, str]:
    """Upload ``path``, press the button, and read the transcript and the status line once the status changes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def status(d) -> str:  # the status line once no request is in progress ("" while one is)
        text = d.find_element(By.CSS_SELECTOR, "#status").text
        return "" if "processing" in text or "queue" in text else text

    before = status(driver)
    driver.find_element(By.CSS_SELECTOR, "#audio input[type=file]").send_keys(str(path))
    time.sleep(2)  # the component takes the file
    driver.find_element(By.CSS_SELECTOR, "#transcribe").click()
    WebDriverWait(driver, 90).until(lambda d: status(d) not in ("", before))
    settled = WebDriverWait(driver, 30, poll_frequency=1.0)
    seen: list[str] = []  # the same, finished, status twice in a row: the request is done
    settled.until(lambda d: seen.append(status(d)) or (len(seen) > 1 and seen[-1] == seen[-2] != ""))
    text = driver.find_element(By.CSS_SELECTOR, "#transcript textarea").get_attribute("value")
    shown = seen[-1]
    clear = driver.find_elements(By.CSS_SELECTOR, "#audio button[aria-label='Clear']")
    if clear:  # ready for the next file
        clear[0].click()
    return text, shown


def test_the_demo_transcribes_as_transcribe_does_and_explains_bad_audio(demo, browser, trained, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = run_here(tmp_path, "transcribe", str(CLIP), "--ckpt", str(trained)).stdout.split("\t", 1)[1].strip()
    browser.get(demo)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#transcribe"))
    facts = browser.find_element(By.CSS_SELECTOR, "#facts").text
    assert "assets/tiny-whisper" in facts and "trained 20 steps" in facts and "val/wer" in facts
    text, status = _transcribe_in_page(browser, CLIP)
    assert text == expected and "real-time factor" in status and "1 window" in status
    browser.save_screenshot(str(tmp_path / "demo.png"))

    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    long = tmp_path / "ten-minutes.flac"
    sf.write(long, np.zeros(600 * 16_000, dtype=np.float32) + 0.01, 16_000)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16_000)
    for path, message in ((not_audio, "Cannot read"), (long, "more than this demo's 1 min"), (empty, "")):
        _, status = _transcribe_in_page(browser, path)
        assert ("No audio" in status or "Cannot" in status) if path == empty else message in status, status
    text, _ = _transcribe_in_page(browser, CLIP)  # and it keeps serving
    assert text == expected


def test_the_error_browser_shows_the_worst_utterance_with_its_audio_and_marked_errors(demo, browser, trained, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    worst = read_utterances(RunFolder.of_file(trained).newest_utterances())
    worst = max(worst, key=lambda u: u.errors)
    browser.get(demo)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#errors-tab-button, button[role=tab]"))
    next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Errors").click()

    def cells(d) -> list:
        return [e for e in d.find_elements(By.XPATH, "//*[@id='errors-table']//span[contains(@class, 'text')]")
                if e.is_displayed()]

    WebDriverWait(browser, 30).until(lambda d: len(cells(d)) > 7)
    shown = cells(browser)
    headers = shown.index(next(c for c in shown if c.text == "hypothesis")) + 1
    first = [c.text for c in shown[headers:headers + 4]]
    assert first[2] == str(worst.errors) and first[3] == str(worst.reference_words)  # the worst row first
    shown[headers + 1].click()
    WebDriverWait(browser, 60).until(lambda d: "reference:" in d.find_element(By.CSS_SELECTOR, "#errors-diff").text)
    diff = browser.find_element(By.CSS_SELECTOR, "#errors-diff").get_attribute("innerHTML")
    texts, legend = diff.split("<small>")  # the marked texts, then the legend of the marks
    assert texts.count('class="substitution"') + texts.count('class="deletion"') + texts.count('class="insertion"') > 0
    colours = browser.execute_script("return ['substitution', 'deletion', 'insertion'].map(kind => getComputedStyle("
                                     "document.querySelector('#errors-diff small .' + kind)).backgroundColor)")
    assert len(set(colours)) == 3 and "as scored" in legend  # each kind its own colour, named
    # the clip's audio is loaded into the player: its duration shows
    WebDriverWait(browser, 30).until(lambda d: re.search(r"0:0[1-9]|0:[1-5]\d", d.find_element(
        By.CSS_SELECTOR, "#errors-audio").text))
    browser.save_screenshot(str(tmp_path / "errors.png"))


def test_two_runs_side_by_side_most_different_first_and_filtered(tmp_path):
    from tiny_audio_pl.demo import RunErrors, marked
    from tiny_audio_pl.scoring import score, write_utterances

    reference = ["the red fox", "a small dog", "the old man", "my sister"]
    first = [score("dev", f"u{i}", r, h) for i, (r, h) in enumerate(zip(reference, ["the red fox", "a small cat",
                                                                                    "", "my sister"]))]
    second = [score("dev", f"u{i}", r, h) for i, (r, h) in enumerate(zip(reference, ["the red box", "a small cat",
                                                                                     "the old man", "my sister"]))]
    write_utterances(first, tmp_path / "a" / "utterances" / "step=5.tsv")
    write_utterances(second, tmp_path / "b.tsv")
    errors = RunErrors([str(tmp_path / "a"), str(tmp_path / "b.tsv")])
    rows = errors.table("all", "")
    assert [row[1] for row in rows][:2] == ["u2", "u0"]  # 3 -> 0 errors, then 0 -> 1
    assert rows[0][2:4] == [3, 0] and rows[0][6] == "" and rows[0][7] == "the old man"
    assert [row[1] for row in errors.table("all", "cat")] == ["u1"] and errors.table("other", "") == []
    html = marked("the red fox", "the red box jumps")
    assert '<span class="substitution">fox</span>' in html and '<ins class="insertion">jumps</ins>' in html
    assert errors.audio(("dev", "u0")) is None  # no run config beside a bare file: no audio, not an error
