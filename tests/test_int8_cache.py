"""The int8 calibration cache: a damaged entry is rebuilt with a warning, like the fp32 logits cache.

Regression: a truncated or garbage ``int8-calib-*.pt`` (a disk that filled up, a cache folder
copied in part) made every later int8 start fail with an internal error
(``PytorchStreamReader failed reading zip archive``, ``UnpicklingError``).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from streamdet.inference import build_engine, build_path
from streamdet.models.c3d import C3D_BN, INPUT_SHAPE

CPU = torch.device("cpu")


@dataclass(frozen=True)
class CleanEntry:
    """A calibration cache entry as a healthy build writes it, and that engine's logits."""

    name: str
    data: bytes
    clips: torch.Tensor
    logits: torch.Tensor


@pytest.fixture(scope="module")
def model() -> C3D_BN:
    torch.manual_seed(0)
    return C3D_BN(num_classes=3, width=0.0625).eval()


@pytest.fixture(scope="module")
def clean_entry(model: C3D_BN, tmp_path_factory: pytest.TempPathFactory) -> CleanEntry:
    cache = tmp_path_factory.mktemp("int8-cache")
    clips = torch.randn((2, *INPUT_SHAPE), generator=torch.Generator().manual_seed(3))
    engine = build_path(model, CPU, "int8", calibration_clips=clips, cache_dir=cache)
    (entry,) = cache.glob("int8-calib-*.pt")
    return CleanEntry(entry.name, entry.read_bytes(), clips, engine(clips))


def damaged(clean: bytes, damage: str) -> bytes:
    """``clean`` as a crash, a disk or a person might leave it."""
    if damage == "truncated":
        return clean[: len(clean) // 2]
    if damage == "garbage":
        return b"\x00not a torch file\xff" * 64
    if damage == "empty":
        return b""
    # A loadable state dict that is not all of this model's: the keys it has are copied in before
    # load_state_dict fails on the one missing, so a recalibration must start from a fresh copy.
    state = torch.load(io.BytesIO(clean), weights_only=True)
    missing = next(iter(state))
    wrong = {k: v * 100 if k.endswith("max_val") else v for k, v in state.items() if k != missing}
    buffer = io.BytesIO()
    torch.save(wrong, buffer)
    return buffer.getvalue()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "partial-state"])
def test_a_damaged_calibration_cache_is_rebuilt_with_a_warning(
    model: C3D_BN,
    clean_entry: CleanEntry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    entry = tmp_path / clean_entry.name
    entry.write_bytes(damaged(clean_entry.data, damage))

    with caplog.at_level(logging.INFO, logger="streamdet"):
        engine = build_engine(
            model, "cpu", "int8", check_clips=clean_entry.clips, cache_dir=tmp_path
        )

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert engine.precision == "int8", warnings
    assert len(warnings) == 1 and f"ignoring unreadable calibration cache {entry}" in warnings[0]
    assert "calibrating activations" in caplog.text
    # Calibrated afresh: the same scales as a build that never saw the damaged entry.
    torch.testing.assert_close(engine(clean_entry.clips), clean_entry.logits)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamdet.inference"):
        again = build_path(
            model, CPU, "int8", calibration_clips=clean_entry.clips, cache_dir=tmp_path
        )
    assert "loaded calibration statistics" in caplog.text and "ignoring" not in caplog.text
    torch.testing.assert_close(again(clean_entry.clips), clean_entry.logits)
