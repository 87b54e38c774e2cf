"""C3D_BN: the published layout, its size, input checks, BN folding and batch independence.

Only the tests marked "full model" build the published width; everything else runs at
``width=0.0625`` (a few ms per clip on CPU).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_model import randomise_bn
from torch import nn

from streamdet.models.c3d import C3D_BN, INPUT_SHAPE, conv_names, count_flops, fuse_bn

SMALL = 0.0625

# (name, in channels, out channels) of the published network.
PUBLISHED_CONVS = [
    ("conv1", 3, 64),
    ("conv2", 64, 128),
    ("conv3a", 128, 256),
    ("conv3b", 256, 256),
    ("conv4a", 256, 512),
    ("conv4b", 512, 512),
    ("conv5a", 512, 512),
    ("conv5b", 512, 512),
]
# (name, kernel = stride, padding)
PUBLISHED_POOLS = [
    ("pool1", (1, 2, 2), (0, 0, 0)),
    ("pool2", (2, 2, 2), (0, 0, 0)),
    ("pool3", (2, 2, 2), (0, 0, 0)),
    ("pool4", (2, 2, 2), (0, 0, 0)),
    ("pool5", (2, 2, 2), (0, 1, 1)),
]
PUBLISHED_ORDER = [
    "conv1",
    "conv1_bn",
    "pool1",
    "conv2",
    "conv2_bn",
    "pool2",
    "conv3a",
    "conv3a_bn",
    "conv3b",
    "conv3b_bn",
    "pool3",
    "conv4a",
    "conv4a_bn",
    "conv4b",
    "conv4b_bn",
    "pool4",
    "conv5a",
    "conv5a_bn",
    "conv5b",
    "conv5b_bn",
    "pool5",
    "fc6",
    "fc7",
    "fc8",
]


@pytest.fixture(scope="module")
def full_model() -> C3D_BN:
    """The published network, 8 classes, in eval mode (built once: ~0.6 s)."""
    torch.manual_seed(0)
    return C3D_BN(num_classes=8, width=1.0).eval()


def small_model(num_classes: int = 8, seed: int = 0, **kwargs: float) -> C3D_BN:
    torch.manual_seed(seed)
    return C3D_BN(num_classes=num_classes, width=SMALL, **kwargs)


def clips(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# --- the published network (full model) -------------------------------------------------------


def test_full_model_has_published_layer_names_in_order(full_model: C3D_BN) -> None:
    names = [
        name
        for name, module in full_model.named_children()
        if not isinstance(module, (nn.ReLU, nn.Dropout, nn.Identity))
    ]
    assert names == PUBLISHED_ORDER
    assert conv_names() == [name for name, _, _ in PUBLISHED_CONVS]


def test_full_model_convs_pools_and_fcs_have_published_shapes(full_model: C3D_BN) -> None:
    for name, in_channels, out_channels in PUBLISHED_CONVS:
        conv = getattr(full_model, name)
        assert isinstance(conv, nn.Conv3d), name
        assert (conv.in_channels, conv.out_channels) == (in_channels, out_channels), name
        assert conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1), name
        bn = getattr(full_model, f"{name}_bn")
        assert isinstance(bn, nn.BatchNorm3d) and bn.num_features == out_channels, name
    for name, kernel, padding in PUBLISHED_POOLS:
        pool = getattr(full_model, name)
        assert isinstance(pool, nn.MaxPool3d), name
        assert (tuple(pool.kernel_size), tuple(pool.stride), tuple(pool.padding)) == (
            kernel,
            kernel,
            padding,
        ), name
    fcs = [
        (fc.in_features, fc.out_features) for fc in (full_model.fc6, full_model.fc7, full_model.fc8)
    ]
    assert fcs == [(8192, 4096), (4096, 4096), (4096, 8)]


def test_full_model_has_78_034_056_parameters(full_model: C3D_BN) -> None:
    assert sum(p.numel() for p in full_model.parameters()) == 78_034_056


def test_full_model_costs_77_09_gflop_per_clip(full_model: C3D_BN) -> None:
    assert round(count_flops(full_model) / 1e9, 2) == 77.09


def test_full_model_forward_pools_to_1x4x4_and_gives_one_logit_row_per_clip(
    full_model: C3D_BN,
) -> None:
    """The one forward pass of the full model in this suite (~0.4 s)."""
    pool5_shapes: list[tuple[int, ...]] = []
    hook = full_model.pool5.register_forward_hook(
        lambda _m, _i, out: pool5_shapes.append(tuple(out.shape))
    )
    try:
        with torch.inference_mode():
            logits = full_model(clips(1))
    finally:
        hook.remove()
    assert pool5_shapes == [(1, 512, 1, 4, 4)]  # 512 * 16 = 8192 = fc6 input
    assert logits.shape == (1, 8)
    assert torch.isfinite(logits).all()


# --- size accounting at small widths -------------------------------------------------------------


def test_count_flops_equals_multiply_adds_counted_by_forward_hooks() -> None:
    """count_flops walks the layer table; the hooks see the tensors a real forward produces.
    Width 0.1 rounds channel counts (6.4 -> 6, 409.6 -> 410), so both must round alike."""
    torch.manual_seed(0)
    model = C3D_BN(num_classes=5, width=0.1).eval()
    counted = 0

    def on_conv(module: nn.Conv3d, _inputs: object, out: torch.Tensor) -> None:
        nonlocal counted
        counted += 2 * out[0].numel() * module.in_channels * 27

    def on_fc(module: nn.Linear, _inputs: object, _out: torch.Tensor) -> None:
        nonlocal counted
        counted += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(on_conv) for m in model.modules() if isinstance(m, nn.Conv3d)]
    hooks += [m.register_forward_hook(on_fc) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.inference_mode():
        model(clips(1))
    for hook in hooks:
        hook.remove()
    assert count_flops(model) == counted


@pytest.mark.parametrize("width", [0.0625, 0.125, 0.5], ids=["w0.0625", "w0.125", "w0.5"])
def test_width_scales_conv_channels_and_fc_layers(width: float) -> None:
    model = C3D_BN(num_classes=3, width=width)
    for name, _, out_channels in PUBLISHED_CONVS:
        assert getattr(model, name).out_channels == round(out_channels * width), name
    c5 = round(512 * width)
    fc = round(4096 * width)
    assert (model.fc6.in_features, model.fc6.out_features) == (c5 * 16, fc)
    assert (model.fc7.in_features, model.fc7.out_features) == (fc, fc)
    assert (model.fc8.in_features, model.fc8.out_features) == (fc, 3)
    assert model.width == width


@pytest.mark.parametrize(
    ("kwargs", "expectation"),
    [
        ({"num_classes": 1}, contextlib.nullcontext()),
        ({"dropout": 0.5}, contextlib.nullcontext()),
        ({"num_classes": 0}, pytest.raises(ValueError, match="num_classes")),
        ({"width": 0.0}, pytest.raises(ValueError, match="width")),
        ({"width": -0.5}, pytest.raises(ValueError, match="width")),
        ({"width": 4.5}, pytest.raises(ValueError, match="width")),
        ({"dropout": 1.0}, pytest.raises(ValueError, match="dropout")),
        ({"dropout": -0.1}, pytest.raises(ValueError, match="dropout")),
    ],
    ids=[
        "one-class",
        "dropout-0.5",
        "zero-classes",
        "width-0",
        "width-negative",
        "width-4.5",
        "dropout-1",
        "dropout-negative",
    ],
)
def test_constructor_checks_its_arguments(
    kwargs: dict[str, float], expectation: contextlib.AbstractContextManager
) -> None:
    with expectation:
        C3D_BN(**{"num_classes": 8, "width": SMALL, **kwargs})  # type: ignore[arg-type]


# --- input checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expectation"),
    [
        ((2, 3, 16, 112, 112), contextlib.nullcontext()),
        ((2, 3, 8, 112, 112), pytest.raises(ValueError)),
        ((3, 16, 112, 112), pytest.raises(ValueError)),
        ((1, 3, 16, 128, 171), pytest.raises(ValueError)),
        ((1, 16, 3, 112, 112), pytest.raises(ValueError)),
        ((1, 1, 16, 112, 112), pytest.raises(ValueError)),
        ((1, 3, 32, 112, 112), pytest.raises(ValueError)),
        ((1, 3, 16, 112, 112, 1), pytest.raises(ValueError)),
    ],
    ids=[
        "valid",
        "two-clips-of-8-frames",
        "no-batch-dim",
        "uncropped-frames",
        "time-and-channels-swapped",
        "one-channel",
        "32-frames",
        "six-dims",
    ],
)
def test_wrong_input_shape_raises_naming_expected_and_received_shape(
    shape: tuple[int, ...], expectation: contextlib.AbstractContextManager
) -> None:
    """Regression: the seed reshaped with ``view(-1, 8192)``, so (2, 3, 8, 112, 112) silently
    became one clip made of two half clips instead of an error."""
    model = small_model(num_classes=3).eval()
    with expectation as raised, torch.inference_mode():
        logits = model(torch.zeros(shape))
    if raised is None:
        assert logits.shape == (shape[0], 3)
    else:
        message = str(raised.value)
        assert "(B, 3, 16, 112, 112)" in message
        assert str(shape) in message


# --- inference behaviour -----------------------------------------------------------------------


def test_fuse_bn_matches_unfused_logits_with_random_bn_stats() -> None:
    model = randomise_bn(small_model(num_classes=6)).train()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_bn(model)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in fused.modules())
    assert not fused.training
    assert model.training  # the original is untouched: mode, BatchNorms and weights
    assert all(isinstance(getattr(model, f"{n}_bn"), nn.BatchNorm3d) for n in conv_names())
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    x = clips(2, seed=3)
    with torch.inference_mode():
        expected = model.eval()(x)
        actual = fused(x)
    assert (
        expected.abs().max() > 1e-3
    )  # logits big enough for a relative comparison to mean something
    assert max_relative_error(actual, expected) < 1e-5
    # Fusing a fused model changes nothing.
    refused = fuse_bn(fused).state_dict()
    assert all(torch.equal(v, refused[k]) for k, v in fused.state_dict().items())


def test_eval_logits_of_a_clip_do_not_depend_on_its_batch() -> None:
    model = randomise_bn(small_model(num_classes=5)).eval()
    batch = clips(8, seed=4)
    with torch.inference_mode():
        together = model(batch)
        for i in (0, 3, 7):
            alone = model(batch[i : i + 1])
            assert max_relative_error(alone[0], together[i]) < 1e-5, i
    # The rows differ, so a mix-up between clips would show.
    assert not torch.allclose(together[0], together[7])


def test_dropout_option_randomises_training_forward_only() -> None:
    model = small_model(num_classes=4, dropout=0.5)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(d.p == 0.5 for d in dropouts)
    x = clips(1, seed=5)
    with torch.no_grad():
        model.train()
        first, second = model(x), model(x)
        model.eval()
        third, fourth = model(x), model(x)
    assert not torch.equal(first, second)
    assert torch.equal(third, fourth)


def test_no_dropout_by_default() -> None:
    assert not any(isinstance(m, nn.Dropout) for m in small_model().modules())
