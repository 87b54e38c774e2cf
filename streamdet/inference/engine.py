"""The engine: C3D_BN on the fastest numeric path for its device, checked against fp32.

``build_engine`` folds BatchNorm into the convolutions, picks the numeric path for the device
(:func:`build_path`, from the blocks in :mod:`~streamdet.inference.fastpath` and
:mod:`~streamdet.inference.int8`), and checks it against fp32 before trusting it, with the
fp32 logits cached on disk (:mod:`~streamdet.inference.cache`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamdet.device import Device, Precision, select_device
from streamdet.errors import StreamdetError
from streamdet.inference.cache import (
    default_cache_dir,
    load_reference_logits,
    reference_logits_path,
    save_reference_logits,
)
from streamdet.inference.fastpath import (
    GraphedForward,
    InferenceNet,
    PackedNet,
    compile_net,
    onednn_prepack_available,
)
from streamdet.inference.int8 import quantize_int8
from streamdet.models.c3d import C3D_BN, INPUT_SHAPE, fuse_bn

log = logging.getLogger(__name__)

PRECISIONS = tuple(Precision.values())  # ("auto", "fp32", "bf16", "fp16", "int8")


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Batch sizes to capture as CUDA graphs: powers of two below ``max_batch``, and ``max_batch``.

    A batch runs on the smallest captured size that holds it, so padding wastes less than half.

    Example:
        >>> graph_batch_sizes(12)
        (1, 2, 4, 8, 12)
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, but got {max_batch}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 convolutions beat fp32 several times."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


class Engine:
    """A callable (B, 3, 16, 112, 112) float32 tensor -> (B, num_classes) float32 logits.

    Attributes:
        device: where the model runs.
        precision: the numeric path in use (``fp32``, ``bf16``, ``fp16``, ``int8``).
        path: how it runs, e.g. ``bf16-packed`` (see :data:`PATHS`).
        num_classes: logits per clip.

    The constructor's ``input_dtype`` and ``channels_last_input`` say what the model takes: by
    default clips are converted to its parameters' dtype in channels_last_3d memory; a model
    whose first layer changes the layout itself (a
    :class:`~streamdet.inference.fastpath.WidthFold`) gets the float32 (B, C, T, H, W) clips as
    they come.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        precision: str,
        num_classes: int,
        autocast_dtype: torch.dtype | None = None,
        *,
        input_dtype: torch.dtype | None = None,
        path: str | None = None,
        channels_last_input: bool = True,
    ) -> None:
        self.model = model
        self.device = device
        self.precision = precision
        self.path = path or precision
        self.num_classes = num_classes
        self._autocast_dtype = autocast_dtype
        if input_dtype is None:
            params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
            input_dtype = params[0].dtype if params and autocast_dtype is None else torch.float32
        self._input_dtype = input_dtype
        self._input_format = (
            torch.channels_last_3d if channels_last_input else torch.contiguous_format
        )
        self._graphed: GraphedForward | None = None  # CUDA graphs, when use_cuda_graphs was called

    def __repr__(self) -> str:
        return f"Engine(path={self.path!r}, device={str(self.device)!r}, num_classes={self.num_classes})"

    @property
    def concurrent(self) -> bool:
        """True when several threads may call this engine at once: the CPU paths, which keep no
        state between calls. torch.compile's code and CUDA graphs are not made for that."""
        return (
            self.device.type == "cpu"
            and not self.path.endswith("-compiled")
            and self._graphed is None
        )

    def use_cuda_graphs(
        self, sizes: Sequence[int], capture: Callable[..., Any] | None = None
    ) -> None:
        """Replay CUDA graphs for these batch sizes (a batch is padded up to the next size)."""
        example = torch.zeros((1, *INPUT_SHAPE), dtype=self._input_dtype, device=self.device)
        example = example.contiguous(memory_format=self._input_format)
        self._graphed = GraphedForward(self._run, sizes, example, capture=capture)

    def prepare(self, clips: torch.Tensor) -> torch.Tensor:
        """``clips`` as the model takes them: on its device, in its input dtype and layout."""
        # From the pinned host batch the copy is asynchronous on CUDA; on the CPU it is a no-op.
        x = clips.to(self.device, non_blocking=True)
        return x.to(dtype=self._input_dtype, memory_format=self._input_format)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._autocast_dtype is None:
            return self.model(x)
        with torch.autocast(self.device.type, dtype=self._autocast_dtype):
            return self.model(x)

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() != 5 or tuple(clips.shape[1:]) != INPUT_SHAPE:
            raise ValueError(
                f"expected (B, {', '.join(map(str, INPUT_SHAPE))}), but got {tuple(clips.shape)}"
            )
        with torch.inference_mode():
            x = self.prepare(clips)
            forward = self._graphed or self._run
            return forward(x).float()


