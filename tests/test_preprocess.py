"""Frame preprocessing: any frame -> (3, 112, 112) float32 as the model's contract says."""

from __future__ import annotations

import contextlib
import json
import math
import tracemalloc
from typing import Any

import numpy as np
import pytest

from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract, preprocess_frame

# Tests whose frames reach the compiled kernel run through it and through the OpenCV fallback.
# The others run once: validation and the contract come before either route, and frames whose
# region is under twice the crop, or needs more than 2x2 samples, take the OpenCV route anyway.
BOTH_ROUTES = pytest.mark.usefixtures("preprocess_route")

CROP = DEFAULT_CONTRACT.crop
OUT_SHAPE = (3, CROP, CROP)


def smooth_bgr(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A smooth colour field over normalised coordinates (u across, v down), BGR in 0..255.

    Each channel differs, so swapped channels show; it varies along both axes, so a shifted or
    missing crop shows.
    """
    blue = 40 + 170 * u
    green = 40 + 170 * v
    red = 128 + 90 * np.sin(2 * np.pi * (u + 0.5 * v))
    return np.stack([blue, green, red], axis=-1)


def smooth_frame(height: int, width: int) -> np.ndarray:
    """The field sampled at pixel centres of a (height, width) frame, as uint8 BGR."""
    v, u = np.meshgrid(
        (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij"
    )
    return np.clip(np.round(smooth_bgr(u, v)), 0, 255).astype(np.uint8)


def reference(contract: PreprocessContract = DEFAULT_CONTRACT) -> np.ndarray:
    """What resize-to-128x171-then-centre-crop-112 of the smooth field gives, computed analytically."""
    rh, rw = contract.resize
    top, left = (rh - contract.crop) / 2, (rw - contract.crop) / 2
    centres = np.arange(contract.crop) + 0.5
    v, u = np.meshgrid((top + centres) / rh, (left + centres) / rw, indexing="ij")
    pixels = smooth_bgr(u, v)  # (112, 112, 3) BGR
    if contract.channel_order == "RGB":
        pixels = pixels[..., ::-1]
    normalised = (pixels - np.asarray(contract.mean)) / np.asarray(contract.std)
    return normalised.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


def random_frame(
    height: int = 480, width: int = 640, channels: int | None = 3, seed: int = 0
) -> np.ndarray:
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- content -----------------------------------------------------------------------------------


@BOTH_ROUTES
@pytest.mark.parametrize(
    ("height", "width"),
    [
        (480, 640),
        (720, 1280),
        (1080, 1920),
        (240, 320),
        (128, 171),
        (50, 60),
        (640, 360),
        (1280, 720),
        (721, 1279),
        (256, 342),
        (255, 341),
        (100, 2000),
    ],
    ids=[
        "480p",
        "720p",
        "1080p",
        "qvga",
        "exact-128x171",
        "tiny-50x60",
        "portrait-640x360",
        "portrait-720p",
        "odd-721x1279",
        "region-exactly-2x-crop",
        "region-just-under-2x-crop",
        "wide-strip-100x2000",
    ],
)
def test_any_frame_size_gives_the_resize_then_centre_crop_content(height: int, width: int) -> None:
    out = preprocess_frame(smooth_frame(height, width))
    assert out.shape == OUT_SHAPE and out.dtype == np.float32
    # Compare in 0..255 grey levels: rounding to uint8 and interpolation cost about one level.
    levels = np.abs(out - reference()) * np.asarray(DEFAULT_CONTRACT.std)[:, None, None]
    assert levels.max() < 4.0
    assert levels.mean() < 1.0


@pytest.mark.parametrize(
    ("height", "width"),
    [(480, 640), (1000, 1000), (2000, 3000)],
    ids=["4x4-samples", "8x8-samples", "16x16-samples"],
)
def test_small_crop_contracts_supersample_large_frames_with_more_samples(
    height: int, width: int
) -> None:
    """A (16, 16) resize with an 8 px crop maps a 480x640 frame's 240x320 region onto 8x8
    pixels: more than 12 source pixels between 2x2 samples, so the grid grows (4x4 ... 16x16)
    and is averaged back in 2x2 steps; the content still matches resize-then-crop."""
    contract = PreprocessContract(resize=(16, 16), crop=8)
    out = preprocess_frame(smooth_frame(height, width), contract)
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    levels = np.abs(out - reference(contract)) * np.asarray(contract.std)[:, None, None]
    assert levels.max() < 4.0


@BOTH_ROUTES
def test_uniform_colour_is_normalised_with_the_contract_mean_and_std() -> None:
    bgr = np.array([200, 100, 30], np.uint8)
    frame = np.broadcast_to(bgr, (360, 480, 3)).copy()
    out = preprocess_frame(frame)
    rgb = bgr[::-1].astype(np.float64)
    expected = (rgb - np.asarray(DEFAULT_CONTRACT.mean)) / np.asarray(DEFAULT_CONTRACT.std)
    np.testing.assert_allclose(
        out, np.broadcast_to(expected[:, None, None], OUT_SHAPE), rtol=1e-5, atol=1e-5
    )


@BOTH_ROUTES
def test_bgr_contract_gives_the_planes_in_reverse_order() -> None:
    rgb = DEFAULT_CONTRACT
    bgr = PreprocessContract(channel_order="BGR", mean=rgb.mean[::-1], std=rgb.std[::-1])
    frame = smooth_frame(480, 640)
    out_rgb, out_bgr = preprocess_frame(frame, rgb), preprocess_frame(frame, bgr)
    np.testing.assert_allclose(out_bgr, out_rgb[::-1], rtol=1e-6, atol=1e-6)
    levels = np.abs(out_bgr - reference(bgr)) * np.asarray(bgr.std)[:, None, None]
    assert levels.max() < 4.0


@pytest.mark.parametrize(
    "convert",
    [
        lambda bgr: bgr[..., 0],
        lambda bgr: bgr[..., :1],
        lambda bgr: np.dstack([bgr, random_frame(*bgr.shape[:2], channels=1, seed=9)]),
    ],
    ids=["grayscale-HxW", "single-channel-HxWx1", "bgra"],
)
def test_grayscale_single_channel_and_bgra_frames_match_their_bgr_equivalent(convert: Any) -> None:
    frame = random_frame(240, 320)
    converted = convert(frame)
    if converted.ndim == 2 or converted.shape[2] == 1:
        gray = converted.reshape(converted.shape[:2])
        frame = np.repeat(gray[..., None], 3, axis=2)  # grey as BGR: B = G = R
    np.testing.assert_array_equal(preprocess_frame(converted), preprocess_frame(frame))


@BOTH_ROUTES
def test_non_contiguous_frame_gives_the_same_result_as_its_copy() -> None:
    # negative and doubled strides; 720x640 is large enough for the compiled kernel's route
    frame = random_frame(720, 1280)[::-1, ::2]
    np.testing.assert_array_equal(
        preprocess_frame(frame), preprocess_frame(np.ascontiguousarray(frame))
    )


# --- output buffers ----------------------------------------------------------------------------


@BOTH_ROUTES
def test_writes_into_a_preallocated_out_and_returns_it() -> None:
    frame = random_frame()
    out = np.full(OUT_SHAPE, np.nan, np.float32)
    result = preprocess_frame(frame, out=out)
    assert result is out
    np.testing.assert_array_equal(out, preprocess_frame(frame))


@BOTH_ROUTES
def test_writes_into_a_non_contiguous_slot_of_a_clip_buffer() -> None:
    """A (3, T, 112, 112) clip is filled frame by frame through ``big[:, k]`` views."""
    frame = random_frame(720, 1280)
    clip = np.zeros((3, 4, CROP, CROP), np.float32)
    slot = clip[:, 2]
    assert not slot.flags.c_contiguous
    result = preprocess_frame(frame, out=slot)
    assert np.shares_memory(result, clip)
    np.testing.assert_array_equal(clip[:, 2], preprocess_frame(frame))
    assert not clip[:, [0, 1, 3]].any()  # the other frames are untouched


@BOTH_ROUTES
def test_preallocated_out_leaves_no_new_result_allocated() -> None:
    """With ``out`` the call keeps nothing allocated: the result lives in the caller's buffer.
    (Scratch space during the call, e.g. an intermediate resize, is freed and not counted.)"""
    frame = random_frame(720, 1280)
    slot = np.zeros((3, 2, CROP, CROP), np.float32)[:, 1]
    preprocess_frame(frame, out=slot)  # warm up OpenCV
    output_bytes = 3 * CROP * CROP * 4
    tracemalloc.start()
    try:
        with_out = preprocess_frame(frame, out=slot)
        kept_with_out, _ = tracemalloc.get_traced_memory()
        without_out = preprocess_frame(frame)
        kept_without_out, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert with_out is slot
    assert kept_without_out - kept_with_out >= output_bytes  # the measurement sees a new result ...
    assert kept_with_out < output_bytes // 4  # ... and there is none with ``out``
    assert without_out.shape == OUT_SHAPE


@pytest.mark.parametrize(
    ("out", "expectation"),
    [
        (np.empty(OUT_SHAPE, np.float32), contextlib.nullcontext()),
        (np.empty(OUT_SHAPE, np.float64), pytest.raises(ValueError, match="float32")),
        (
            np.empty((CROP, CROP, 3), np.float32),
            pytest.raises(ValueError, match=r"\(3, 112, 112\)"),
        ),
        (np.empty((3, 111, 112), np.float32), pytest.raises(ValueError, match=r"\(3, 111, 112\)")),
    ],
    ids=["valid", "float64", "channels-last", "111-rows"],
)
def test_out_of_the_wrong_shape_or_dtype_raises(
    out: np.ndarray, expectation: contextlib.AbstractContextManager
) -> None:
    with expectation:
        preprocess_frame(random_frame(), out=out)


# --- invalid frames ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expectation"),
    [
        (random_frame(), contextlib.nullcontext()),
        (
            random_frame().astype(np.float32),
            pytest.raises(ValueError, match="uint8, but got float32"),
        ),
        (
            random_frame().astype(np.uint16),
            pytest.raises(ValueError, match="uint8, but got uint16"),
        ),
        (random_frame(channels=5), pytest.raises(ValueError, match=r"\(480, 640, 5\)")),
        (random_frame()[None], pytest.raises(ValueError, match=r"\(1, 480, 640, 3\)")),
        (random_frame()[:0], pytest.raises(ValueError, match="empty")),
        (None, pytest.raises(ValueError, match="NoneType")),
    ],
    ids=["valid", "float32", "uint16", "five-channels", "batch-of-frames", "empty", "none"],
)
def test_invalid_frames_raise_value_error(
    frame: Any, expectation: contextlib.AbstractContextManager
) -> None:
    with expectation:
        preprocess_frame(frame)


# --- the contract ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "contract",
    [
        DEFAULT_CONTRACT,
        PreprocessContract(
            resize=(144, 192),
            crop=112,
            channel_order="BGR",
            mean=(1.0, 2.0, 3.0),
            std=(4.0, 5.0, 6.0),
            fps=29.97,
            frame_step=3,
        ),
    ],
    ids=["default", "custom"],
)
def test_contract_round_trips_through_a_json_dict(contract: PreprocessContract) -> None:
    data = contract.to_dict()
    assert set(data) == {"resize", "crop", "channel_order", "mean", "std", "fps", "frame_step"}
    restored = PreprocessContract.from_dict(json.loads(json.dumps(data)))
    assert restored == contract
    np.testing.assert_array_equal(
        preprocess_frame(random_frame(), restored), preprocess_frame(random_frame(), contract)
    )


def test_crop_box_is_the_same_for_every_frame_size_however_often_it_is_asked() -> None:
    """crop_box remembers boxes per frame size; answers must not depend on what was asked before."""
    sizes = [(h, w) for h in range(100, 1300, 37) for w in range(100, 2000, 211)]  # > the cache
    used = PreprocessContract()
    first = [used.crop_box(h, w) for h, w in sizes]
    again = [used.crop_box(h, w) for h, w in reversed(sizes)][::-1]
    fresh = [PreprocessContract().crop_box(h, w) for h, w in sizes]
    assert first == again == fresh
    for (h, w), (y0, y1, x0, x1) in zip(sizes, first, strict=True):
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    assert used == PreprocessContract() and hash(used) == hash(PreprocessContract())
    assert set(used.to_dict()) == {
        "resize",
        "crop",
        "channel_order",
        "mean",
        "std",
        "fps",
        "frame_step",
    }


@pytest.mark.parametrize(
    ("fps", "frame_step", "source_fps", "expected"),
    [
        (10.0, 1, 10.0, 1),
        (10.0, 1, 30.0, 3),
        (10.0, 1, 29.97, 3),
        (10.0, 2, 30.0, 6),
        (25.0, 1, 50.0, 2),
        (10.0, 1, 5.0, 1),  # slower than training: every frame, never 0
        (10.0, 2, 0.0, 2),  # unknown rate: the contract's own step
        (10.0, 2, -1.0, 2),
        (10.0, 2, math.nan, 2),
        (10.0, 2, math.inf, 2),
    ],
    ids=[
        "same",
        "30fps",
        "ntsc",
        "30fps-step2",
        "50fps-of-25",
        "slower",
        "zero",
        "negative",
        "nan",
        "inf",
    ],
)
def test_step_for_samples_the_source_at_the_training_rate(
    fps: float, frame_step: int, source_fps: float, expected: int
) -> None:
    assert PreprocessContract(fps=fps, frame_step=frame_step).step_for(source_fps) == expected


@pytest.mark.parametrize(
    ("kwargs", "expectation"),
    [
        ({"channel_order": "BGR", "mean": (1, 2, 3), "std": (1, 2, 3)}, contextlib.nullcontext()),
        ({"resize": (128,)}, pytest.raises(ValueError, match="resize")),
        ({"resize": (0, 171)}, pytest.raises(ValueError, match="resize")),
        ({"crop": 0}, pytest.raises(ValueError, match="crop")),
        ({"crop": 112.5}, pytest.raises(ValueError, match="crop")),
        ({"crop": 200}, pytest.raises(ValueError, match="crop 200 must fit inside resize")),
        ({"channel_order": "RGBA"}, pytest.raises(ValueError, match="channel_order")),
        ({"mean": (1.0, 2.0)}, pytest.raises(ValueError, match="mean")),
        ({"std": (1.0, 0.0, 1.0)}, pytest.raises(ValueError, match="std > 0")),
        ({"std": (1.0, math.nan, 1.0)}, pytest.raises(ValueError, match="finite")),
        ({"fps": 0.0}, pytest.raises(ValueError, match="fps")),
        ({"fps": math.inf}, pytest.raises(ValueError, match="fps")),
        ({"frame_step": 0}, pytest.raises(ValueError, match="frame_step")),
        ({"frame_step": 1.5}, pytest.raises(ValueError, match="frame_step")),
    ],
    ids=[
        "valid-bgr",
        "resize-one-value",
        "resize-zero",
        "crop-zero",
        "crop-fraction",
        "crop-too-big",
        "channel-order",
        "mean-two-values",
        "std-zero",
        "std-nan",
        "fps-zero",
        "fps-inf",
        "frame-step-zero",
        "frame-step-fraction",
    ],
)
def test_invalid_contract_raises_value_error_naming_the_field(
    kwargs: dict[str, Any], expectation: contextlib.AbstractContextManager
) -> None:
    with expectation:
        PreprocessContract(**kwargs)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({**DEFAULT_CONTRACT.to_dict(), "gamma": 2.2}, "unknown preprocessing keys: \\['gamma'\\]"),
        ([128, 171], "mapping"),
        ({"resize": 128}, "resize"),
    ],
    ids=["unknown-key", "not-a-mapping", "resize-not-a-list"],
)
def test_from_dict_rejects_malformed_data_with_value_error(data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PreprocessContract.from_dict(data)
