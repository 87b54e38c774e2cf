"""Building blocks of the fast inference paths: a traceable C3D, oneDNN-prepacked convolutions,
torch.compile with a persistent cache, and CUDA graphs for fixed batch sizes.

:func:`streamdet.inference.engine.build_path` assembles these; nothing here changes global state
except :func:`compile_net` (Inductor's cache directory and freezing flag, which only affect
compiles).

Example:
    >>> import torch
    >>> from streamdet.models.c3d import C3D_BN, fuse_bn
    >>> net = InferenceNet(fuse_bn(C3D_BN(num_classes=3, width=0.0625)))
    >>> net(torch.zeros(1, 3, 16, 112, 112)).shape
    torch.Size([1, 3])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamdet import kernels
from streamdet.models.c3d import C3D_BN, conv_names

log = logging.getLogger(__name__)

# conv name -> name of the pool after it (the C3D layout; pool names follow the conv's stage).
_POOL_AFTER = {
    "conv1": "pool1",
    "conv2": "pool2",
    "conv3b": "pool3",
    "conv4b": "pool4",
    "conv5b": "pool5",
}


class InferenceNet(nn.Module):
    """C3D_BN with BatchNorm folded, as a plain conv -> ReLU -> pool stack.

    No shape checks and no Identity layers between a conv and its ReLU, so FX quantization fuses
    conv+ReLU and torch.compile traces it without graph breaks. Shares (does not copy) the
    layers of ``fused``.

    Args:
        fused: a C3D_BN from :func:`streamdet.models.c3d.fuse_bn`.
        fold_conv1: run conv1 as :class:`WidthFold` then :func:`width_folded_conv` (new layers;
            the bf16-packed and int8 paths' layout, see :class:`WidthFold`).
        pad_conv1: run conv1 on its input zero-padded to this many channels
            (:class:`ChannelPad`; the compiled CUDA path's layout). 0 leaves conv1 as it is.
    """

    def __init__(self, fused: C3D_BN, *, fold_conv1: bool = False, pad_conv1: int = 0) -> None:
        super().__init__()
        for name in conv_names():
            if not isinstance(getattr(fused, f"{name}_bn"), nn.Identity):
                raise ValueError(
                    f"InferenceNet needs a BN-folded model, but {name}_bn is not folded"
                )
        self.num_classes = fused.num_classes
        convs: list[nn.Module] = [getattr(fused, name) for name in conv_names()]
        conv1 = convs[0]
        assert isinstance(conv1, nn.Conv3d)
        if fold_conv1 and pad_conv1:
            raise ValueError("conv1 can be width-folded or channel-padded, not both")
        if fold_conv1:
            convs[0] = nn.Sequential(WidthFold(conv1.kernel_size[2]), width_folded_conv(conv1))
        elif pad_conv1:
            convs[0] = nn.Sequential(ChannelPad(pad_conv1), channel_padded_conv(conv1, pad_conv1))
        self.convs = nn.ModuleList(convs)
        self.pools = nn.ModuleList(
            getattr(fused, _POOL_AFTER[name]) if name in _POOL_AFTER else nn.Identity()
            for name in conv_names()
        )
        self.fc6, self.fc7, self.fc8 = fused.fc6, fused.fc7, fused.fc8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, pool in zip(self.convs, self.pools, strict=True):
            x = pool(F.relu(conv(x)))
        x = torch.flatten(x, 1)  # (B, C5, 1, 4, 4) -> (B, C5 * 16)
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))
        return self.fc8(x)


def onednn_prepack_available() -> bool:
    """True when this PyTorch build can prepack 3D conv weights for oneDNN."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


class PackedConv3dReLU(nn.Module):
    """Conv3d + ReLU with its weight reordered once into oneDNN's blocked layout.

    Eager ``F.conv3d`` reorders the weight on every call, which at batch 1 can cost as much as
    the convolution itself; this does it once, at build time, and fuses the ReLU.

    Args:
        conv: a 3x3x3 Conv3d (stride 1, padding 1, groups 1).
        dtype: float32 or bfloat16.
        input_size: (B, C, T, H, W) the weight layout is chosen for (other shapes still work).
    """

    def __init__(self, conv: nn.Conv3d, dtype: torch.dtype, input_size: Sequence[int]) -> None:
        super().__init__()
        if conv.groups != 1 or conv.bias is None:
            raise ValueError(f"PackedConv3dReLU needs groups=1 and a bias, but got {conv}")
        self.padding = list(_triple(conv.padding))  # type: ignore[arg-type]
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        with torch.no_grad():
            weight = conv.weight.detach().to(dtype).contiguous()
            self.weight = torch._C._nn.mkldnn_reorder_conv3d_weight(  # type: ignore[call-arg]
                weight.to_mkldnn(), self.padding, self.stride, self.dilation, 1, list(input_size)
            )
            self.bias = conv.bias.detach().to(dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self.weight,
            self.bias,
            self.padding,
            self.stride,
            self.dilation,
            1,
            "relu",
            [None],
            "",
        )


class WidthFold(nn.Module):
    """(B, C, T, H, W) -> (B, C * taps, T, H, W), channels_last_3d: the channels of each pixel's
    ``taps`` neighbours along W (zero beyond the edges), for a conv whose width taps are folded
    into its input channels (see :func:`width_folded_conv`).

    In channels_last_3d memory a pixel's channels sit next to its neighbours' along W, so the
    folded tensor is an overlapping strided view of the width-padded input; one copy makes it
    dense. For C3D's conv1 (3 channels, 3 taps) on a float32 NCDHW clip, the engine's input,
    :func:`streamdet.kernels.get`'s ``fold_width3`` does the layout change, the fold and the
    conversion to ``dtype`` in one pass, several times faster than the three copies through ATen
    (see benchmarks/RESULTS.md, 'conv1's width fold in one compiled pass, and the model at batch
    1'). Other inputs take the ATen route; both give the same values.

    Why: oneDNN's AMX kernels waste most of each tile on C3D conv1's 3 input channels. With 9
    channels and 9 taps instead of 27, conv1 at batch 1 runs faster in bf16 (most of all on a busy
    host, where AMX is contended) and in int8, and the whole model gains a few percent (see
    benchmarks/RESULTS.md, 'Figures of 2026-11-26, 18:00-18:35'). fp32 gains nothing.

    Args:
        taps: the conv's kernel width (odd).
        dtype: the folded tensor's dtype (None: the input's).
    """

    _KERNEL_BITS = {
        torch.float32: (torch.int32, np.uint32),
        torch.bfloat16: (torch.int16, np.uint16),
    }

    def __init__(self, taps: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if taps < 1 or taps % 2 != 1:
            raise ValueError(f"taps must be a positive odd number, but got {taps}")
        self.taps = taps
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype or x.dtype
        compiled = kernels.get()
        if (
            compiled is not None
            and self.taps == 3
            and x.dim() == 5
            and x.shape[1] == 3
            and x.dtype == torch.float32
            and dtype in self._KERNEL_BITS
            and x.device.type == "cpu"
            and x.is_contiguous()
        ):
            return self._kernel_fold(compiled.fold_width3, x, dtype)
        pad = self.taps // 2
        b, c, t, h, w = x.shape
        padded = F.pad(x.to(dtype), (pad, pad)).contiguous(memory_format=torch.channels_last_3d)
        s = padded.stride()  # (T H W' C, 1, H W' C, W' C, C): channels innermost, then width
        folded = padded.as_strided((b, c * self.taps, t, h, w), (s[0], 1, s[2], s[3], c))
        return folded.contiguous(memory_format=torch.channels_last_3d)

    def _kernel_fold(
        self, fold: Callable[..., None], x: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        storage, bits = self._KERNEL_BITS[dtype]
        b, c, t, h, w = x.shape
        out = torch.empty((b, t, h, w, c * self.taps), dtype=storage)
        for n in range(b):
            fold(x[n].numpy(), out[n].numpy().view(bits), dtype == torch.bfloat16)
        return out.view(dtype).permute(0, 4, 1, 2, 3)  # channels_last_3d (B, C * taps, T, H, W)


def width_folded_conv(conv: nn.Conv3d) -> nn.Conv3d:
    """The conv that, applied to ``WidthFold(kw)(x)``, equals ``conv(x)``.

    Args:
        conv: a Conv3d with stride 1, dilation 1, groups 1, a bias, an odd kernel width ``kw``
            and ``kw // 2`` padding along W.
    """
    kt, kh, kw = conv.kernel_size
    pt, ph, pw = _triple(conv.padding)  # type: ignore[arg-type]
    if (
        conv.stride != (1, 1, 1)
        or conv.dilation != (1, 1, 1)
        or conv.groups != 1
        or conv.bias is None
        or kw % 2 != 1
        or pw != kw // 2
    ):
        raise ValueError(
            f"width folding needs stride 1, dilation 1, groups 1, a bias and 'same' padding "
            f"along an odd kernel width, but got {conv}"
        )
    cin, cout = conv.in_channels, conv.out_channels
    folded = nn.Conv3d(cin * kw, cout, (kt, kh, 1), padding=(pt, ph, 0)).to(conv.weight.device)
    with torch.no_grad():
        # folded channel j = tap * cin + c  <->  weight[:, c, :, :, tap]
        folded.weight.copy_(conv.weight.permute(0, 4, 1, 2, 3).reshape(cout, kw * cin, kt, kh, 1))
        assert folded.bias is not None  # nn.Conv3d's default
        folded.bias.copy_(conv.bias)
    return folded.eval()


class ChannelPad(nn.Module):
    """(B, C, T, H, W) -> (B, channels, T, H, W), channels_last_3d: the input with zero channels
    appended, for a conv whose weights are padded the same way (see :func:`channel_padded_conv`).

    Why: C3D's conv1 has 3 input channels, and 16-bit tensor-core kernels work on multiples of 8.
    On an H200, Inductor's max-autotune ran the padded conv1 on its Triton template, and the
    whole net reached the 40% of the bf16 peak target; the unpadded form has not been timed in
    that mode yet. cuDNN itself gains nothing from the padding (see benchmarks/RESULTS.md, 'GPU:
    NVIDIA H200').
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, but got {channels}")
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.channels - x.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {x.shape[1]} channels down to {self.channels}")
        padded = F.pad(x, (0, 0, 0, 0, 0, 0, 0, extra))
        return padded.contiguous(memory_format=torch.channels_last_3d)


def channel_padded_conv(conv: nn.Conv3d, channels: int) -> nn.Conv3d:
    """The conv that, applied to ``ChannelPad(channels)(x)``, equals ``conv(x)`` (zero weights
    for the added channels)."""
    if conv.groups != 1 or channels < conv.in_channels:
        raise ValueError(
            f"channel padding needs groups 1 and channels >= {conv.in_channels}, "
            f"but got {conv} and {channels}"
        )
    padded = nn.Conv3d(
        channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]  # a Conv3d's, so three ints
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    padded = padded.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:, : conv.in_channels].copy_(conv.weight)
        if conv.bias is not None:
            assert padded.bias is not None
            padded.bias.copy_(conv.bias)
    return padded.eval()


class PackedNet(nn.Module):
    """:class:`InferenceNet` with prepacked oneDNN conv+ReLU layers, in ``dtype``, channels_last_3d.

    A conv1 folded by ``InferenceNet(fold_conv1=True)`` keeps a :class:`WidthFold` in front of
    the packed conv (worth it in bf16, not in fp32: see :class:`WidthFold`), which converts to
    ``dtype``: such a net takes float32 clips, any layout; otherwise ``dtype`` channels_last_3d.

    Args:
        net: the fp32 inference net (its fc layers are copied to ``dtype``).
        dtype: float32 or bfloat16.
        batch: batch size the conv weight layouts are chosen for.
    """

    def __init__(self, net: InferenceNet, dtype: torch.dtype, batch: int = 1) -> None:
        super().__init__()
        self.num_classes = net.num_classes
        self.dtype = dtype
        convs: list[nn.Module] = []
        t, h, w = 16, 112, 112
        for layer, pool in zip(net.convs, net.pools, strict=True):
            fold, conv = (layer[0], layer[1]) if isinstance(layer, nn.Sequential) else (None, layer)
            assert isinstance(conv, nn.Conv3d)
            packed: nn.Module = PackedConv3dReLU(conv, dtype, (batch, conv.in_channels, t, h, w))
            # the fold takes the float32 clip and gives ``dtype`` (one pass, see WidthFold)
            if fold is not None:
                assert isinstance(fold, WidthFold)
                packed = nn.Sequential(WidthFold(fold.taps, dtype), packed)
            convs.append(packed)
            if isinstance(pool, nn.MaxPool3d):
                t, h, w = _pooled_size((t, h, w), _triple(pool.kernel_size), _triple(pool.padding))
        self.convs = nn.ModuleList(convs)
        # every pool follows a fused conv+ReLU, so its input is non-negative
        self.pools = nn.ModuleList(nonneg_max_pool(pool) for pool in net.pools)
        self.fc6 = _linear_copy(net.fc6, dtype)
        self.fc7 = _linear_copy(net.fc7, dtype)
        self.fc8 = _linear_copy(net.fc8, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, pool in zip(self.convs, self.pools, strict=True):
            x = pool(conv(x))
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """fc6-fc8 on pool5's output."""
        x = torch.flatten(x, 1)  # (B, C5, 1, 4, 4) -> (B, C5 * 16)
        if x.shape[0] == 1:
            # One clip reads all 100 MB of fc weights for one row: ATen's matrix-vector product
            # streams them faster than the matmul nn.Linear calls (same values); see
            # benchmarks/RESULTS.md, 'Figures of 2026-11-26, 18:00-18:35'.
            v = F.relu(_matvec(self.fc6, x[0]))
            v = F.relu(_matvec(self.fc7, v))
            return _matvec(self.fc8, v).unsqueeze(0)
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))
        return self.fc8(x)


class NonNegMaxPool3d(nn.Module):
    """``pool`` (a MaxPool3d whose stride is its kernel) for non-negative input, such as a ReLU's
    output, in channels_last_3d memory, through :func:`streamdet.kernels.get`'s
    ``max_pool_nonneg``: faster than ATen on C3D's pool1 in bf16 at batch 1, on one core against
    ATen's two, because ATen also computes int64 indices; the whole clip gains a few percent
    (``benchmarks/bench_layers.py``; see benchmarks/RESULTS.md, 'Latest figures (2026-11-26,
    19:58-21:10)').

    Values equal ATen's for non-negative input (+0 and -0 alike) and for positive NaN; negative
    input is the caller's error and gives wrong maxima, not an exception. Other dtypes and
    memory layouts run ``pool`` itself, and so do clips under ``min_elements`` (default 2^20),
    where the fixed cost of calling the kernel outweighs ATen's indices: C3D's pool4 and pool5
    ran slower through the kernel than in ATen, pool3 (1.6 M elements) faster.
    """

    _AS_INT = {torch.bfloat16: torch.int16, torch.float32: torch.int32}

    def __init__(
        self, pool: nn.MaxPool3d, pool_fn: Callable[..., None], min_elements: int = 1 << 20
    ) -> None:
        super().__init__()
        self.pool = pool
        self._pool_fn = pool_fn
        self.min_elements = min_elements
        self._kernel = _triple_array(pool.kernel_size)
        self._padding = _triple_array(pool.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        as_int = self._AS_INT.get(x.dtype)
        if (
            as_int is None
            or x.dim() != 5
            or not x.is_contiguous(memory_format=torch.channels_last_3d)
            or x.shape[0] == 0
            or x[0].numel() < self.min_elements
        ):
            return self.pool(x)
        b, c, t, h, w = x.shape
        out = torch.empty(
            (b, *_pooled_size((t, h, w), self._kernel, self._padding), c), dtype=as_int
        )
        src = x.view(as_int).permute(0, 2, 3, 4, 1)  # (B, T, H, W, C), contiguous
        for n in range(b):
            self._pool_fn(src[n].numpy(), out[n].numpy(), self._kernel, self._padding)
        return out.view(x.dtype).permute(0, 4, 1, 2, 3)  # channels_last_3d (B, C, T', H', W')


def nonneg_max_pool(pool: nn.Module, min_elements: int = 1 << 20) -> nn.Module:
    """``pool`` as a :class:`NonNegMaxPool3d` where it is a MaxPool3d the compiled kernel runs
    (kernel 1 or 2 per axis, as in C3D; stride = kernel; no dilation, ceil mode or indices) and
    the kernels load; else ``pool``."""
    compiled = kernels.get()
    if (
        compiled is None
        or not isinstance(pool, nn.MaxPool3d)
        or pool.return_indices
        or pool.ceil_mode
        or not all(k in (1, 2) for k in _triple(pool.kernel_size))
        or _triple(pool.stride) != _triple(pool.kernel_size)
        or _triple(pool.dilation) != (1, 1, 1)
    ):
        return pool
    return NonNegMaxPool3d(pool, compiled.max_pool_nonneg, min_elements)


def _pooled_size(
    size: Sequence[int], kernel: Sequence[int] | np.ndarray, padding: Sequence[int] | np.ndarray
) -> tuple[int, ...]:
    """(T, H, W) after a max pool whose stride is its kernel."""
    return tuple(
        (d + 2 * int(p) - int(k)) // int(k) + 1
        for d, k, p in zip(size, kernel, padding, strict=True)
    )


def plain_pool(pool: nn.Module) -> nn.Module:
    """The ATen pool behind a :class:`NonNegMaxPool3d` (``pool`` itself otherwise): to time or
    check the compiled pools against ATen's."""
    return pool.pool if isinstance(pool, NonNegMaxPool3d) else pool


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(i) for i in v) if isinstance(v, Sequence) else (int(v),) * 3  # type: ignore[return-value]


def _triple_array(v: int | Sequence[int]) -> np.ndarray:
    return np.asarray(_triple(v), np.int64)


def _matvec(fc: nn.Linear, v: torch.Tensor) -> torch.Tensor:
    return torch.mv(fc.weight, v) if fc.bias is None else torch.addmv(fc.bias, fc.weight, v)


def _linear_copy(fc: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    out = nn.Linear(fc.in_features, fc.out_features, bias=fc.bias is not None, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(fc.weight)
        if fc.bias is not None:
            out.bias.copy_(fc.bias)
    return out.eval()


def compile_net(
    net: nn.Module, cache_dir: Path, mode: str | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.compile ``net`` with Inductor and weight freezing, caching kernels in ``cache_dir``.

    Compilation happens lazily: on the first call (batch-specialised), and once more on the first
    other batch size, which compiles a graph dynamic in the batch (Dynamo's automatic dynamic
    shapes), so the inference thread's varying batches never recompile again. Each compile takes
    seconds on a CPU and about a minute on CUDA in max-autotune mode, cold (see
    benchmarks/RESULTS.md, 'Model: interleaved, 5 rounds, batch 1 / 4 / 16' and 'GPU: NVIDIA
    H200').

    Args:
        mode: torch.compile's mode (None: its default).
    """
    import torch._inductor.config as inductor_config

    inductor_dir = cache_dir / "inductor"
    inductor_dir.mkdir(parents=True, exist_ok=True)
    # Inductor reads this when it first compiles; set before any compile in this process.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir))
    inductor_config.freezing = True  # weights become constants: prepacked, folded
    return torch.compile(net, dynamic=None, mode=mode)


class GraphedForward:
    """Run ``forward`` through CUDA graphs captured for a few fixed batch sizes.

    A batch of n runs on the smallest captured size >= n (the padding rows are zeros and their
    outputs are dropped); a batch larger than every size runs ``forward`` directly. A graph is
    captured on first use of its size. Control flow is plain Python, so it is tested on CPU with
    a fake ``capture``.

    Args:
        forward: the model call on device tensors of shape (B, 3, 16, 112, 112).
        sizes: batch sizes to capture, e.g. (1, 4, 16).
        example: a (1, ...) device tensor giving the input's dtype, device and memory format.
        capture: ``capture(forward, static_input) -> (replay, static_output)``; CUDA graph
            capture by default.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        sizes: Sequence[int],
        example: torch.Tensor,
        capture: Callable[..., tuple[Callable[[], None], torch.Tensor]] | None = None,
    ) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"sizes must be positive batch sizes, but got {list(sizes)}")
        self.forward = forward
        self.sizes = sorted(set(int(s) for s in sizes))
        self._example = example
        self._capture = capture or cuda_graph_capture
        # size -> (static input, replay, static output); filled lazily, used by one thread only.
        self._graphs: dict[int, tuple[torch.Tensor, Callable[[], None], torch.Tensor]] = {}

    def size_for(self, n: int) -> int | None:
        """The captured size a batch of ``n`` runs on, or None to run eagerly."""
        return next((s for s in self.sizes if s >= n), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = self.size_for(n)
        if size is None:
            return self.forward(x)
        if size not in self._graphs:
            shape = (size, *self._example.shape[1:])
            static_in = torch.zeros(shape, dtype=self._example.dtype, device=self._example.device)
            static_in = static_in.contiguous(memory_format=_memory_format(self._example))
            replay, static_out = self._capture(self.forward, static_in)
            self._graphs[size] = (static_in, replay, static_out)
        static_in, replay, static_out = self._graphs[size]
        static_in[:n].copy_(x)
        if n < size:
            static_in[n:].zero_()
        replay()
        return static_out[:n].clone()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if (
        x.dim() == 5
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and not x.is_contiguous()
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


def cuda_graph_capture(
    forward: Callable[[torch.Tensor], torch.Tensor], static_in: torch.Tensor
) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture ``forward(static_in)`` as a CUDA graph (after warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: cuDNN autotuning and allocator pools settle
            forward(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward(static_in)
    return graph.replay, static_out
