"""Checkpoints: safetensors with metadata, safe PyTorch state dicts, Sports-1M C3D import.

A streamdet checkpoint is a safetensors file whose metadata records the architecture, width,
class names and the preprocessing contract, so a model is always rebuilt and fed exactly as it
was trained.

Example:
    >>> from streamdet.models.c3d import C3D_BN
    >>> from streamdet.models.weights import save_checkpoint, load_checkpoint
    >>> model = C3D_BN(num_classes=2, width=0.125)
    >>> save_checkpoint("/tmp/doc.safetensors", model, class_names=["none", "fall"])
    >>> load_checkpoint("/tmp/doc.safetensors").class_names
    ('none', 'fall')
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamdet.errors import WeightsError
from streamdet.models.c3d import C3D_BN, CROP_SIZE, conv_names
from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract

ARCH = "c3d_bn"
FORMAT_VERSION = "1"
RANDOM_SHA256 = "-"  # a Checkpoint's sha256 when its weights are random: no file holds them


@dataclass
class Checkpoint:
    """A loaded model with everything needed to run it correctly."""

    model: C3D_BN
    class_names: tuple[str, ...]
    contract: PreprocessContract
    name: str
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_random(self) -> bool:
        """Whether the weights are random (:func:`load_or_random` without weights)."""
        return self.sha256 == RANDOM_SHA256


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_class_names(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class_{i}" for i in range(num_classes))


def save_checkpoint(
    path: str | os.PathLike[str],
    model: C3D_BN,
    *,
    class_names: Sequence[str],
    contract: PreprocessContract = DEFAULT_CONTRACT,
    dtype: torch.dtype | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` as safetensors with its metadata.

    Args:
        path: output file; written atomically (temp file + rename).
        model: the model (its BN buffers are saved too).
        class_names: one name per output class.
        contract: preprocessing the model was trained with.
        dtype: cast floating tensors (e.g. ``torch.float16`` for a small shipped model).
        extra: more JSON-serialisable metadata (training info, metrics).
    """
    from safetensors.torch import save_file

    if len(class_names) != model.num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} names, but the model has {model.num_classes} classes"
        )
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value
    metadata = {
        "format": FORMAT_VERSION,
        "arch": ARCH,
        "width": repr(model.width),
        "num_classes": str(model.num_classes),
        "class_names": json.dumps(list(class_names)),
        "preprocess": json.dumps(contract.to_dict()),
        "extra": json.dumps(dict(extra or {})),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
    return tensors, metadata


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _torch_load_problem(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line (torch's own text is many lines
    of advice, including to retry with ``weights_only=False``, which we never do)."""
    if isinstance(exc, pickle.UnpicklingError):
        unsafe = _UNSAFE_GLOBAL.search(str(exc))
        if unsafe:
            return f"refused: unpickling it would call {unsafe.group(1)}, which is not a tensor"
        return "refused: not a pickle of plain tensors (corrupt, or unsafe objects)"
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"unreadable PyTorch file, truncated or corrupt ({detail})"


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory, not a weights file")
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a plain PyTorch state dict with ``weights_only=True``: pickles that run code are refused."""
    path = Path(path)
    _check_is_file(path)
    try:
        with (
            warnings.catch_warnings()
        ):  # e.g. "Detected pickle protocol 4": noise on the CLI's stderr
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        raise WeightsError(
            f"{path}: {_torch_load_problem(exc)}; only plain state dicts of tensors are accepted"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path}: expected a state dict of tensors, but got {type(obj).__name__}"
        )
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            problems.append(
                f"{key}: expected shape {tuple(expected[key].shape)}, got {tuple(value.shape)}"
            )
    if problems:
        raise WeightsError(f"{source}: weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    width: float | None = None,
    class_names: Sequence[str] | None = None,
) -> Checkpoint:
    """Load a model from a streamdet safetensors checkpoint or a plain PyTorch state dict.

    A safetensors checkpoint carries its own architecture, classes and preprocessing; the keyword
    arguments, when given, must agree with it. A plain state dict (``.pt``/``.pth``) has no
    metadata: the keyword arguments (or defaults: 8 classes, width 1.0) describe it, and the
    default preprocessing contract is used.

    Raises:
        WeightsError: missing, truncated or unsafe file, wrong architecture or class count.
    """
    path = Path(path)
    _check_is_file(path)
    sha = file_sha256(path)
    with open(path, "rb") as f:
        head = f.read(8)
    is_safetensors = path.suffix == ".safetensors" or (
        len(head) == 8
        and int.from_bytes(head, "little") < 100_000_000
        and not head.startswith(b"PK")
    )
    if is_safetensors:
        tensors, meta = _read_safetensors(path)
        if meta.get("arch", ARCH) != ARCH:
            raise WeightsError(f"{path}: architecture {meta.get('arch')!r} is not {ARCH!r}")
        try:
            file_width = float(meta["width"]) if "width" in meta else (width or 1.0)
            names = _class_names(json.loads(meta["class_names"])) if "class_names" in meta else None
            file_classes = int(meta["num_classes"]) if "num_classes" in meta else None
            contract = (
                PreprocessContract.from_dict(json.loads(meta["preprocess"]))
                if "preprocess" in meta
                else DEFAULT_CONTRACT
            )
            extra = json.loads(meta.get("extra", "{}"))
            if not isinstance(extra, dict):
                raise ValueError(f"extra must be a JSON object, but got {type(extra).__name__}")
        except (ValueError, TypeError, KeyError) as exc:
            raise WeightsError(f"{path}: corrupt metadata ({_first_line(exc)})") from exc
        if file_classes is None:
            fc8 = tensors.get("fc8.weight")
            if fc8 is None:
                raise WeightsError(f"{path}: no fc8.weight and no num_classes metadata")
            file_classes = int(fc8.shape[0])
        if names is None:
            names = tuple(class_names) if class_names else default_class_names(file_classes)
        if len(names) != file_classes:
            raise WeightsError(f"{path}: {len(names)} class names for {file_classes} classes")
        if num_classes is not None and num_classes != file_classes:
            raise WeightsError(
                f"{path}: checkpoint has {file_classes} classes, but {num_classes} were asked for"
            )
        if width is not None and abs(width - file_width) > 1e-9:
            raise WeightsError(
                f"{path}: checkpoint has width {file_width}, but width {width} was asked for"
            )
        if contract.crop != CROP_SIZE:
            raise WeightsError(
                f"{path}: preprocessing crop {contract.crop} does not fit C3D_BN (needs {CROP_SIZE})"
            )
        model = _build_model(path, file_classes, file_width)
        _load_into(model, tensors, path)
        return Checkpoint(model.eval(), names, contract, path.name, sha, extra)

    state = load_state_dict_file(path)
    n = num_classes or (int(state["fc8.weight"].shape[0]) if "fc8.weight" in state else 8)
    names = tuple(class_names) if class_names else default_class_names(n)
    if len(names) != n:
        raise WeightsError(f"{path}: {len(names)} class names for {n} classes")
    model = _build_model(path, n, width or 1.0)
    _load_into(model, state, path)
    return Checkpoint(model.eval(), names, DEFAULT_CONTRACT, path.name, sha, {})


def load_or_random(
    weights: str | os.PathLike[str] | None,
    *,
    num_classes: int | None = None,
    width: float | None = None,
) -> Checkpoint:
    """The checkpoint at ``weights``, or a C3D_BN with seeded random weights when it is None.

    Args:
        weights: a safetensors checkpoint or a plain state dict (``.pt``), or None.
        num_classes: the random model's classes (None: 8), and a plain state dict's (None: its
            fc8 rows). A safetensors checkpoint carries its own and ignores it.
        width: the random model's width (None: 1.0), and a plain state dict's (None: 1.0).
            A safetensors checkpoint carries its own and ignores it.

    Random weights are drawn after ``torch.manual_seed(0)``, so every caller builds the same
    model; the checkpoint's ``is_random`` is True, its ``name`` ``"random-init"``.

    Raises:
        WeightsError: as :func:`load_checkpoint`.

    Example:
        >>> ckpt = load_or_random(None, num_classes=2, width=0.0625)
        >>> ckpt.is_random, ckpt.class_names
        (True, ('class_0', 'class_1'))
    """
    if weights:
        if Path(weights).suffix == ".safetensors":
            return load_checkpoint(weights)
        return load_checkpoint(weights, num_classes=num_classes, width=width)
    classes = 8 if num_classes is None else num_classes
    torch.manual_seed(0)
    model = C3D_BN(num_classes=classes, width=1.0 if width is None else width).eval()
    return Checkpoint(
        model, default_class_names(classes), DEFAULT_CONTRACT, "random-init", RANDOM_SHA256
    )


def _class_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ValueError(
            f"class_names must be a JSON list of strings, but got {json.dumps(value)[:80]}"
        )
    return tuple(value)


def _build_model(path: Path, num_classes: int, width: float) -> C3D_BN:
    try:
        return C3D_BN(num_classes=num_classes, width=width)
    except ValueError as exc:  # e.g. width "nan" or num_classes "0" in the metadata
        raise WeightsError(f"{path}: cannot build C3D_BN ({exc})") from exc


SPORTS1M_CLASSES = 487


def import_sports1m(
    state: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    *,
    num_classes: int = 8,
    seed: int = 0,
) -> C3D_BN:
    """Build a full-width C3D_BN from a Sports-1M C3D state dict (no BN, 487-class fc8).

    Conv and fc6/fc7 weights are copied; every BN is set to identity (weight 1, bias 0, running
    mean 0, var 1 - eps so it passes values unchanged); fc8 is re-initialised for ``num_classes``.

    Raises:
        WeightsError: listing every key whose shape does not match, or that is missing.
    """
    source = Path("<state dict>")
    if not isinstance(state, Mapping):
        source = Path(state)
        state = load_state_dict_file(source)
    with torch.random.fork_rng(devices=[]):  # seeds fc8 without touching the caller's RNG
        torch.manual_seed(seed)
        model = C3D_BN(num_classes=num_classes, width=1.0)
    target = model.state_dict()
    wanted = [f"{n}.{p}" for n in conv_names() + ["fc6", "fc7"] for p in ("weight", "bias")]
    problems = []
    for key in wanted:
        if key not in state:
            problems.append(f"{key}: missing")
        elif tuple(state[key].shape) != tuple(target[key].shape):
            problems.append(
                f"{key}: expected {tuple(target[key].shape)}, got {tuple(state[key].shape)}"
            )
    if problems:
        raise WeightsError(f"{source}: not a Sports-1M C3D state dict: " + "; ".join(problems))
    with torch.no_grad():
        for key in wanted:
            target[key].copy_(state[key].float())
        for name in conv_names():
            bn = getattr(model, f"{name}_bn")
            bn.weight.fill_(1.0)
            bn.bias.zero_()
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    return model
