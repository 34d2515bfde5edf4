"""The compute device and dtype of a run, and what its results depend on there."""

from __future__ import annotations

import ctypes
import os

import torch

from .errors import DeviceMemoryError, InputError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype:
    """`auto` computes in float32 on CPU (bf16 matmuls are slow on most CPUs), in the weights' dtype on GPU, but
    bfloat16 weights in float32 on a GPU without bfloat16 (before Ampere), where float16 could overflow."""
    if name == "auto":
        if device.type == "cpu" or (weights_dtype == torch.bfloat16 and not bf16_capable(device)):
            return torch.float32
        return weights_dtype
    if name == "bfloat16" and not bf16_capable(device):
        raise InputError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support: use "
                         f"--dtype float32 or auto")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def bf16_capable(device: torch.device) -> bool:
    """bfloat16 matmuls run natively (CPU, CUDA from compute capability 8.0). A device that is not there (a plan
    made on another machine) is taken to have it."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def device_fields(device: torch.device) -> dict:
    """What the result depends on beyond the options and versions: on CUDA the GPU model, the CUDA and cuBLAS
    versions (kernels, hence bits, differ between them) and deterministic mode (`deterministic`)."""
    if device.type != "cuda":
        return {"device": device.type}
    return {"device": device.type, "gpu": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "cuda": torch.version.cuda, "cublas": cublas_version(device),
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def cublas_version(device: torch.device) -> str:
    """The version of the cuBLAS torch loaded, as cublasLt reports it (torch has no API for it)."""
    torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)  # loads cuBLAS
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcublasLt" in line}
    for path in sorted(paths):
        version = ctypes.CDLL(path).cublasLtGetVersion
        version.restype = ctypes.c_size_t
        return str(version())
    return "unknown"


def deterministic(device: torch.device) -> None:
    """Deterministic kernels on CUDA (index_add_ without atomics, fixed cuBLAS workspaces), so that a resumed run
    on the same hardware gives the same bytes. cuBLAS reads its setting when CUDA starts, hence before it."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def out_of_memory(exc: torch.OutOfMemoryError, where: str, then: str) -> DeviceMemoryError:
    """The one-line error for a device out of memory: what it tried and which options lower the need."""
    detail = " ".join(str(exc).split(". ")[:2]).split("\n")[0].rstrip(".")
    return DeviceMemoryError(f"out of GPU memory in {where} ({detail}): lower --batch or --seqlen {then}")
