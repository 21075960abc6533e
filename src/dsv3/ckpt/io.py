"""Files on disk: safetensors read tensor by tensor straight into their destination, written as a stream,
and every write atomic (temporary name, flush, fsync, rename): a kill at any moment leaves the previous
file intact.

The safetensors layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes, offsets relative to the end of the header. We parse it ourselves
(it is that simple) to read each tensor with one `readinto` into the model's own memory, with no mmap and
no second copy, and to name the file and tensor when something is wrong. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or directory is malformed, incomplete or does not match the config."""


# ---- atomic writes -------------------------------------------------------------------------------------

def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: read it by setting it (and put it back at once)
    os.umask(old)
    return old


def _file_mode(path: str) -> int:
    """A replaced file keeps its mode; a new one gets what open() would give it (0666 minus the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success flush, fsync and rename it over `path`."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes 0600 files; a checkpoint should be as readable as any
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def fsync_dir(d: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ---- reading -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One .safetensors file, opened for random reads. `read(name, out=...)` fills `out` in place."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        self._f = open(self.path, "rb")
        try:
            self.tensors, self.metadata = self._parse_header(size)
        except BaseException:
            self._f.close()
            raise

    def _parse_header(self, size: int) -> tuple[dict[str, TensorInfo], dict]:
        """Everything the safetensors library checks, checked here before any tensor is read: the header
        fits the file, every entry is well typed, and the tensors tile the data exactly (from byte 0, no
        overlap, no gap, nothing after the last): a file it refuses is refused here too, naming the tensor."""
        p = self.path
        head = self._f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: {size} bytes is too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{p}: header length {n} does not fit a file of {size} bytes "
                                  "(truncated, or not a safetensors file)")
        try:
            header = json.loads(self._f.read(n), object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise CheckpointError(f"{p}: the safetensors header names {e.args[0]!r} more than once") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p}: the safetensors header is not valid JSON ({e}); not a safetensors "
                                  "file, or damaged") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{p}: the safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise CheckpointError(f"{p}: the header's __metadata__ must be an object of strings, not {metadata!r}")
        start, data_size = 8 + n, size - 8 - n
        tensors = {name: _tensor_info(p, name, info, start, size) for name, info in header.items()}
        _check_tiling(p, tensors, start, size)
        return tensors, metadata

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def read(self, name: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read tensor `name`. With `out` (any device/dtype, same number of elements), copy into it; when
        `out` is a contiguous CPU tensor of the file's dtype the bytes land there directly. rows=(lo, hi):
        only rows lo..hi-1 of the first dimension (contiguous bytes in the file: nothing else is read)."""
        info = self.info(name)
        if rows is not None:
            lo, hi = rows
            n = info.shape[0] if info.shape else 0
            if not 0 <= lo <= hi <= n:
                raise CheckpointError(f"{self.path}: tensor {name!r}: rows {lo}..{hi} of {n}")
            row_bytes = info.nbytes // n if n else 0
            info = TensorInfo(info.dtype, (hi - lo, *info.shape[1:]), info.begin + lo * row_bytes,
                              (hi - lo) * row_bytes)
        direct = (out is not None and out.device.type == "cpu" and out.dtype == info.dtype
                  and out.is_contiguous() and out.numel() == math.prod(info.shape))
        buf = out if direct else torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            self._f.seek(info.begin)
            view = memoryview(buf.detach().reshape(-1).view(torch.uint8).numpy())
            got = self._f.readinto(view)
            if got != info.nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r}: read {got} of {info.nbytes} bytes "
                                      "(the file is truncated or changed while reading)")
        if out is None or direct:
            return buf.view(info.shape) if out is None else out
        with torch.no_grad():
            out.copy_(buf.view(out.shape))
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys silently; in a header that would hide a tensor."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON 8.0, "8" and true are not offsets


def _tensor_info(p: str, name: str, info, start: int, size: int) -> TensorInfo:
    """One header entry, typed as safetensors types it: dtype a known name, shape a list of naturals,
    data_offsets [begin, end] with end - begin = dtype x shape, inside the file."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{p}: tensor {name!r} has a malformed header entry {info!r}")
    dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not (isinstance(dt, str) and dt in DTYPES):
        raise CheckpointError(f"{p}: tensor {name!r} has dtype {dt!r}, which dsv3 does not read "
                              f"(one of {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
        raise CheckpointError(f"{p}: tensor {name!r} has shape {shape!r}; expected a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{p}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], "
                              "two byte offsets >= 0")
    dtype, (b, e) = DTYPES[dt], offsets
    nbytes = math.prod(shape) * _itemsize(dtype)
    if e - b != nbytes:
        raise CheckpointError(f"{p}: tensor {name!r} claims bytes [{b}, {e}) but dtype {dt} and shape {shape} "
                              f"need {nbytes}")
    if start + e > size:
        raise CheckpointError(f"{p}: tensor {name!r} ends at byte {start + e} but the file has only {size} "
                              "bytes: the file is truncated (an interrupted download or copy?)")
    return TensorInfo(dtype, tuple(shape), start + b, nbytes)


def _check_tiling(p: str, tensors: dict[str, TensorInfo], start: int, size: int) -> None:
    """The tensors cover the data region exactly once, as the safetensors library requires: overlapping
    ranges would load one tensor's bytes as another's, and a gap or trailing bytes mean a damaged file."""
    def span(t: TensorInfo) -> str:
        return f"bytes [{t.begin - start}, {t.begin - start + t.nbytes})"

    end, last = start, None  # the furthest end so far, and whose it is
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].nbytes)):
        if t.begin < end:
            raise CheckpointError(f"{p}: tensor {name!r} ({span(t)}) overlaps tensor {last!r} "
                                  f"({span(tensors[last])}); the safetensors library refuses this file too")
        if t.begin > end:
            raise CheckpointError(f"{p}: a gap of {t.begin - end} bytes before tensor {name!r} ({span(t)}) belongs "
                                  "to no tensor; the safetensors library refuses this file too")
        if t.begin + t.nbytes > end or last is None:
            end, last = t.begin + t.nbytes, name
    if end != size:
        after = f" after the last tensor ({last!r})" if last is not None else " after the header"
        raise CheckpointError(f"{p}: {size - end} bytes{after} belong to no tensor; the safetensors library "
                              "refuses this file too")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- writing -------------------------------------------------------------------------------------------

@dataclass
class PendingTensor:
    """A tensor to write, produced only when its turn comes (so a shard never sits whole in memory)."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def write_safetensors(path: str | os.PathLike, tensors: list[PendingTensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Stream tensors into a safetensors file, atomically. Each producer's result must match the declared
    dtype and shape (it is converted to the declared dtype if needed)."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in tensors:
        if t.name in header:
            raise ValueError(f"duplicate tensor name {t.name!r}")
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            x = t.produce()
            if tuple(x.shape) != tuple(t.shape):
                raise ValueError(f"{t.name}: produced shape {tuple(x.shape)}, declared {t.shape}")
            x = x.detach().to(device="cpu", dtype=t.dtype).contiguous()
            if x.numel():
                f.write(memoryview(x.reshape(-1).view(torch.uint8).numpy()))