def _prepare(model: C3D_BN, device: torch.device) -> C3D_BN:
    fused = fuse_bn(model).to(device)
    return fused.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]


# The compiled CUDA path: Inductor's max-autotune with conv1's input padded to 8 channels ran
# closer to an H200's bf16 peak at batch 128 than the default mode; compiling cold takes longer
# (see benchmarks/RESULTS.md, 'GPU: NVIDIA H200').
CUDA_COMPILE_MODE = "max-autotune-no-cudagraphs"
CUDA_CONV1_CHANNELS = 8


# Every way this package can run the model. build_engine picks one per precision and device;
# the benchmarks time them all.
PATHS = (
    "fp32-eager",
    "fp32-packed",
    "fp32-compiled",
    "bf16-eager",
    "bf16-packed",
    "bf16-compiled",
    "bf16-autocast",
    "fp16-autocast",
    "int8",
)


def build_path(
    model: C3D_BN,
    device: torch.device,
    path: str,
    *,
    calibration_clips: torch.Tensor | None = None,
    cache_dir: str | Path | None = None,
) -> Engine:
    """Build one named inference path (no check against fp32; see :func:`build_engine`).

    Args:
        model: a C3D_BN (left untouched).
        device: CPU or CUDA device.
        path: one of :data:`PATHS`. ``*-eager``: BN folded, channels_last_3d, weights in the
            dtype; ``*-packed``: conv weights reordered once for oneDNN with ReLU fused (CPU);
            ``*-compiled``: torch.compile with Inductor freezing (cached in ``cache_dir``);
            ``*-autocast``: fp32 weights under autocast (CUDA); ``int8``: FX static int8,
            calibrated on ``calibration_clips`` (CPU).
        calibration_clips: real windows for int8 calibration.
        cache_dir: compile and calibration cache; :func:`~streamdet.inference.cache.default_cache_dir`
            when None.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, but got {path!r}")
    num_classes = model.num_classes
    precision = path.split("-")[0]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if path == "int8":
        return build_int8_engine(
            model, device, calibration_clips=calibration_clips, cache_dir=cache
        )
    if path.endswith("-autocast"):
        if device.type != "cuda":
            raise ValueError(f"path {path} needs CUDA; on the CPU use bf16-packed or fp32-packed")
        return Engine(
            _prepare(model, device), device, precision, num_classes, autocast_dtype=dtype, path=path
        )
    if path.endswith("-eager"):
        return Engine(_prepare(model, device).to(dtype), device, precision, num_classes, path=path)
    if path.endswith("-packed"):
        if device.type != "cpu" or not onednn_prepack_available():
            raise ValueError(f"path {path} needs a CPU PyTorch build with oneDNN")
        # conv1's width taps folded into its channels: faster in bf16, not in fp32 (fastpath.WidthFold);
        # the fold also converts the float32 clip, so it gets the clip as it comes
        fold = dtype == torch.bfloat16
        net = PackedNet(InferenceNet(_prepare(model, device), fold_conv1=fold), dtype)
        return Engine(
            net,
            device,
            precision,
            num_classes,
            input_dtype=torch.float32 if fold else dtype,
            path=path,
            channels_last_input=not fold,
        )
    if path.endswith("-compiled"):
        cuda = device.type == "cuda"
        # On CUDA Inductor also times its Triton convolutions against cuDNN's, layer by layer.
        plain = InferenceNet(_prepare(model, device), pad_conv1=CUDA_CONV1_CHANNELS if cuda else 0)
        compiled = compile_net(plain.to(dtype).eval(), cache, CUDA_COMPILE_MODE if cuda else None)
        return Engine(compiled, device, precision, num_classes, input_dtype=dtype, path=path)
    raise ValueError(f"path must be one of {PATHS}, but got {path!r}")


def build_int8_engine(
    model: C3D_BN,
    device: torch.device,
    *,
    calibration_clips: torch.Tensor | None = None,
    cache_dir: Path | None = None,
) -> Engine:
    """The int8 path (:func:`~streamdet.inference.int8.quantize_int8`) as an Engine (CPU only).

    Args:
        model: a C3D_BN.
        device: must be the CPU (PyTorch's int8 kernels are CPU kernels).
        calibration_clips: real windows to calibrate on; random clips when None (with a warning:
            the scales will not fit real footage).
        cache_dir: calibration cache; :func:`~streamdet.inference.cache.default_cache_dir` when
            None.
    """
    if device.type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only, but device is {device}")
    if calibration_clips is None:
        log.warning("int8: no real windows given to calibrate on; using random clips")
        calibration_clips = torch.randn(
            (4, *INPUT_SHAPE), generator=torch.Generator().manual_seed(0)
        )
    quantized = quantize_int8(model, calibration_clips, cache_dir=cache_dir or default_cache_dir())
    # the float WidthFold in front changes the layout itself (fastpath.WidthFold)
    return Engine(
        quantized,
        device,
        "int8",
        model.num_classes,
        input_dtype=torch.float32,
        channels_last_input=False,
    )


def _preferred_path(device: torch.device, precision: str, compile: bool) -> str:
    if precision == "int8":
        return "int8"
    if device.type == "cuda":
        if precision == "bf16" and compile:
            # Faster than bf16 autocast at large batches; see benchmarks/RESULTS.md, 'GPU: NVIDIA
            # H100' and 'GPU: NVIDIA H200'.
            return "bf16-compiled"
        if precision in ("bf16", "fp16"):
            return f"{precision}-autocast"
        return "fp32-compiled" if compile else "fp32-eager"
    if precision == "fp16":
        raise ValueError("precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    if compile:
        return f"{precision}-compiled"
    return f"{precision}-packed" if onednn_prepack_available() else f"{precision}-eager"


def _candidate(
    model: C3D_BN,
    device: torch.device,
    precision: str,
    *,
    compile: bool = False,
    calibration_clips: torch.Tensor | None = None,
    cache_dir: Path | None = None,
) -> Engine:
    if precision not in PRECISIONS or precision == Precision.AUTO:
        raise ValueError(f"precision must be one of {PRECISIONS[1:]}, but got {precision!r}")
    path = _preferred_path(device, precision, compile)
    return build_path(model, device, path, calibration_clips=calibration_clips, cache_dir=cache_dir)


def _auto_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


_cuda_configured = False


def _configure_cuda() -> None:
    """Set process-wide CUDA flags once: cuDNN autotuning (input shapes are fixed per batch size)."""
    global _cuda_configured
    if _cuda_configured:
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    _cuda_configured = True


# The start-up check runs its clips in chunks of this many.
CHECK_BATCH = 4


def check_engine(
    engine: Callable[[torch.Tensor], torch.Tensor],
    reference: Callable[[torch.Tensor], torch.Tensor],
    clips: torch.Tensor,
    *,
    max_rel_error: float = 0.05,
    batch: int = CHECK_BATCH,
    expected: torch.Tensor | None = None,
) -> tuple[bool, float, float]:
    """Compare ``engine`` with an fp32 ``reference`` on ``clips``.

    Args:
        expected: the reference's logits on ``clips`` when already known (then it is not run).

    Returns:
        (ok, top-1 agreement in [0, 1], relative error ||a - b|| / ||b|| of the logits).
    """
    a = _run_batched(engine, clips, batch)
    b = expected if expected is not None else _run_batched(reference, clips, batch)
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
    ok = bool(np.isfinite(rel)) and agree == 1.0 and rel <= max_rel_error
    return ok, agree, rel


def _compile_notice(device: torch.device) -> str:
    if device.type == "cuda":
        return " (torch.compile, autotuning each layer: a few minutes on a cold cache)"
    return " (torch.compile: tens of seconds on a cold cache)"


def warm_other_batch_size(
    engine: Callable[[torch.Tensor], torch.Tensor], clips: torch.Tensor, batch: int = CHECK_BATCH
) -> None:
    """Call ``engine`` once on a batch size the start-up check (chunks of ``batch``) did not use.

    A compiled engine compiles again, for any batch size, the first time it sees a second size;
    doing that here keeps the compile (a minute with CUDA's max-autotune) out of a live stream.
    """
    seen = {len(chunk) for chunk in torch.split(clips, batch)}
    if len(seen) > 1:
        return
    size = 1 if 1 not in seen else 2
    log.info("inference: compiling for varying batch sizes too (batch of %d)", size)
    engine(clips[:1].expand(size, *clips.shape[1:]).contiguous())


def _run_batched(
    fn: Callable[[torch.Tensor], torch.Tensor], clips: torch.Tensor, batch: int = CHECK_BATCH
) -> torch.Tensor:
    return torch.cat([fn(clips[i : i + batch]).cpu() for i in range(0, clips.shape[0], batch)])


def _reference_logits(
    model: C3D_BN, reference: Engine, clips: torch.Tensor, cache: Path
) -> torch.Tensor:
    """fp32 logits of ``clips``, cached by the weights' and clips' sha256 (fp32 is the slow part
    of a start-up check on a CPU; see benchmarks/RESULTS.md, '`build_engine` start-up')."""
    path = reference_logits_path(cache, model, clips)
    logits = load_reference_logits(path, (clips.shape[0], model.num_classes))
    if logits is None:
        logits = _run_batched(reference, clips)
        save_reference_logits(path, logits)
    return logits


def build_engine(
    model: C3D_BN,
    device: str | Device | torch.device = Device.CPU,
    precision: str | Precision = Precision.AUTO,
    *,
    check_clips: torch.Tensor | None = None,
    compile: bool = False,
    cache_dir: str | Path | None = None,
    max_rel_error: float = 0.05,
    cuda_graph_sizes: Sequence[int] = (),
) -> Engine:
    """Build the fastest correct inference path for ``model`` on ``device``.

    Args:
        model: a C3D_BN (left untouched; the engine works on a fused copy).
        device: a :class:`~streamdet.device.Device` (``"auto"``, ``"cpu"``, ``"cuda"``) or a
            torch.device.
        precision: a :class:`~streamdet.device.Precision`: ``auto`` picks bf16 on CPUs with AMX/AVX512-BF16 and on CUDA (fp16 where bf16
            is unsupported), fp32 elsewhere; or force ``fp32``/``bf16``/``fp16``/``int8``.
        check_clips: real windows (B, 3, 16, 112, 112) to check a reduced-precision path against
            fp32 with, and to calibrate int8 on; random clips when None. A path that disagrees
            on top-1 or errs more than ``max_rel_error`` falls back to fp32 with a warning.
        compile: torch.compile the path (Inductor, weights frozen): faster per clip, but the
            first start compiles for tens of seconds on a CPU and a few minutes on CUDA, where
            Inductor autotunes each layer (kernels are cached in ``cache_dir``).
        cache_dir: compiled kernels and int8 calibration statistics; ``$STREAMDET_CACHE_DIR`` or
            ~/.cache/streamdet when None.
        max_rel_error: largest relative logit error accepted against fp32.
        cuda_graph_sizes: on CUDA, batch sizes to replay as CUDA graphs (e.g. ``(1, 4, 8)``).

    Returns:
        A callable mapping a (B, 3, 16, 112, 112) float32 tensor to (B, num_classes) logits.

    Example:
        >>> from streamdet.models.c3d import C3D_BN
        >>> engine = build_engine(C3D_BN(num_classes=3, width=0.0625), "cpu", "fp32")
        >>> engine(torch.zeros(2, 3, 16, 112, 112)).shape
        torch.Size([2, 3])
    """
    precision = Precision.parse(precision, "precision").value
    if precision == Precision.INT8 and device == Device.AUTO:
        device = Device.CPU  # PyTorch's int8 kernels are CPU kernels, even where a GPU is present
    dev = device if isinstance(device, torch.device) else select_device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise StreamdetError(
            f"precision fp16 needs CUDA, but the model runs on {dev.type}: use bf16, fp32 or int8"
        )
    if precision == "int8" and dev.type != "cpu":
        raise StreamdetError(
            f"precision int8 runs on the CPU only (PyTorch's int8 kernels), but the device is "
            f"{dev.type}: set device cpu (or auto), or use bf16 or fp16 on CUDA"
        )
    model = model.eval()
    chosen = _auto_precision(dev) if precision == "auto" else precision
    if dev.type == "cuda":
        _configure_cuda()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if check_clips is None:
        gen = torch.Generator().manual_seed(0)
        check_clips = torch.randn((2, *INPUT_SHAPE), generator=gen)
    t0 = time.perf_counter()
    log.info(
        "inference: building the %s path on %s%s",
        chosen,
        dev,
        _compile_notice(dev) if compile else "",
    )
    engine = _candidate(
        model, dev, chosen, compile=compile, calibration_clips=check_clips, cache_dir=cache
    )
    if cuda_graph_sizes:
        if dev.type == "cuda":
            engine.use_cuda_graphs(cuda_graph_sizes)
        else:
            log.info("inference: CUDA graphs asked for, but the model runs on %s: not used", dev)
    # Reference: the model as trained (BN not folded), fp32, eager.
    ref_model = model if dev.type == "cpu" else copy.deepcopy(model).to(dev)
    reference = Engine(
        ref_model, dev, "fp32", model.num_classes, input_dtype=torch.float32, path="fp32-reference"
    )
    log.info(
        "inference: checking %s against fp32 on %d windows (the first call also compiles/warms up)",
        engine.path,
        check_clips.shape[0],
    )
    expected = _reference_logits(model, reference, check_clips, cache)
    ok, agree, rel = check_engine(
        engine, reference, check_clips, max_rel_error=max_rel_error, expected=expected
    )
    if not ok:
        log.warning(
            "precision %s (%s) disagrees with fp32 (top-1 agreement %.0f%%, relative error %.3g): "
            "using fp32",
            chosen,
            engine.path,
            agree * 100,
            rel,
        )
        if chosen == "fp32":
            return reference
        engine = _candidate(model, dev, "fp32", cache_dir=cache)
        ok, agree, rel = check_engine(
            engine, reference, check_clips, max_rel_error=max_rel_error, expected=expected
        )
        if not ok:
            log.warning(
                "path %s disagrees with the model too (relative error %.3g): using plain eager fp32",
                engine.path,
                rel,
            )
            return reference
    if engine.path.endswith("-compiled"):
        warm_other_batch_size(engine, check_clips)
    log.info(
        "inference path: %s on %s (top-1 agreement %.0f%%, relative error %.2g vs fp32; ready in %.1f s)",
        engine.path,
        dev,
        agree * 100,
        rel,
        time.perf_counter() - t0,
    )
    return engine
