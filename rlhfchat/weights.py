"""Read and write Hugging Face checkpoint folders one tensor (or a few rows of one tensor) at a time.

Reading: sharded or single safetensors (`model.safetensors[.index.json]`) and PyTorch `.bin` shards
(`pytorch_model[-0000N-of-0000M].bin[.index.json]`, loaded with `torch.load(weights_only=True, mmap=True)`, one
shard mapped at a time). Safetensors are mapped into memory and rows are handed out as views of the mapping, from
the offsets in the file's header: hashing and adding read the page cache directly, without a copy. Pages of a
mapping count in the process's RSS for as long as they stay mapped (read through `safe_open`, RSS grows with the
bytes read); here the reader calls `release` when done with a chunk, which drops its pages from the process
(MADV_DONTNEED: they stay in the page cache), so RSS stays at a few chunks.

Writing: `write_shards` streams safetensors shards in the HF layout (`model-0000N-of-0000M.safetensors` plus
`model.safetensors.index.json`, or a single `model.safetensors`). The shapes are known before the data, so each
shard's header is written first and the tensor bytes follow chunk by chunk: nothing holds a whole shard, or even a
whole tensor, in memory, and the shard size costs no memory at all.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import math
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfchat.errors import RlhfchatError

# safetensors' dtype names <-> torch dtypes
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
CHUNK_BYTES = 16 << 20  # rows are read, combined and written in pieces of about this size
HASH_THREADS = max(2, min(4, os.cpu_count() or 1))  # sha256 runs at ~1.5 GB/s a core: the slowest step
MAX_PENDING = 3  # chunks waiting for the hash and write threads
_WINDOW = 2 << 20  # release mapped pages in whole 2 MiB blocks (see Checkpoint.release)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float16` -> "float16" (the spelling used in manifests and config.json)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RlhfchatError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0  # safetensors: byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes in one slice along dim 0 (the whole tensor for a scalar)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def row_chunks(rows: int, row_bytes: int, split_at: int | None = None,
               chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about `chunk_bytes`; none crosses `split_at` (where a grown tensor's base ends)."""
    step = max(1, chunk_bytes // max(1, row_bytes))
    bounds = [(0, rows)] if split_at is None or not 0 < split_at < rows else [(0, split_at), (split_at, rows)]
    for lo, hi in bounds:
        for start in range(lo, hi, step):
            yield start, min(start + step, hi)
    if rows == 0:
        yield 0, 0


def as_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy (t must be contiguous)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _index_files(folder: Path, index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RlhfchatError(f"{index}: not a valid weight index ({e})") from None
    files = {fname: folder / fname for fname in sorted(set(weight_map.values()))}
    for path in files.values():
        if not path.is_file():
            raise RlhfchatError(f"{index} names {path.name}, which is missing from {folder}")
    return files


class Checkpoint:
    """The tensors of one model folder: names, shapes and dtypes up front, data read on demand by rows."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise RlhfchatError(f"{self.folder}: no such folder")
        f = self.folder
        if (f / "model.safetensors.index.json").is_file():
            self.format, files = "safetensors", list(_index_files(f, f / "model.safetensors.index.json").values())
        elif (f / "model.safetensors").is_file():
            self.format, files = "safetensors", [f / "model.safetensors"]
        elif (f / "pytorch_model.bin.index.json").is_file():
            self.format, files = "bin", list(_index_files(f, f / "pytorch_model.bin.index.json").values())
        elif (f / "pytorch_model.bin").is_file():
            self.format, files = "bin", [f / "pytorch_model.bin"]
        else:
            raise RlhfchatError(f"{f}: no model weights (expected model.safetensors[.index.json] "
                                f"or pytorch_model.bin[.index.json])")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}  # safetensors: one read-only mapping per shard
        self._bin: tuple[Path, dict] | None = None  # .bin: one shard mapped at a time
        for path in files:
            if self.format == "safetensors":
                self._scan_safetensors(path)
                with open(path, "rb") as fh:
                    # copy-on-write, so torch sees writable memory; nothing ever writes to it
                    self._maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            else:
                for name, t in self._load_bin(path).items():
                    self.tensors[name] = TensorInfo(name, tuple(t.shape), t.dtype, path)

    def _scan_safetensors(self, path: Path) -> None:
        # The header is 8 bytes of little-endian length, then JSON: read it without touching the data.
        try:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as e:
            raise RlhfchatError(f"{path}: not a safetensors file ({e})") from None
        try:
            entries = sorted((v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__")
        except (KeyError, TypeError, AttributeError) as e:
            raise RlhfchatError(f"{path}: damaged safetensors header ({e})") from None
        end = max((v["data_offsets"][1] for _, _, v in entries), default=0)
        if 8 + n + end > path.stat().st_size:
            raise RlhfchatError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has "
                                f"{path.stat().st_size}")
        for start, name, v in entries:  # in the order of the data, so reading them in this order is sequential
            if v["dtype"] not in ST_DTYPES:
                raise RlhfchatError(f"{path}: tensor {name} has unsupported dtype {v['dtype']}")
            self.tensors[name] = TensorInfo(name, tuple(v["shape"]), ST_DTYPES[v["dtype"]], path, 8 + n + start)

    def _load_bin(self, path: Path) -> dict:
        if self._bin is None or self._bin[0] != path:
            self._bin = None  # drop the previous shard's mapping first
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad file
                raise RlhfchatError(f"{path}: cannot load PyTorch weights ({type(e).__name__}: {e})") from None
            self._bin = (path, {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
        return self._bin[1]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` along dim 0 (a scalar whole), contiguous, in its own dtype."""
        info = self.tensors[name]
        if self.format == "bin":
            t = self._load_bin(info.file)[name]
            return (t if t.dim() == 0 else t[start:stop]).contiguous()
        begin, size, shape = self._span(info, start, stop)
        mm = self._maps[info.file]
        if size == 0:
            return torch.empty(shape, dtype=info.dtype)
        # A view of the mapping; the tensor keeps the mapping alive (frombuffer holds a reference) while it lives.
        return torch.frombuffer(mm, dtype=torch.uint8, count=size, offset=begin).view(info.dtype).reshape(shape)

    @staticmethod
    def _span(info: TensorInfo, start: int, stop: int) -> tuple[int, int, tuple[int, ...]]:
        stop = stop if info.shape else 1
        shape = (stop - start,) + info.shape[1:] if info.shape else ()
        return info.offset + start * info.row_bytes, (stop - start) * info.row_bytes, shape

    def release(self, name: str, start: int, stop: int) -> None:
        """Done with rows [start, stop) of `name`: drop their pages from this process (not from the page cache).

        Whoever still holds a view of them faults them back in, reading the same bytes."""
        info = self.tensors[name]
        mm = self._maps.get(info.file)
        if mm is not None:
            begin, size, _ = self._span(info, start, stop)
            # A page fault maps the cached pages around it too ("fault-around", never past a 2 MiB page-table
            # boundary): widen the range to those boundaries so that none of them linger.
            lo = begin - begin % _WINDOW
            hi = min(len(mm), begin + size + (-(begin + size)) % _WINDOW)
            if hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def sha256(self, name: str, progress: Callable[[int], object] | None = None) -> str:
        """sha256 of the tensor's raw bytes, read a chunk at a time."""
        info, h = self.tensors[name], hashlib.sha256()
        for start, stop in row_chunks(info.shape[0] if info.shape else 1, info.row_bytes):
            chunk = self.rows(name, start, stop)
            h.update(as_bytes(chunk))
            self.release(name, start, stop)
            if progress:
                progress(chunk.nbytes)
        return h.hexdigest()

    def sha256_all(self, names: list[str],
                   progress: Callable[[int], object] | None = None) -> Iterator[tuple[str, str]]:
        """(name, sha256) in the order given; safetensors are hashed HASH_THREADS tensors at a time (hashlib and
        page faults release the GIL), `.bin` one at a time (one shard is mapped at a time)."""
        if self.format == "bin":
            yield from ((n, self.sha256(n, progress)) for n in names)
            return
        with cf.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="rlhfchat-hash") as pool:
            futures = collections.deque()
            try:
                for name in names:
                    futures.append((name, pool.submit(self.sha256, name, progress)))
                    if len(futures) > 2 * HASH_THREADS:
                        name0, fut = futures.popleft()
                        yield name0, fut.result()
                while futures:
                    name0, fut = futures.popleft()
                    yield name0, fut.result()
            finally:
                for _, fut in futures:
                    fut.cancel()

    def close(self) -> None:
        # Mappings are never closed by hand: a tensor still in a writer's queue may point into one. Dropping our
        # references unmaps each as soon as its last view is gone.
        self._maps.clear()
        self._bin = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")


def other_files(folder: Path, skip: Iterable[str] = ()) -> list[Path]:
    """The folder's top-level files that are not weights (config, tokenizer, chat template, ...)."""
    skip = set(skip)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in skip and not is_weight_file(p))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---- writing ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One tensor to write: its name, shape and dtype."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: list[Spec], shard_size: int) -> list[list[Spec]]:
    """Greedy, in order: a new shard starts when the next tensor would take this one past `shard_size`."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    # Largest itemsize first inside a shard keeps every tensor's data aligned to its itemsize.
    return [sorted(s, key=lambda spec: -spec.dtype.itemsize) for s in shards]


def _header(specs: list[Spec]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        header[spec.name] = {"dtype": ST_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    return len(raw).to_bytes(8, "little") + raw


def _write(f, data: memoryview) -> int:
    n = f.write(data)
    if hasattr(os, "posix_fadvise"):  # start writing these pages to the disk now, not all at the final fsync
        f.flush()
        end = f.tell()
        os.posix_fadvise(f.fileno(), end - n, n, os.POSIX_FADV_DONTNEED)
    return n


def _finish(f) -> int:
    """Flush a finished shard to the disk before it can be renamed into place, then close it."""
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()
    return 0


class _Ring:
    """Chunk buffers for `produce`, reused in turn: no allocation per chunk, so the heap cannot fragment."""

    def __init__(self, slots: int):
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.next = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > CHUNK_BYTES:  # a single row larger than a chunk: rare, allocate it
            return torch.empty(shape, dtype=dtype)
        if self.buffers[self.next] is None:
            self.buffers[self.next] = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
        buf, self.next = self.buffers[self.next], (self.next + 1) % len(self.buffers)
        return buf[:nbytes].view(dtype).reshape(shape)


def write_shards(folder: Path, specs: list[Spec], shard_size: int,
                 produce: Callable[[Spec, Callable[..., torch.Tensor]], Iterable[torch.Tensor]],
                 progress: Callable[[int], object] | None = None) -> dict[str, str]:
    """Write `specs` into `folder` as HF-layout safetensors, each shard fsynced; return each tensor's sha256.

    `produce(spec, take)` yields contiguous tensors whose bytes, concatenated, are exactly the tensor's bytes.
    `take(shape, dtype)` gives it an uninitialised tensor to compute a chunk into; its memory is reused a few
    chunks later, once that chunk is written, so each taken tensor must be yielded (once) before the next take.
    """
    shards = plan_shards(specs, shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    hashers: dict[str, hashlib._Hash] = {}
    # Helper threads hash and write a chunk while the caller computes the next one (hashlib, file writes and
    # torch all release the GIL). Each helper runs its jobs in order; at most MAX_PENDING chunks wait. sha256 costs the
    # most, so tensors take turns between two hashers (one tensor's chunks always go to the same one). The writer
    # hands each finished shard to a fourth thread that fsyncs and closes it while the next one is written.
    # On an error, leaving the `with` waits for every queued job, so all files are closed before the caller
    # removes the folder (the syncer is entered first so that it shuts down last).
    with cf.ThreadPoolExecutor(1, thread_name_prefix="rlhfchat-fsync") as syncer, \
            cf.ThreadPoolExecutor(1, thread_name_prefix="rlhfchat-hash") as hasher0, \
            cf.ThreadPoolExecutor(1, thread_name_prefix="rlhfchat-hash") as hasher1, \
            cf.ThreadPoolExecutor(1, thread_name_prefix="rlhfchat-write") as writer:
        pending: collections.deque = collections.deque()  # (futures, bytes) in order
        syncs: list[cf.Future] = []
        # chunk k + 1 is computed once at most MAX_PENDING chunks are still in flight: that many slots, and one more
        ring = _Ring(MAX_PENDING + 1)

        def drain(keep: int) -> None:
            while len(pending) > keep:
                futures, size = pending.popleft()
                for fut in futures:
                    result = fut.result()  # re-raises a helper's error (a full disk) here
                    if isinstance(result, cf.Future):
                        syncs.append(result)
                if progress and size:
                    progress(size)

        for fname, shard in zip(names, shards):
            f = open(folder / fname, "wb")
            try:
                f.write(_header(shard))
                for spec in shard:
                    h = hashers[spec.name] = hashlib.sha256()
                    hasher = hasher1 if len(hashers) % 2 else hasher0
                    size = 0
                    for chunk in produce(spec, ring.take):
                        data = as_bytes(chunk)  # the memoryview keeps the chunk alive until both are done
                        pending.append(([hasher.submit(h.update, data), writer.submit(_write, f, data)], len(data)))
                        size += len(data)
                        drain(MAX_PENDING)
                    if size != spec.nbytes:  # a bug, not a user error: never leave a corrupt file
                        raise RuntimeError(f"{spec.name}: produced {size} bytes, expected {spec.nbytes}")
            except BaseException:
                writer.submit(f.close)  # after the writes already queued
                raise
            pending.append(([writer.submit(syncer.submit, _finish, f)], 0))  # after this file's writes
        drain(0)
        for fut in syncs:
            fut.result()
    hashes = {name: h.hexdigest() for name, h in hashers.items()}
    if n > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: fname for fname, shard in zip(names, shards) for s in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return hashes
