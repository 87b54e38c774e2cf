"""Where the model runs and in which precision: the names, spelled once, and :func:`select_device`.

The config schema, the command line, training and inference all take their choices from these
enums, so a value is added in one place. Members are strings (``Device.CPU == "cpu"``) and print
as their value, so YAML, command-line words and log lines map onto them directly. torch is
imported by :func:`select_device` only: the config imports this module and stays fast to load.

Example:
    >>> Precision("bf16") is Precision.BF16, f"{Device.CUDA}"
    (True, 'cuda')
    >>> Device.choices()
    'auto, cpu or cuda'
    >>> Device.parse("tpu", "device")
    Traceback (most recent call last):
    ...
    ValueError: device must be auto, cpu or cuda, but got 'tpu'
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, TypeVar

from streamdet.errors import ConfigError

if TYPE_CHECKING:
    import torch

_C = TypeVar("_C", bound="_Choice")


class _Choice(str, enum.Enum):
    """A str-valued enum whose members print as their value (``f"{Device.CPU}"`` is ``cpu``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> list[str]:
        """The allowed values, in definition order (e.g. argparse's ``choices``)."""
        return [member.value for member in cls]

    @classmethod
    def choices(cls) -> str:
        """The allowed values for a message: ``auto, cpu or cuda``."""
        *rest, last = cls.values()
        return f"{', '.join(rest)} or {last}" if rest else last

    @classmethod
    def parse(cls: type[_C], value: str, what: str) -> _C:
        """``value`` as a member; a ValueError naming ``what`` and the allowed values otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{what} must be {cls.choices()}, but got {value!r}") from None


class Device(_Choice):
    """Where inference and training run. ``auto``: CUDA when present, else the CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(_Choice):
    """Inference's numeric path. ``auto`` picks the fastest one checked against fp32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"


class Amp(_Choice):
    """Training's autocast precision: ``auto`` is bf16 on CPU and on CUDA that supports it,
    else fp16; ``off`` trains in fp32. Its reduced precisions are :class:`Precision`'s."""

    AUTO = Precision.AUTO.value
    BF16 = Precision.BF16.value
    FP16 = Precision.FP16.value
    OFF = "off"


def select_device(requested: str | Device = Device.AUTO) -> torch.device:
    """The torch.device for ``requested``: ``auto`` is CUDA when available, else the CPU.

    Raises:
        ValueError: ``requested`` is not a :class:`Device` value (the schema and the command
            line reject such values before they get here).
        ConfigError: CUDA asked for, but there is none.
    """
    import torch

    device = Device.parse(requested, "device")
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested, but no CUDA device is available")
    return torch.device(device.value)
