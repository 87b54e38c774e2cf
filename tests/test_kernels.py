"""The compiled kernels: the supersampled crop reads the pixels OpenCV's route reads and gives its
values up to OpenCV's uint8 rounding; the index-free pool gives ATen's maxima; the width fold
gives ATen's folded values and bfloat16 rounding; all can be switched off."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from assets import vtest_frames
from torch import nn

from streamdet.inference.fastpath import NonNegMaxPool3d, WidthFold, nonneg_max_pool
from streamdet.preprocess import (
    DEFAULT_CONTRACT,
    PreprocessContract,
    _opencv_preprocess,
)

# OpenCV's route rounds the 2x2 average to uint8 (at most half a grey level); the kernel does not.
ROUNDING = 0.5 / min(DEFAULT_CONTRACT.std) + 1e-5


@pytest.fixture(scope="module")
def real_frames() -> list[np.ndarray]:
    return vtest_frames(4, every=50)


def _compiled_route(
    compiled_kernels, frame: np.ndarray, contract: PreprocessContract
) -> np.ndarray:
    grid = contract.sample_grid(*frame.shape[:2])
    assert grid is not None
    out = np.empty((3, contract.crop, contract.crop), np.float32)
    compiled_kernels.supersample2(frame, grid, contract._kernel_norm, contract._kernel_order, out)
    return out


@pytest.mark.parametrize(
    ("height", "width"), [(576, 768), (720, 1280), (1080, 1920), (721, 1279), (1280, 720)]
)
def test_sample_grid_picks_the_pixels_opencvs_nearest_exact_resize_picks(
    height: int, width: int
) -> None:
    rows, cols = np.mgrid[0:height, 0:width]
    # each pixel names itself: B, G = row, column mod 256; R = their high bits
    coded = np.stack([rows % 256, cols % 256, (rows // 256) * 16 + cols // 256], axis=-1).astype(
        np.uint8
    )
    y0, y1, x0, x1 = DEFAULT_CONTRACT.crop_box(height, width)
    size = 2 * DEFAULT_CONTRACT.crop
    picked = cv2.resize(
        coded[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_NEAREST_EXACT
    ).astype(int)
    picked_rows = picked[:, 0, 0] + 256 * (picked[:, 0, 2] // 16)  # frame coordinates
    picked_cols = picked[0, :, 1] + 256 * (picked[0, :, 2] % 16)

    grid = DEFAULT_CONTRACT.sample_grid(height, width)

    assert grid is not None and grid.shape == (4, DEFAULT_CONTRACT.crop)
    np.testing.assert_array_equal(grid[[0, 1]].T.reshape(-1), picked_rows)
    np.testing.assert_array_equal(grid[[2, 3]].T.reshape(-1), picked_cols)


@pytest.mark.parametrize(
    ("height", "width"), [(240, 320), (4320, 7680)], ids=["region-under-2x", "8k-needs-4-taps"]
)
def test_sample_grid_is_none_where_the_opencv_route_takes_over(height: int, width: int) -> None:
    assert DEFAULT_CONTRACT.sample_grid(height, width) is None


@pytest.mark.parametrize(
    "size", [None, (1280, 720), (1920, 1080), (1279, 721)], ids=["native", "720p", "1080p", "odd"]
)
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_compiled_crop_equals_the_opencv_route_up_to_its_uint8_rounding(
    compiled_kernels, real_frames: list[np.ndarray], size: tuple[int, int] | None, order: str
) -> None:
    contract = PreprocessContract(channel_order=order)  # type: ignore[arg-type]
    for frame in real_frames:
        frame = frame if size is None else cv2.resize(frame, size, interpolation=cv2.INTER_CUBIC)

        opencv = _opencv_preprocess(
            frame, contract, np.empty((3, contract.crop, contract.crop), np.float32)
        )
        diff = np.abs(_compiled_route(compiled_kernels, frame, contract) - opencv)

        assert diff.max() <= ROUNDING
        assert diff.mean() < ROUNDING / 2


def test_compiled_crop_reads_a_strided_frame_and_writes_a_strided_slot(
    compiled_kernels, real_frames
) -> None:
    frame = cv2.resize(real_frames[0], (1280, 720))
    wide = np.zeros((720, 1400, 3), np.uint8)
    wide[:, 60:1340] = frame
    view = wide[:, 60:1340]  # rows 1400 pixels apart
    clip = np.zeros((3, 4, 112, 112), np.float32)
    grid = DEFAULT_CONTRACT.sample_grid(720, 1280)

    compiled_kernels.supersample2(
        view, grid, DEFAULT_CONTRACT._kernel_norm, DEFAULT_CONTRACT._kernel_order, clip[:, 2]
    )

    np.testing.assert_array_equal(
        clip[:, 2], _compiled_route(compiled_kernels, frame, DEFAULT_CONTRACT)
    )
    assert not clip[:, [0, 1, 3]].any()


# --- pooling ----------------------------------------------------------------------------------

C3D_POOLS = [  # (kernel, padding, input (B, C, T, H, W)): C3D's pools at small widths and odd sizes
    ((1, 2, 2), (0, 0, 0), (2, 8, 16, 112, 112)),
    ((2, 2, 2), (0, 0, 0), (1, 16, 16, 56, 56)),
    ((2, 2, 2), (0, 1, 1), (2, 32, 2, 7, 7)),
    ((2, 2, 2), (0, 1, 1), (1, 5, 3, 7, 9)),
    ((2, 1, 2), (1, 0, 0), (1, 3, 5, 6, 4)),
]


def _relu_output(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Non-negative values as a ReLU leaves them: many +0 and some -0, in channels_last_3d."""
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.relu(torch.randn(shape, generator=g))
        .to(dtype)
        .contiguous(memory_format=torch.channels_last_3d)
    )
    flat = x.permute(0, 2, 3, 4, 1).view(-1)
    flat[::7] = -0.0
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("kernel", "padding", "shape"), C3D_POOLS)
def test_nonneg_pool_gives_atens_maxima_in_channels_last(dtype, kernel, padding, shape) -> None:
    pool = nn.MaxPool3d(kernel, kernel, padding)
    fast = nonneg_max_pool(pool, min_elements=0)
    x = _relu_output(shape, dtype)

    out = fast(x)

    assert isinstance(fast, NonNegMaxPool3d)
    assert torch.equal(out, pool(x))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last_3d)


