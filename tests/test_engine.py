"""The inference engine: every path against fp32, fallback on a wrong path, int8 on real windows,
and the CUDA-only control flow (pinned memory, non-blocking copies, autocast dtype, cudnn flag set
once, CUDA graphs) through fakes, so it runs on the CPU."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from streamdet import inference, kernels
from streamdet.errors import StreamdetError
from streamdet.inference import (
    PATHS,
    Engine,
    build_engine,
    build_path,
    check_engine,
    warm_other_batch_size,
    weights_key,
)
from streamdet.inference import engine as engine_module
from streamdet.inference.fastpath import (
    ChannelPad,
    GraphedForward,
    InferenceNet,
    NonNegMaxPool3d,
    PackedConv3dReLU,
    PackedNet,
    WidthFold,
    onednn_prepack_available,
    plain_pool,
    width_folded_conv,
)
from streamdet.models.c3d import C3D_BN, INPUT_SHAPE, fuse_bn

WIDTH = 0.0625
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> C3D_BN:
    """A small C3D_BN with non-trivial BatchNorm statistics, so BN folding is exercised."""
    torch.manual_seed(0)
    m = C3D_BN(num_classes=5, width=WIDTH).eval()
    gen = torch.Generator().manual_seed(1)
    for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm3d)):
        bn.running_mean.copy_(torch.rand(bn.num_features, generator=gen) * 0.2 - 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return m


@pytest.fixture(scope="module")
def real_clips() -> torch.Tensor:
    """Six preprocessed windows of OpenCV's vtest.avi (people walking), one every 8 frames."""
    import cv2
    from assets import vtest_path

    from streamdet.preprocess import preprocess_frame

    cap = cv2.VideoCapture(str(vtest_path()))
    frames = []
    for _ in range(100 + 16 + 5 * 8):
        ok, frame = cap.read()
        assert ok, "vtest.avi ended early"
        frames.append(preprocess_frame(frame))
    cap.release()
    stack = np.stack(frames[100:], axis=1)  # (3, T, 112, 112)
    return torch.from_numpy(np.stack([stack[:, i * 8 : i * 8 + 16] for i in range(6)]))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CPU_PATHS = [p for p in PATHS if not p.endswith("-autocast") and not p.endswith("-compiled")]


@pytest.mark.parametrize(
    ("path", "max_rel"),
    [(p, 1e-5 if p.startswith("fp32") else 0.05) for p in CPU_PATHS],
)
def test_each_cpu_path_matches_unfused_fp32(
    model: C3D_BN, real_clips: torch.Tensor, path: str, max_rel: float, tmp_path: Path
) -> None:
    if path.endswith("-packed") and not onednn_prepack_available():
        pytest.skip("this PyTorch build has no oneDNN prepacking")
    engine = build_path(model, CPU, path, calibration_clips=real_clips, cache_dir=tmp_path)
    with torch.no_grad():
        expected = model(real_clips)
    for batch in (1, 4):  # packed weights are laid out for batch 1; other batches must still work
        out = engine(real_clips[:batch])
        assert out.dtype == torch.float32 and out.shape == (batch, 5)
        assert _rel(out, expected[:batch]) < max_rel
    assert engine.path == path


