"""Checkpoint IO: a lazy reader over (sharded) safetensors and atomic, durable writes."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import struct
import sys
import threading
import weakref
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, InsufficientResourcesError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
PREFETCH_BLOCK = 1 << 20  # bytes per read: fits a core's L2 cache
SAMPLE_BYTES = 4096  # of each tensor, in `sampled_digest`
PICKLE_FIX = ("streammerge never unpickles: convert them first, e.g. "
              "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir) in a trusted environment")


def io_thread(name: str) -> ThreadPoolExecutor:
    """A worker thread for disk work beside the compute, at the lowest CPU priority (Linux sets it per
    thread). Its copies to and from the page cache otherwise preempt a compute thread, and the other
    threads of a parallel matmul then wait for that one: on 2 cores, background reads and writes at
    normal priority cut the matmul rate by about a third in a side test, at the lowest by a few percent.
    The disk itself works as fast either way; the thread only needs a core now and then to hand it the
    next request."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_lowest_priority)


def _lowest_priority() -> None:
    if sys.platform == "linux":  # elsewhere a thread id given to setpriority would name a process
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class CheckpointReader:
    """Knows every tensor's shard, dtype and shape from the headers; reads tensors only on request.

    Reads are zero-copy views of a memory map, so a layer's tensors cost page cache, not a copy,
    until something converts them; `release_pages` then takes their pages back out of the process.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.weight_map = self._weight_map()
        self.info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.ranges: dict[str, tuple[str, int, int]] = {}
        self._prefetcher = io_thread("prefetch")
        for shard, names in self._by_shard(self.weight_map).items():
            self._read_header(shard, names)

    def _weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index ({exc}): re-download it") from exc
        elif (self.model_dir / SINGLE_NAME).is_file():
            weight_map = None
        elif any(self.model_dir.glob("*.bin")) or any(self.model_dir.glob("*.pt")):
            raise CheckpointError(f"{self.model_dir} holds only pickle weights (.bin/.pt); {PICKLE_FIX}")
        else:
            raise CheckpointError(
                f"no safetensors weights in {self.model_dir}: expected {SINGLE_NAME} or {INDEX_NAME}"
            )
        if weight_map is None:
            with self._open(SINGLE_NAME) as f:
                return {name: SINGLE_NAME for name in f.keys()}
        for shard in sorted(set(weight_map.values())):
            if not (self.model_dir / shard).is_file():
                raise CheckpointError(
                    f"{INDEX_NAME} names shard {shard}, which is missing from {self.model_dir}: re-download it"
                )
        return weight_map

    def _open(self, shard: str, device: str = "cpu"):
        try:
            return safe_open(self.model_dir / shard, framework="pt", device=device)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"shard {shard} is truncated or corrupt ({exc}): re-download it") from exc

    def _read_header(self, shard: str, names: list[str]) -> None:
        try:
            length, header = read_header(self.model_dir / shard)
        except PickleError:
            raise CheckpointError(f"shard {shard} is a pickle file (PyTorch .bin), not safetensors; {PICKLE_FIX}") from None
        except (struct.error, ValueError, MemoryError, OverflowError) as exc:
            raise CheckpointError(f"shard {shard} is truncated or corrupt ({exc}): re-download it") from exc
        for name in (n for n in names if n in header):  # a name missing from the shard is said below
            try:
                begin, end = header[name]["data_offsets"]
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"shard {shard} is truncated or corrupt (its header entry for {name} has no "
                                      f"valid data_offsets): re-download it") from exc
            self.ranges[name] = (shard, 8 + length + begin, 8 + length + end)
        with self._open(shard) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{INDEX_NAME} places {name} in {shard}, which lacks it: re-download it")
                view = f.get_slice(name)
                self.info[name] = (_DTYPES[view.get_dtype()], tuple(view.get_shape()))

    @staticmethod
    def _by_shard(weight_map: dict[str, str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = defaultdict(list)
        for name, shard in weight_map.items():
            groups[shard].append(name)
        return groups

    def names(self) -> list[str]:
        return list(self.weight_map)

    def num_parameters(self) -> int:
        return sum(_numel(shape) for _, shape in self.info.values())

    def nbytes(self, names) -> int:
        return sum(self.info[n][0].itemsize * _numel(self.info[n][1]) for n in names)

    def prefetch(self, names) -> Future:
        """Read the tensors' bytes into the page cache in a background thread, so that the next
        layer's disk reads overlap this layer's compute. The memory is the kernel's cache, not ours."""
        return self._prefetcher.submit(self._warm, sorted(self.ranges[n] for n in names))

    def _warm(self, ranges) -> None:
        """pread, not a readahead hint that skips the copy: pages read this way copy out of the map far faster
        later than pages brought in by fadvise, madvise or sendfile, which cost more than the copy saved. The
        bytes land in one small reused buffer that stays in the core's cache, so the copy takes less memory
        bandwidth from the compute's matmuls than a fresh 16 MB buffer per read did."""
        buffer = memoryview(bytearray(PREFETCH_BLOCK))
        for shard, begin, end in ranges:
            fd = os.open(self.model_dir / shard, os.O_RDONLY)
            try:
                for offset in range(begin, end, PREFETCH_BLOCK):
                    os.preadv(fd, [buffer[:min(PREFETCH_BLOCK, end - offset)]], offset)
            finally:
                os.close(fd)

    def evict(self, names) -> None:
        """Drop the tensors' bytes from the kernel's page cache once the run is done with them. The kernel
        keeps pages touched twice (prefetched, then computed on) over pages touched once, so on a model
        larger than the cache, finished layers would push out the prefetched next layer, which is then
        read again from disk while the compute waits. The files are untouched: only cached copies go."""
        for shard, begin, end in sorted(self.ranges[n] for n in names):
            drop_cached(self.model_dir / shard, begin, end - begin)

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors as CPU views of the memory-mapped shards."""
        out = {}
        for shard, group in self._by_shard({n: self.weight_map[n] for n in names}).items():
            with self._open(shard) as f:
                for name in group:
                    try:
                        out[name] = _mapped(f.get_tensor(name))
                    except (SafetensorError, OSError, RuntimeError) as exc:
                        raise CheckpointError(f"shard {shard} is truncated or corrupt ({exc}): re-download it") from exc
        return {name: out[name] for name in names}


_MAPPED: set[int] = set()  # storage addresses of tensors that are views of a shard's memory map
_PAGE = mmap.PAGESIZE
_madvise = getattr(ctypes.CDLL(None, use_errno=True), "madvise", None) if hasattr(mmap, "MADV_DONTNEED") else None


def _mapped(tensor: torch.Tensor) -> torch.Tensor:
    """Register a tensor read from a shard's memory map, so `release_pages` may drop its pages."""
    address = tensor.untyped_storage().data_ptr()
    _MAPPED.add(address)
    weakref.finalize(tensor, _MAPPED.discard, address)  # before its storage can be freed and the address reused
    return tensor