def test_nonneg_pool_keeps_infinity_and_positive_nan_as_aten_does() -> None:
    pool = nn.MaxPool3d((1, 2, 2))
    x = _relu_output((1, 4, 1, 4, 4), torch.bfloat16)
    x[0, 0, 0, 0, 0] = float("inf")
    x[0, 1, 0, 2, 2] = float("nan")

    out, expected = nonneg_max_pool(pool, min_elements=0)(x), pool(x)

    assert out[0, 0, 0, 0, 0] == float("inf") and torch.isnan(out[0, 1, 0, 1, 1])
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(expected))


@pytest.mark.parametrize(
    "x",
    [
        _relu_output((1, 4, 4, 8, 8), torch.float64),
        _relu_output((1, 4, 4, 8, 8), torch.float32).contiguous(),
    ],
    ids=["float64", "contiguous-format"],
)
def test_nonneg_pool_runs_atens_pool_on_other_dtypes_and_layouts(x: torch.Tensor) -> None:
    pool = nn.MaxPool3d(2)
    assert torch.equal(nonneg_max_pool(pool, min_elements=0)(x), pool(x))


def test_nonneg_pool_leaves_small_clips_to_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = nn.MaxPool3d(2)
    fast = nonneg_max_pool(pool, min_elements=5000)
    calls: list[int] = []
    kernel = fast._pool_fn
    monkeypatch.setattr(fast, "_pool_fn", lambda *a: calls.append(1) or kernel(*a))
    small, large = (
        _relu_output((2, 8, 4, 8, 8), torch.float32),
        _relu_output((1, 8, 4, 16, 16), torch.float32),
    )

    assert torch.equal(fast(small), pool(small)) and calls == []  # 2048 elements a clip
    assert torch.equal(fast(large), pool(large)) and calls == [1]  # 8192
    empty = torch.empty((0, 8, 4, 16, 16)).contiguous(memory_format=torch.channels_last_3d)
    assert fast(empty).shape == pool(empty).shape and calls == [1]


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool3d(3),
        nn.MaxPool3d(2, stride=1),
        nn.MaxPool3d(2, ceil_mode=True),
        nn.MaxPool3d(2, dilation=2),
        nn.AvgPool3d(2),
        nn.Identity(),
    ],
    ids=["kernel-3", "stride-1", "ceil-mode", "dilation", "avg-pool", "identity"],
)
def test_pools_the_kernel_does_not_cover_are_left_as_they_are(pool: nn.Module) -> None:
    assert nonneg_max_pool(pool) is pool


