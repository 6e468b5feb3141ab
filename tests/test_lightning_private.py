"""Lightning's private names that tiny-audio builds on are all still there."""

import lightning

from tiny_audio_pl.lightning_private import USED, missing


def test_this_lightning_has_every_private_name_tiny_audio_uses():
    gone = missing()
    assert not gone, f"Lightning {lightning.__version__} changed private names tiny-audio uses: {', '.join(gone)}"


def test_the_check_names_what_is_gone(monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.setitem(USED, ModelCheckpoint, (*USED[ModelCheckpoint], "_a_name_lightning_never_had"))
    assert missing() == ["ModelCheckpoint._a_name_lightning_never_had"]
