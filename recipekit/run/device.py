"""The compute device a run asked for (``--device``), checked to exist on this machine."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from recipekit.errors import DeviceError


def import_torch() -> Any:
    """``import torch`` with Ctrl-C held back until the import is done, then raised.

    Why: a KeyboardInterrupt raised inside torch's import (a second or more, most of it loading
    numpy and its submodules, some behind broad ``except`` clauses) left numpy half-imported: a
    run stopped that way ignored the Ctrl-C or failed with "internal error: module 'numpy' has
    no attribute 'matrix'" instead of exiting 130. Only the main thread may set a signal
    handler; elsewhere (and once torch is loaded) this is a plain import.
    """
    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        import torch

        return torch
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        import torch
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
    return torch


def resolve_device(spec: str) -> Any:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` -> a torch.device that exists here.

    Raises:
        DeviceError: the device is not available (exit code 2).
    """
    torch = import_torch()  # the run's first use of torch: Ctrl-C waits for the import

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {spec!r}",
                          hint="use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available on this machine",
                              hint="use --device cpu (the default) or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA "
                              "device(s)", hint="use cuda:0 .. cuda:N-1")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"--device {spec}: MPS is not available on this machine",
                              hint="use --device cpu")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device {spec!r}", hint="use cpu, cuda, cuda:N or mps")
    return dev