def _fold_input(shape: tuple[int, ...] = (2, 3, 4, 5, 7)) -> torch.Tensor:
    """float32 NCDHW values, a few of them exactly halfway between two bfloat16 values."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    bits = x.view(torch.int32).view(-1)
    bits[::5] = (bits[::5] & ~0xFFFF) | 0x8000  # ties: round to the even neighbour, as torch does
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_width_fold_gives_atens_values_in_one_pass(
    compiled_kernels, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    x = _fold_input()
    calls: list[bool] = []
    monkeypatch.setattr(
        compiled_kernels,
        "fold_width3",
        lambda *a, f=compiled_kernels.fold_width3: calls.append(a[2]) or f(*a),
    )

    out = WidthFold(3, dtype)(x)

    assert calls == [dtype == torch.bfloat16] * 2  # once per clip
    expected = WidthFold(3, dtype)(x.contiguous(memory_format=torch.channels_last_3d))
    assert len(calls) == 2  # a channels_last input took ATen's route
    assert out.dtype == dtype and out.shape == (2, 9, 4, 5, 7)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out, expected)
    # width neighbours: channel 3k + c at w is channel c at w + k - 1, zero beyond the edges
    assert torch.equal(out[:, 3:6], x.to(dtype))
    assert (
        torch.equal(out[:, 0:3, ..., 1:], x.to(dtype)[..., :-1]) and not out[:, 0:3, ..., 0].any()
    )
    assert (
        torch.equal(out[:, 6:9, ..., :-1], x.to(dtype)[..., 1:]) and not out[:, 6:9, ..., -1].any()
    )


@pytest.mark.parametrize(
    ("taps", "x"),
    [(3, _fold_input((1, 4, 2, 3, 5))), (5, _fold_input()), (3, _fold_input().to(torch.float64))],
    ids=["four-channels", "five-taps", "float64"],
)
def test_width_folds_the_kernel_does_not_cover_take_atens_route(
    compiled_kernels, monkeypatch: pytest.MonkeyPatch, taps: int, x: torch.Tensor
) -> None:
    monkeypatch.setattr(compiled_kernels, "fold_width3", lambda *a: pytest.fail("the kernel ran"))
    out = WidthFold(taps)(x)
    assert out.shape == (x.shape[0], x.shape[1] * taps, *x.shape[2:]) and out.dtype == x.dtype


def test_no_jit_environment_variable_turns_the_kernels_off() -> None:
    code = (
        "import numpy as np\n"
        "from streamdet import kernels\n"
        "from streamdet.preprocess import preprocess_frame\n"
        "assert kernels.get() is None\n"
        "print(preprocess_frame(np.zeros((720, 1280, 3), np.uint8)).shape)\n"
    )
    env = {**os.environ, "STREAMDET_NO_JIT": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 112, 112)"
