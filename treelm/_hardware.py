"""What device am I? ``--hardware auto`` (detected) or a profile such as ``cpu:2GiB`` or ``cuda:24GiB``.

Detection is light (no torch): CPU cores and instruction-set flags from the OS, RAM from
``sysconf``, an NVIDIA GPU and its memory from ``nvidia-smi`` when it is installed, an Apple
GPU (Metal, unified memory: it shares the RAM) from the platform.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DeviceProfile", "detect_hardware", "hardware_profile", "parse_size"]

DEVICES = ("cpu", "cuda", "mps")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)\s*$", re.IGNORECASE)
_ISA_FLAGS = ("avx512f", "avx512_bf16", "avx2", "avx", "f16c", "fma", "neon", "asimd", "sve")


def parse_size(text: str, field: str = "memory") -> int:
    """``2GiB``, ``512MiB``, ``8GB`` -> bytes; ValueError naming the field otherwise."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{field}: {text!r} is not a size like 2GiB, 512MiB or 8GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class DeviceProfile:
    """A device as matching sees it, and what was found out about it."""

    device: str  # cpu | cuda | mps
    memory: int  # bytes available to the model (RAM, or the GPU's memory)
    cores: int = 1
    isa: tuple[str, ...] = ()  # CPU instruction-set features found (avx2, avx512f, neon, ...)
    accelerator: str = ""  # the GPU's name, when there is one
    source: str = "profile"  # profile | detected

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"hardware: device {self.device!r} is not one of {', '.join(DEVICES)}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory <= 0:
            raise ValueError(f"hardware: memory must be a positive number of bytes, got {self.memory!r}")

    @property
    def memory_text(self) -> str:
        return f"{self.memory}B"  # what the registry's Match takes

    def describe(self) -> str:
        gib = self.memory / (1 << 30)
        parts = [f"{self.device} with {gib:.1f} GiB"]
        if self.accelerator:
            parts.append(self.accelerator)
        if self.device == "cpu":
            parts.append(f"{self.cores} cores" + (f" ({', '.join(self.isa)})" if self.isa else ""))
        return ", ".join(parts) + f" [{self.source}]"


def _ram() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _isa() -> tuple[str, ...]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ("neon",) if platform.machine().lower() in ("arm64", "aarch64") else ()
    flags = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags |= set(line.split(":", 1)[-1].split())
    return tuple(f for f in _ISA_FLAGS if f in flags)


def _nvidia() -> tuple[str, int] | None:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run(
            [tool, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    name, _, mib = first.rpartition(",")
    try:
        return name.strip(), int(float(mib)) << 20
    except ValueError:
        return None


def detect_hardware() -> DeviceProfile:
    """This machine: its NVIDIA GPU if it has one, else its Apple GPU, else its CPU and RAM."""
    cores, isa, ram = os.cpu_count() or 1, _isa(), _ram()
    gpu = _nvidia()
    if gpu is not None:
        return DeviceProfile("cuda", gpu[1], cores, isa, gpu[0], "detected")
    if platform.system() == "Darwin" and platform.machine() == "arm64" and ram:
        return DeviceProfile("mps", ram, cores, isa, "Apple GPU (unified memory)", "detected")
    if not ram:
        raise ValueError("hardware: cannot read this machine's memory; give a profile such as cpu:8GiB")
    return DeviceProfile("cpu", ram, cores, isa, "", "detected")


def hardware_profile(text: str) -> DeviceProfile:
    """``auto`` (detect), or ``DEVICE:MEMORY`` such as ``cpu:2GiB``, ``cuda:24GiB``, ``mps:16GiB``."""
    value = str(text).strip().lower()
    if value == "auto":
        return detect_hardware()
    device, sep, memory = value.partition(":")
    if not sep:
        raise ValueError(f"hardware: {text!r} is not 'auto' or DEVICE:MEMORY such as cpu:2GiB")
    return DeviceProfile(device, parse_size(memory, "hardware memory"), os.cpu_count() or 1, _isa())