def release_pages(tensor: torch.Tensor) -> None:
    """Take a mapped tensor's pages out of this process's resident memory once it has been used (converted,
    copied to the device, merged or written), so a layer read through the map costs about one expert of
    RSS, not the layer. The file's pages stay in the kernel's cache and fault back in if touched again.

    Only tensors registered by `_mapped` qualify: the maps are private and never written, so dropping a
    page loses nothing; on anonymous memory it would zero data, so any other tensor is left alone.
    """
    if _madvise is None or not tensor.is_contiguous() or tensor.untyped_storage().data_ptr() not in _MAPPED:
        return
    start = -(-tensor.data_ptr() // _PAGE) * _PAGE  # whole pages inside the tensor: neighbours keep theirs
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // _PAGE * _PAGE
    if end > start:
        _madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def drop_cached(path: Path, offset: int = 0, length: int = 0) -> None:
    """Evict a file's clean cached pages (all of it when `length` is 0); dirty pages are left to writeback."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class PickleError(ValueError):
    """A weights file that is a pickle (PyTorch's zip or plain format), which streammerge never loads."""


def read_header(path: Path) -> tuple[int, dict]:
    """A safetensors file's header length and parsed header; a struct or JSON error when it is not one, a
    `PickleError` when it is not one and starts as PyTorch's pickles do (a zip, or a pickle protocol byte)."""
    with open(path, "rb") as raw:
        start = raw.read(8)
        try:
            length = struct.unpack("<Q", start)[0]
            return length, json.loads(raw.read(length))
        except (struct.error, ValueError, MemoryError, OverflowError):
            if start.startswith((b"PK\x03\x04", b"\x80")):
                raise PickleError(path) from None
            raise


def sampled_digest(path: Path) -> str:
    """Hash of a safetensors file's header and SAMPLE_BYTES from the middle of each tensor: a cheap check that a
    file is the one seen before (a retrained or re-quantized checkpoint changes every tensor), reading a few
    KB per tensor instead of the file."""
    length, header = read_header(path)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    fd = os.open(path, os.O_RDONLY)
    try:
        for name in sorted(n for n in header if n != "__metadata__"):
            begin, end = (8 + length + offset for offset in header[name]["data_offsets"])
            start = max(begin, (begin + end - SAMPLE_BYTES) // 2)
            digest.update(os.pread(fd, min(SAMPLE_BYTES, end - start), start))
    finally:
        os.close(fd)
    return digest.hexdigest()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staged_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def _cleaned_up(path: Path):
    """On any failure the staged file goes, and a full disk is reported with its fix."""
    try:
        yield
    except BaseException as exc:
        staged_path(path).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientResourcesError(
                f"disk full while writing {path}: free space on {path.parent} and re-run the same command to resume"
            ) from exc
        raise


def stage(path: Path, write) -> None:
    """Write `path`'s content through `write(tmp_path)` beside it, not yet under its name."""
    path = Path(path)
    with _cleaned_up(path):
        write(staged_path(path))


def publish(path: Path) -> None:
    """fsync the staged file, then rename it to `path`: a reader sees no file or the whole one, even after
    a power loss. This is the slow part of a write (the disk's), so it may run beside other work."""
    path = Path(path)
    with _cleaned_up(path):
        tmp = staged_path(path)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


def atomic_write(path: Path, write) -> None:
    stage(path, write)
    publish(path)


@dataclass(frozen=True)
class Deferred:
    """A tensor computed only when it is written or used, so a layer's merged experts never all exist at once.

    When it is `compute(*sources)` (a block-FP8 weight: its e4m3 bytes and scales), a device can compute it from
    copies of the smaller sources instead (runner.ExpertStream dequantizes on the GPU)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    sources: tuple[torch.Tensor, ...] = ()
    compute: Callable[..., torch.Tensor] | None = None


def materialize(tensor) -> torch.Tensor:
    return tensor.make() if isinstance(tensor, Deferred) else tensor


def save_shard(path: Path, tensors: dict[str, "torch.Tensor | Deferred"]) -> None:
    """`stage_shard` and `publish`: the file is complete and durable under its name on return."""
    stage_shard(path, tensors)
    publish(path)


def stage_shard(path: Path, tensors: dict[str, "torch.Tensor | Deferred"]) -> None:
    """Write a safetensors file tensor by tensor, byte-identical to `safetensors.torch.save_file`, staged
    beside `path` until `publish`.

    safetensors has no streaming writer; this one writes the same layout (tensors ordered by dtype
    size then name, compact JSON header padded to 8 bytes) while computing `Deferred` tensors one at a
    time, so a layer's output costs one tensor of memory, not the layer.
    """
    entries = sorted(tensors.items(), key=lambda item: (-item[1].dtype.itemsize, item[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in entries:
        size = _numel(tensor.shape) * tensor.dtype.itemsize
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for _, tensor in entries:
                data = materialize(tensor).detach().to("cpu").contiguous()
                f.write(data.reshape(-1).view(torch.uint8).numpy().data if data.numel() else b"")
                release_pages(data)

    stage(path, write)


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, as views of its memory map."""
    with safe_open(path, framework="pt") as f:
        return {name: _mapped(f.get_tensor(name)) for name in f.keys()}


def save_json(path: Path, obj) -> None:
    save_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