@pytest.mark.parametrize("path", ["fp32-packed", "bf16-packed", "int8", "fp32-eager"])
def test_a_cpu_path_gives_two_threads_calling_it_at_once_their_own_logits(
    model: C3D_BN, real_clips: torch.Tensor, path: str, tmp_path: Path
) -> None:
    """The inference stage runs one engine on several worker threads (InferenceThread workers)."""
    if path.endswith("-packed") and not onednn_prepack_available():
        pytest.skip("this PyTorch build has no oneDNN prepacking")
    engine = build_path(model, CPU, path, calibration_clips=real_clips, cache_dir=tmp_path)
    assert engine.concurrent
    expected = [engine(real_clips[i : i + 1]) for i in range(len(real_clips))]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2, timeout=10)

    def work(k: int) -> None:
        try:
            torch.set_num_threads(1)
            start.wait()
            for _ in range(4):
                got[k] += [engine(real_clips[i : i + 1]) for i in range(k, len(real_clips), 2)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for k in (0, 1):
        mine = [expected[i] for i in range(k, len(real_clips), 2)] * 4
        for out, want in zip(got[k], mine, strict=True):
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_compiled_and_graphed_engines_do_not_claim_concurrency(model: C3D_BN) -> None:
    assert not Engine(model, CPU, "bf16", 5, path="bf16-compiled").concurrent
    assert not Engine(model, torch.device("cuda"), "bf16", 5, path="bf16-autocast").concurrent
    assert Engine(model, CPU, "fp32", 5, path="fp32-eager").concurrent


needs_prepack = pytest.mark.skipif(
    not onednn_prepack_available(), reason="no oneDNN weight prepacking"
)


@needs_prepack
@pytest.mark.parametrize(("kernel", "padding"), [((3, 3, 3), (1, 1, 1)), ((1, 3, 5), (0, 1, 2))])
def test_width_folded_conv_equals_conv_then_relu(
    kernel: tuple[int, int, int], padding: tuple[int, int, int]
) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 5, kernel, padding=padding).eval()
    # Odd sizes and batch 2: the folded view must line up pixels at every edge.
    x = torch.randn(2, 3, 4, 9, 11).contiguous(memory_format=torch.channels_last_3d)
    fold, folded = WidthFold(kernel[2]), width_folded_conv(conv)
    packed = PackedConv3dReLU(folded, torch.float32, (1, folded.in_channels, 4, 9, 11))
    with torch.no_grad():
        torch.testing.assert_close(packed(fold(x)), torch.relu(conv(x)), rtol=1e-5, atol=1e-5)


def test_width_folding_refuses_a_conv_it_cannot_fold() -> None:
    with pytest.raises(ValueError, match="odd kernel width"):
        width_folded_conv(torch.nn.Conv3d(3, 4, 3, padding=1, stride=2))
    with pytest.raises(ValueError, match="odd kernel width"):
        width_folded_conv(torch.nn.Conv3d(3, 4, (3, 3, 2), padding=(1, 1, 1)))


@needs_prepack
def test_bf16_packed_path_folds_only_its_three_channel_first_conv(model: C3D_BN) -> None:
    bf16, fp32 = (build_path(model, CPU, path).model for path in ("bf16-packed", "fp32-packed"))
    assert isinstance(bf16.convs[0], torch.nn.Sequential)
    assert isinstance(bf16.convs[0][0], WidthFold) and isinstance(
        bf16.convs[0][1], PackedConv3dReLU
    )
    assert all(isinstance(c, PackedConv3dReLU) for c in bf16.convs[1:])
    assert all(isinstance(c, PackedConv3dReLU) for c in fp32.convs)  # folding gains nothing in fp32


