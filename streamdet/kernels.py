"""Compiled loops for two hot spots that OpenCV and ATen serve badly: the supersampled centre
crop of a frame, and max pooling after a ReLU.

Both are Numba functions compiled for fixed argument types, cached on disk (Numba's cache, in
``$STREAMDET_CACHE_DIR/numba`` or ~/.cache/streamdet/numba, never inside the installed package),
and released from the GIL so capture threads run them side by side. They are loaded on first use; :func:`get` returns None, and callers take
their OpenCV / ATen route, when Numba is missing or broken, or when ``STREAMDET_NO_JIT=1``.

Why not OpenCV / ATen:

- ``supersample2``: 2x2 supersampling of a 720p frame's crop region to 112x112 with OpenCV is a
  3-channel nearest-neighbour resize (no SIMD path), a 2x area resize, a transpose and two
  numpy passes. One pass that reads the 4 samples of each output pixel and writes the
  normalised planes is faster, and as fast as the issue's one bilinear resize.
- ``max_pool_nonneg``: ATen's CPU ``max_pool3d`` also writes int64 indices, which dominate
  pool1 of C3D in bf16 at batch 1. The inputs follow a ReLU, so they are non-negative, and
  non-negative IEEE floats order like their bit patterns read as signed integers: the max of an
  int16 (bf16) or int32 (fp32) view is the max of the values, with no conversions, and on one
  core it beats ATen on two (``benchmarks/bench_layers.py``).

Both timings: see benchmarks/RESULTS.md, 'Latest figures (2026-11-26, 19:58-21:10)'.

Example:
    >>> k = get()
    >>> k is None or callable(k.supersample2)
    True
"""

from __future__ import annotations

import logging
import os
import threading
from types import SimpleNamespace

log = logging.getLogger(__name__)

_lock = threading.Lock()
_kernels: SimpleNamespace | None = None
_loaded = False


def get() -> SimpleNamespace | None:
    """The compiled kernels (``supersample2``, ``max_pool_nonneg``, ``fold_width3``), or None
    where unavailable."""
    global _kernels, _loaded
    if _loaded:
        return _kernels
    with _lock:
        if not _loaded:
            if os.environ.get("STREAMDET_NO_JIT", "") not in ("", "0"):
                log.info("STREAMDET_NO_JIT is set: preprocessing and pooling use OpenCV and ATen")
            else:
                log.info(
                    "loading the compiled kernels (a few seconds to compile on first use, then cached)"
                )
                try:
                    _kernels = _compile()
                except Exception as e:  # no numba, an unsupported numpy, an LLVM failure
                    log.warning(
                        "compiled kernels unavailable (%s: %s); using OpenCV and ATen",
                        type(e).__name__,
                        e,
                    )
            _loaded = True
    return _kernels


