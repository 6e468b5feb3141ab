import math

import pytest

from tiny_audio_pl.training import warmup_cosine


def test_warmup_rises_linearly_to_the_peak():
    assert warmup_cosine(0, warmup_steps=500, total_steps=10_000) == pytest.approx(1 / 500)
    assert warmup_cosine(249, warmup_steps=500, total_steps=10_000) == pytest.approx(0.5)
    assert warmup_cosine(499, warmup_steps=500, total_steps=10_000) == pytest.approx(1.0)
    assert warmup_cosine(500, warmup_steps=500, total_steps=10_000) == pytest.approx(1.0)


def test_cosine_decays_to_the_floor_at_the_end():
    mid = 500 + (10_000 - 500) // 2
    assert warmup_cosine(mid, warmup_steps=500, total_steps=10_000) == pytest.approx(0.5, abs=1e-3)
    assert warmup_cosine(10_000, warmup_steps=500, total_steps=10_000) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(10_000, warmup_steps=500, total_steps=10_000, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(20_000, warmup_steps=500, total_steps=10_000) == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_starts_at_the_peak():
    assert warmup_cosine(0, warmup_steps=0, total_steps=100) == 1.0
    assert warmup_cosine(50, warmup_steps=0, total_steps=100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_an_alignment_stage_and_the_rest_each_warm_up_and_decay():
    schedule = [warmup_cosine(step, warmup_steps=10, total_steps=300, align_steps=100) for step in range(300)]
    assert schedule[0] == schedule[100] == pytest.approx(0.1)  # each stage starts its own warmup
    assert schedule[9] == schedule[109] == pytest.approx(1.0)
    assert schedule[99] < 0.01 and schedule[299] < 0.01  # and decays to the floor by its end
    assert schedule[55] == pytest.approx(0.5, abs=0.02) and schedule[205] == pytest.approx(0.5, abs=0.02)