@pytest.mark.parametrize("path", ["bf16-packed", "int8"])
def test_without_the_compiled_fold_a_path_gives_the_same_logits(
    model: C3D_BN,
    real_clips: torch.Tensor,
    path: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No Numba (or STREAMDET_NO_JIT): conv1's fold takes ATen's route from the same clip."""
    if path.endswith("-packed") and not onednn_prepack_available():
        pytest.skip("this PyTorch build has no oneDNN prepacking")
    engine = build_path(model, CPU, path, calibration_clips=real_clips, cache_dir=tmp_path)
    compiled = engine(real_clips[:2])

    monkeypatch.setattr(kernels, "get", lambda: None)

    assert torch.equal(engine(real_clips[:2]), compiled)


@pytest.mark.parametrize("path", ["bf16-packed", "int8"])
def test_a_path_that_folds_conv1_takes_the_float32_clip_as_it_comes(
    model: C3D_BN, real_clips: torch.Tensor, path: str, tmp_path: Path
) -> None:
    """Its WidthFold changes layout and dtype in one pass, so the engine makes no copy first."""
    if path.endswith("-packed") and not onednn_prepack_available():
        pytest.skip("this PyTorch build has no oneDNN prepacking")
    engine = build_path(model, CPU, path, calibration_clips=real_clips, cache_dir=tmp_path)
    clips = real_clips[:2]
    assert engine.prepare(clips) is clips
    assert (
        build_path(model, CPU, "fp32-eager")
        .prepare(clips)
        .is_contiguous(memory_format=torch.channels_last_3d)
    )


@needs_prepack
def test_packed_net_gives_one_clip_the_same_logits_as_a_batch(model: C3D_BN) -> None:
    net = PackedNet(InferenceNet(fuse_bn(model)), torch.float32).eval()
    clips = torch.randn(3, *INPUT_SHAPE).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        one = net(clips[1:2])  # batch 1 takes the matrix-vector route through the fc layers
        torch.testing.assert_close(one, net(clips)[1:2], rtol=1e-5, atol=1e-5)


@needs_prepack
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_net_pools_with_the_compiled_kernel_and_gets_atens_logits(
    model: C3D_BN, real_clips: torch.Tensor, dtype: torch.dtype
) -> None:
    net = PackedNet(InferenceNet(fuse_bn(model), fold_conv1=dtype == torch.bfloat16), dtype).eval()
    pools = [p for p in net.pools if not isinstance(p, torch.nn.Identity)]
    assert len(pools) == 5 and all(isinstance(p, NonNegMaxPool3d) for p in pools)
    for p in pools:
        p.min_elements = 0  # this small model's clips are under the default threshold
    x = real_clips[:2].to(dtype).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        fast = net(x)
        net.pools = torch.nn.ModuleList(plain_pool(p) for p in net.pools)
        assert torch.equal(fast, net(x))


@pytest.mark.slow
def test_compiled_path_matches_fp32(
    model: C3D_BN, real_clips: torch.Tensor, tmp_path: Path
) -> None:
    engine = build_path(model, CPU, "bf16-compiled", cache_dir=tmp_path)
    with torch.no_grad():
        expected = model(real_clips[:2])
    assert _rel(engine(real_clips[:2]), expected) < 0.05


def test_engine_leaves_the_model_untouched(model: C3D_BN, tmp_path: Path) -> None:
    before = weights_key(model)
    build_engine(model, "cpu", "bf16", cache_dir=tmp_path)
    assert weights_key(model) == before
    assert isinstance(model.conv1_bn, torch.nn.BatchNorm3d)


@pytest.mark.parametrize(("clips", "warmed"), [(8, [1]), (1, [2]), (6, [])])
def test_a_compiled_engine_is_warmed_on_a_second_batch_size_before_the_stream(
    clips: int, warmed: list[int]
) -> None:
    sizes: list[int] = []
    warm_other_batch_size(lambda x: sizes.append(x.shape[0]), torch.zeros(clips, *INPUT_SHAPE))
    assert sizes == warmed  # 8 clips ran as 4 + 4, 1 as 1, 6 as 4 + 2 (already two sizes)


def test_inference_net_needs_folded_bn(model: C3D_BN) -> None:
    with pytest.raises(ValueError, match="BN-folded"):
        InferenceNet(model)
    assert InferenceNet(fuse_bn(model)).num_classes == 5


def test_inference_net_with_conv1_folded_gives_the_same_logits(model: C3D_BN) -> None:
    fused = fuse_bn(model)
    plain, folded = InferenceNet(fused).eval(), InferenceNet(fused, fold_conv1=True).eval()
    clips = torch.randn(2, *INPUT_SHAPE).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        torch.testing.assert_close(folded(clips), plain(clips), rtol=1e-5, atol=1e-5)


def test_inference_net_with_conv1_channel_padded_gives_the_same_logits(model: C3D_BN) -> None:
    fused = fuse_bn(model)
    plain, padded = InferenceNet(fused).eval(), InferenceNet(fused, pad_conv1=8).eval()
    assert padded.convs[0][1].weight.shape[1] == 8
    clips = torch.randn(2, *INPUT_SHAPE).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        torch.testing.assert_close(padded(clips), plain(clips), rtol=1e-5, atol=1e-5)


def test_channel_pad_appends_zero_channels_in_channels_last_3d() -> None:
    x = torch.rand(2, 3, 4, 5, 6)
    padded = ChannelPad(8)(x)
    assert padded.shape == (2, 8, 4, 5, 6)
    assert padded.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(padded[:, :3], x) and not padded[:, 3:].any()
    with pytest.raises(ValueError, match="cannot pad 3 channels down to 2"):
        ChannelPad(2)(x)


def test_conv1_cannot_be_both_folded_and_padded(model: C3D_BN) -> None:
    with pytest.raises(ValueError, match="not both"):
        InferenceNet(fuse_bn(model), fold_conv1=True, pad_conv1=8)


def test_int8_quantizes_conv1_after_the_float_width_fold(
    model: C3D_BN, real_clips: torch.Tensor
) -> None:
    from streamdet.inference import quantize_int8

    quantized = quantize_int8(model, real_clips[:2], cache_dir=None)
    modules = dict(quantized.named_modules())
    assert isinstance(modules["convs.0.0"], WidthFold)  # kept in float, not traced and requantized
    assert modules["convs.0.1"].in_channels == 9  # conv1's 3 taps along W x 3 colours
    assert "quantized" in type(modules["convs.0.1"]).__module__


def test_int8_agrees_on_top1_with_fp32_on_real_windows(
    model: C3D_BN, real_clips: torch.Tensor, tmp_path: Path
) -> None:
    engine = build_path(model, CPU, "int8", calibration_clips=real_clips[:4], cache_dir=tmp_path)
    with torch.no_grad():
        expected = model(real_clips)
    out = engine(real_clips)
    assert float((out.argmax(1) == expected.argmax(1)).float().mean()) >= 5 / 6
    assert _rel(out, expected) < 0.05


def test_int8_calibration_is_cached_and_reused(
    model: C3D_BN, real_clips: torch.Tensor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = build_path(model, CPU, "int8", calibration_clips=real_clips[:2], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("int8-calib-*.pt"))) == 1
    with caplog.at_level(logging.INFO, logger="streamdet.inference"):
        second = build_path(
            model, CPU, "int8", calibration_clips=real_clips[:2], cache_dir=tmp_path
        )
    assert "loaded calibration statistics" in caplog.text
    torch.testing.assert_close(first(real_clips[:2]), second(real_clips[:2]))


def test_build_engine_falls_back_to_fp32_with_a_warning_when_a_path_is_wrong(
    model: C3D_BN, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    real_candidate = engine_module._candidate

    def bad_candidate(m: C3D_BN, device: torch.device, precision: str, **kw: object) -> Engine:
        engine = real_candidate(m, device, precision, **kw)
        if precision != "fp32":
            wrong = engine.model
            engine.model = lambda x: -wrong(x)  # type: ignore[assignment, operator]  # flips top-1
        return engine

    monkeypatch.setattr(engine_module, "_candidate", bad_candidate)
    with caplog.at_level(logging.WARNING, logger="streamdet.inference"):
        engine = build_engine(model, "cpu", "bf16", cache_dir=tmp_path)
    assert engine.precision == "fp32"
    assert "disagrees with fp32" in caplog.text
    x = torch.randn(2, *INPUT_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(engine(x), model(x), rtol=1e-4, atol=1e-4)


def test_check_engine_rejects_non_finite_output(model: C3D_BN) -> None:
    reference = build_path(model, CPU, "fp32-eager")
    nan = Engine(
        lambda x: torch.full((x.shape[0], 5), float("nan")),
        CPU,
        "bf16",
        5,
        input_dtype=torch.float32,
    )
    ok, _, rel = check_engine(nan, reference, torch.randn(2, *INPUT_SHAPE))
    assert not ok and not np.isfinite(rel)


@pytest.mark.parametrize(
    ("device", "bf16_supported", "has_amx", "expected"),
    [
        ("cuda", True, False, "bf16"),
        ("cuda", False, False, "fp16"),
        ("cpu", False, True, "bf16"),
        ("cpu", False, False, "fp32"),
    ],
)
def test_auto_precision_per_device(
    monkeypatch: pytest.MonkeyPatch, device: str, bf16_supported: bool, has_amx: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(engine_module, "cpu_has_fast_bf16", lambda: has_amx)
    assert engine_module._auto_precision(torch.device(device)) == expected


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_cuda_paths_use_autocast_with_the_precision_dtype(
    monkeypatch: pytest.MonkeyPatch, model: C3D_BN, precision: str, dtype: torch.dtype
) -> None:
    # _prepare would move the model to CUDA; keep it on the CPU and look at the engine's plan.
    monkeypatch.setattr(engine_module, "_prepare", lambda m, device: fuse_bn(m))
    engine = engine_module._candidate(model, torch.device("cuda"), precision)
    assert engine.path == f"{precision}-autocast"
    assert engine._autocast_dtype is dtype
    assert engine._input_dtype is torch.float32  # fp32 input; autocast casts inside


@pytest.mark.parametrize(
    ("device", "precision", "compile", "expected"),
    [
        ("cuda", "bf16", True, "bf16-compiled"),  # measured 1.6x autocast on an H100
        ("cuda", "bf16", False, "bf16-autocast"),
        ("cuda", "fp16", True, "fp16-autocast"),  # no compiled fp16 path: autocast it is
        ("cuda", "fp32", True, "fp32-compiled"),
        ("cuda", "int8", False, "int8"),
        ("cpu", "bf16", True, "bf16-compiled"),
    ],
)
def test_preferred_path_per_device_precision_and_compile(
    device: str, precision: str, compile: bool, expected: str
) -> None:
    assert engine_module._preferred_path(torch.device(device), precision, compile) == expected


def test_fp16_on_a_cpu_is_a_clear_error(model: C3D_BN) -> None:
    with pytest.raises(
        StreamdetError, match="precision fp16 needs CUDA, but the model runs on cpu"
    ):
        build_engine(model, "cpu", "fp16")


def test_int8_runs_on_the_cpu_when_the_device_is_auto_even_with_a_gpu(
    model: C3D_BN, real_clips: torch.Tensor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine

    engine = build_engine(model, "auto", "int8", check_clips=real_clips[:2], cache_dir=tmp_path)

    assert engine.device.type == "cpu" and engine.path == "int8"
    with pytest.raises(StreamdetError, match="precision int8 runs on the CPU only"):
        build_engine(model, "cuda", "int8")  # refused before anything touches CUDA


@pytest.mark.parametrize(
    ("device", "mode", "conv1_channels"),
    [("cuda", "max-autotune-no-cudagraphs", 8), ("cpu", None, 3)],
)
def test_compiled_path_autotunes_and_pads_conv1_on_cuda_only(
    model: C3D_BN,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    device: str,
    mode: str | None,
    conv1_channels: int,
) -> None:
    built: dict[str, object] = {}

    def fake_compile(net: torch.nn.Module, cache_dir: Path, mode: str | None = None):
        built.update(net=net, mode=mode)
        return net

    monkeypatch.setattr(engine_module, "compile_net", fake_compile)
    # Build the CUDA path's module on the CPU: the device decides the layout, not where it lives.
    monkeypatch.setattr(engine_module, "_prepare", lambda m, dev: fuse_bn(m))
    inference.build_path(model, torch.device(device), "bf16-compiled", cache_dir=tmp_path)
    net = built["net"]
    assert isinstance(net, InferenceNet) and built["mode"] == mode
    conv1 = net.convs[0][1] if conv1_channels != 3 else net.convs[0]
    assert conv1.in_channels == conv1_channels and conv1.weight.dtype == torch.bfloat16


def test_cudnn_benchmark_is_set_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "_cuda_configured", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    engine_module._configure_cuda()
    assert torch.backends.cudnn.benchmark is True
    torch.backends.cudnn.benchmark = False  # someone turns it off: a second build must not flip it
    engine_module._configure_cuda()
    assert torch.backends.cudnn.benchmark is False


def test_engine_copies_input_non_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []
    real_to = torch.Tensor.to

    def spy(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs)
        return real_to(self, *args, **kwargs)

    engine = Engine(
        lambda x: x.float().mean(dim=(2, 3, 4)), CPU, "fp32", 3, input_dtype=torch.float32
    )
    monkeypatch.setattr(torch.Tensor, "to", spy)
    engine(torch.zeros(2, *INPUT_SHAPE))
    assert calls and calls[0].get("non_blocking") is True


def test_inference_thread_pins_its_batch_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    pinned: list[bool] = []
    real_empty = torch.empty

    def fake_empty(*args: object, pin_memory: bool = False, **kwargs: object) -> torch.Tensor:
        pinned.append(pin_memory)
        return real_empty(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "empty", fake_empty)
    inference.InferenceThread(
        [],
        lambda x: x,
        lambda r: None,
        __import__("threading").Event(),
        max_batch=2,
        device=torch.device("cuda"),
    )
    assert pinned == [True]


class _FakeGraphs:
    """Stands in for CUDA graph capture: replay re-runs forward on the static input."""

    def __init__(self) -> None:
        self.captured: list[int] = []

    def __call__(self, forward, static_in):  # type: ignore[no-untyped-def]
        self.captured.append(static_in.shape[0])
        static_out = forward(static_in)

        def replay() -> None:
            static_out.copy_(forward(static_in))

        return replay, static_out


def test_graphed_forward_pads_to_the_next_captured_size_and_captures_once() -> None:
    capture = _FakeGraphs()
    seen: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        # a max is exact in any order; a sum over the padded channels_last copy could round
        # differently from one over x (it failed at 4.7e-6 relative with some random inputs)
        return x.amax(dim=(1, 2, 3, 4)).unsqueeze(1)

    example = torch.zeros(1, *INPUT_SHAPE).contiguous(memory_format=torch.channels_last_3d)
    graphed = GraphedForward(forward, (4, 1), example, capture=capture)
    x = torch.randn(3, *INPUT_SHAPE)
    out = graphed(x)
    torch.testing.assert_close(out, forward(x))
    assert out.shape == (3, 1)
    graphed(torch.randn(2, *INPUT_SHAPE))
    graphed(torch.randn(1, *INPUT_SHAPE))
    assert capture.captured == [4, 1]  # size 4 reused for batches 3 and 2
    seen.clear()
    graphed(torch.randn(6, *INPUT_SHAPE))  # larger than any captured size: runs directly
    assert seen == [6] and capture.captured == [4, 1]


def test_graphed_forward_zeroes_padding_rows() -> None:
    capture = _FakeGraphs()
    example = torch.zeros(1, *INPUT_SHAPE)
    graphed = GraphedForward(
        lambda x: x.amax(dim=(1, 2, 3, 4)).unsqueeze(1), (4,), example, capture=capture
    )
    graphed(torch.full((4, *INPUT_SHAPE), 7.0))
    graphed(torch.ones(1, *INPUT_SHAPE))
    static_in = graphed._graphs[4][0]
    assert float(static_in[1:].abs().max()) == 0.0


def test_engine_uses_cuda_graphs_when_asked(model: C3D_BN) -> None:
    engine = build_path(model, CPU, "fp32-eager")
    capture = _FakeGraphs()
    engine.use_cuda_graphs((2,), capture=capture)
    x = torch.randn(1, *INPUT_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(engine(x), model(x), rtol=1e-4, atol=1e-4)
    assert capture.captured == [2]


def test_build_engine_rejects_unknown_precision(model: C3D_BN) -> None:
    with pytest.raises(
        ValueError, match="precision must be auto, fp32, bf16, fp16 or int8, but got 'int4'"
    ):
        build_engine(model, "cpu", "int4")


def test_calibration_windows_come_from_the_video() -> None:
    from assets import vtest_path

    from streamdet.inference import calibration_windows

    clips = calibration_windows(vtest_path(), 3)
    assert clips.shape == (3, *INPUT_SHAPE) and clips.dtype == torch.float32
    assert float(clips.std()) > 0.1  # real footage, not a constant


@pytest.mark.parametrize(
    "content", [None, b"\x00garbage, not a video\xff" * 200], ids=["missing", "not-a-video"]
)
def test_calibration_from_a_file_that_is_not_a_video_says_why(
    tmp_path: Path, content: bytes | None
) -> None:
    from streamdet.inference import calibration_windows

    path = tmp_path / "calibration.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"calibration\.mp4: (video file not found|cannot decode)"):
        calibration_windows(path, 3)


def test_start_up_check_reuses_cached_fp32_logits(
    model: C3D_BN, real_clips: torch.Tensor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build_engine(model, "cpu", "bf16", check_clips=real_clips[:2], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("fp32-logits-*.pt"))) == 1
    with caplog.at_level(logging.INFO, logger="streamdet.inference"):
        engine = build_engine(model, "cpu", "bf16", check_clips=real_clips[:2], cache_dir=tmp_path)
    assert "reference logits loaded" in caplog.text
    assert engine.precision == "bf16"


def test_a_corrupt_cache_entry_is_recomputed(
    model: C3D_BN, real_clips: torch.Tensor, tmp_path: Path
) -> None:
    build_engine(model, "cpu", "fp32", check_clips=real_clips[:1], cache_dir=tmp_path)
    (entry,) = tmp_path.glob("fp32-logits-*.pt")
    entry.write_bytes(b"not a tensor")
    engine = build_engine(model, "cpu", "fp32", check_clips=real_clips[:1], cache_dir=tmp_path)
    assert engine.precision == "fp32"


@pytest.mark.parametrize(
    ("max_batch", "expected"), [(1, (1,)), (2, (1, 2)), (8, (1, 2, 4, 8)), (12, (1, 2, 4, 8, 12))]
)
def test_graph_batch_sizes_are_powers_of_two_up_to_max_batch(
    max_batch: int, expected: tuple[int, ...]
) -> None:
    assert inference.graph_batch_sizes(max_batch) == expected


def test_cuda_graphs_are_not_used_on_a_cpu(
    model: C3D_BN, real_clips: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="streamdet.inference"):
        engine = build_engine(
            model, "cpu", "fp32", check_clips=real_clips[:2], cuda_graph_sizes=(1, 2)
        )
    assert engine._graphed is None
    assert "CUDA graphs asked for, but the model runs on cpu" in caplog.text