def _compile() -> SimpleNamespace:
    # Numba caches beside the module by default: inside site-packages, where files pip does not
    # know of outlive an uninstall and leave a bare `streamdet` folder that shadows a later
    # editable install. streamdet's own cache folder (as in streamdet.inference.cache) instead.
    cache_root = os.environ.get("STREAMDET_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "streamdet"
    )
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(cache_root, "numba"))
    import numba
    import numpy as np

    def jit(signatures):  # typed (compiled here, not at first call), GIL released, cached on disk
        return numba.njit(signatures, nogil=True, cache=True, boundscheck=False)

    @jit("void(uint8[:, :, :], int32[:, ::1], float32[:, ::1], int32[::1], float32[:, :, :])")
    def supersample2(frame, samples, norm, order, out):  # pragma: no cover - compiled
        """out[k, i, j] = norm[0, k] * (sum of channel order[k] over 4 samples) + norm[1, k].

        samples rows: the two sample rows of output row i (0, 1), the two sample columns of
        output column j (2, 3), as indices into ``frame``.
        """
        size = samples.shape[1]
        c0, c1, c2 = order[0], order[1], order[2]
        g0, g1, g2 = norm[0, 0], norm[0, 1], norm[0, 2]
        o0, o1, o2 = norm[1, 0], norm[1, 1], norm[1, 2]
        for i in range(size):
            a = samples[0, i]
            b = samples[1, i]
            for j in range(size):
                p = samples[2, j]
                q = samples[3, j]
                s0 = np.int32(frame[a, p, c0]) + frame[a, q, c0] + frame[b, p, c0] + frame[b, q, c0]
                s1 = np.int32(frame[a, p, c1]) + frame[a, q, c1] + frame[b, p, c1] + frame[b, q, c1]
                s2 = np.int32(frame[a, p, c2]) + frame[a, q, c2] + frame[b, p, c2] + frame[b, q, c2]
                out[0, i, j] = s0 * g0 + o0
                out[1, i, j] = s1 * g1 + o1
                out[2, i, j] = s2 * g2 + o2

    def pool(x, out, kernel, padding):  # pragma: no cover - compiled
        """Max over each window of x (T, H, W, C) into out (T', H', W', C): windows of
        ``kernel`` (kt, kh, kw), each 1 or 2, with stride = kernel and ``padding`` (pt, ph, pw)
        of -inf (at most half the kernel). A window's corners are clamped into x, so a padded
        window reads an element twice; the max is the same. Eight reads and one pure max
        expression per channel: that loop vectorizes (a running max through ``out`` does not)."""
        kt, kh, kw = kernel[0], kernel[1], kernel[2]
        pt, ph, pw = padding[0], padding[1], padding[2]
        t_in, h_in, w_in, channels = x.shape
        t_out, h_out, w_out = out.shape[0], out.shape[1], out.shape[2]
        for t in range(t_out):
            ta = max(t * kt - pt, 0)
            tb = min(t * kt - pt + kt, t_in) - 1
            for i in range(h_out):
                ia = max(i * kh - ph, 0)
                ib = min(i * kh - ph + kh, h_in) - 1
                for j in range(w_out):
                    ja = max(j * kw - pw, 0)
                    jb = min(j * kw - pw + kw, w_in) - 1
                    a, b, c, d = x[ta, ia, ja], x[ta, ia, jb], x[ta, ib, ja], x[ta, ib, jb]
                    e, f, g, h = x[tb, ia, ja], x[tb, ia, jb], x[tb, ib, ja], x[tb, ib, jb]
                    dst = out[t, i, j]
                    for k in range(channels):
                        dst[k] = max(
                            max(max(a[k], b[k]), max(c[k], d[k])),
                            max(max(e[k], f[k]), max(g[k], h[k])),
                        )

    max_pool_nonneg = jit(
        [
            "void(int16[:, :, :, ::1], int16[:, :, :, ::1], int64[::1], int64[::1])",
            "void(int32[:, :, :, ::1], int32[:, :, :, ::1], int64[::1], int64[::1])",
        ]
    )(pool)

    def fold(x, out, to_bf16):  # pragma: no cover - compiled
        """out[t, h, w, 3 k + c] = x[c, t, h, w + k - 1] (0 beyond the edges), as float32 bits
        (out uint32) or, with ``to_bf16``, bfloat16 bits rounded to nearest even as torch does
        (out uint16): C3D conv1's 3 colour channels times its 3 width taps, channels last.
        Each (t, h) row is converted once into a padded buffer, then written out in order, nine
        values per pixel (unrolled: a loop over taps and channels ran several times slower)."""
        t_in, h_in, w_in = x.shape[1], x.shape[2], x.shape[3]
        bits = x.view(np.uint32)
        row = np.zeros((3, w_in + 2), out.dtype)
        for t in range(t_in):
            for h in range(h_in):
                for c in range(3):
                    for w in range(w_in):
                        u = bits[c, t, h, w]
                        if to_bf16:
                            u = (
                                u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
                            ) >> np.uint32(16)
                        row[c, w + 1] = u
                o = out[t, h]
                for w in range(w_in):
                    o[w, 0], o[w, 1], o[w, 2] = row[0, w], row[1, w], row[2, w]
                    o[w, 3], o[w, 4], o[w, 5] = row[0, w + 1], row[1, w + 1], row[2, w + 1]
                    o[w, 6], o[w, 7], o[w, 8] = row[0, w + 2], row[1, w + 2], row[2, w + 2]

    fold_width3 = jit(
        [
            "void(float32[:, :, :, ::1], uint32[:, :, :, ::1], boolean)",
            "void(float32[:, :, :, ::1], uint16[:, :, :, ::1], boolean)",
        ]
    )(fold)
    return SimpleNamespace(
        supersample2=supersample2, max_pool_nonneg=max_pool_nonneg, fold_width3=fold_width3
    )
