"""Read and write Hugging Face checkpoint folders one tensor (or a few rows of one tensor) at a time.

Reading: sharded or single safetensors (`model.safetensors[.index.json]`) and PyTorch `.bin` shards
(`pytorch_model[-0000N-of-0000M].bin[.index.json]`, loaded with `torch.load(weights_only=True, mmap=True)`, one
shard mapped at a time). Safetensors are mapped into memory and rows are handed out as views of the mapping, from
the offsets in the file's header: hashing and adding read the page cache directly, without a copy. Pages of a
mapping count in the process's RSS for as long as they stay mapped (read through `safe_open`, RSS grows with the
bytes read); here the reader calls `release` when done with a chunk, which drops its pages from the process
(MADV_DONTNEED: they stay in the page cache), so RSS stays at a few MiB per reading thread.

Writing: `write_shards` streams safetensors shards in the HF layout (`model-0000N-of-0000M.safetensors` plus
`model.safetensors.index.json`, or a single `model.safetensors`). The shapes are known before the data, so each
shard's header is written first and every tensor's place in its file is known: a few threads each compute a tensor
a chunk at a time, hash each chunk and write it at its offset while it is still in the core's cache. Nothing holds
a shard, or even a whole tensor, in memory, and the shard size costs no memory at all.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import math
import mmap
import os
import threading
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
# Rows are read, combined, hashed and written in pieces of about this size: small enough that a piece stays in the
# cache from the add through the hash to the copy into the page cache, large enough that the Python work and the
# GIL handoffs between threads per piece stay small (apply's write phase on the 2 GB bench: 256 KiB pieces 3.4
# CPU-seconds, 2 MiB 2.7, 16 MiB 3.3).
CHUNK_BYTES = 2 << 20
HASH_THREADS = max(2, min(4, os.cpu_count() or 1))  # sha256 runs at ~1.5 GB/s a core: the slowest step
WORKERS = max(1, min(4, os.cpu_count() or 1))  # threads computing, hashing and writing tensors in write_shards
DROP_LAG = 32 << 20  # write_shards(drop=True): a thread drops the pages it wrote from the cache this many bytes later
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
               chunk_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about `chunk_bytes` (CHUNK_BYTES); none crosses `split_at` (where a grown
    tensor's base ends)."""
    step = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, row_bytes))
    bounds = [(0, rows)] if split_at is None or not 0 < split_at < rows else [(0, split_at), (split_at, rows)]
    for lo, hi in bounds:
        for start in range(lo, hi, step):
            yield start, min(start + step, hi)
    if rows == 0:
        yield 0, 0


def _rows_of(info: TensorInfo) -> int:
    """Length along dim 0; a scalar is one row."""
    return info.shape[0] if info.shape else 1


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


def safetensors_header(path: Path) -> list[TensorInfo]:
    """The tensors of a safetensors file, in the order of their data, from its header alone (the data is not read).

    A file that is not safetensors, whose header is damaged (a tensor's byte range that does not fit its shape and
    dtype) or that is shorter than its header says is a one-line error naming it.
    """
    # The header is 8 bytes of little-endian length, then JSON.
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise RlhfchatError(f"{path}: not a safetensors file ({e})") from None
    infos, ends = [], []
    try:
        for start, name, v in sorted((v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__"):
            dtype = ST_DTYPES.get(v["dtype"])
            if dtype is None:
                raise RlhfchatError(f"{path}: tensor {name} has unsupported dtype {v['dtype']}")
            infos.append(TensorInfo(name, tuple(int(d) for d in v["shape"]), dtype, path, 8 + n + start))
            ends.append(8 + n + v["data_offsets"][1])
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise RlhfchatError(f"{path}: damaged safetensors header ({type(e).__name__}: {e})") from None
    for info, stop in zip(infos, ends):
        if stop - info.offset != info.nbytes:
            raise RlhfchatError(f"{path}: damaged safetensors header: tensor {info.name} ({list(info.shape)} "
                                f"{dtype_name(info.dtype)}) spans {stop - info.offset} bytes, not {info.nbytes}")
    size = path.stat().st_size
    if max(ends, default=0) > size:
        raise RlhfchatError(f"{path} is truncated: its header describes {max(ends)} bytes, the file has {size}")
    return infos


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
        for info in safetensors_header(path):
            self.tensors[info.name] = info

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
            end = begin + size
            # A page fault maps the cached pages around it too ("fault-around", never past a 2 MiB page-table
            # boundary), so pages go in whole 2 MiB windows: from the one holding `begin` to the one holding the
            # end, which stays while the reader is still in it (the next rows of a tensor read a chunk at a time)
            # and goes with the tensor's last rows.
            lo = begin - begin % _WINDOW
            hi = min(len(mm), end + (-end) % _WINDOW) if stop >= _rows_of(info) else end - end % _WINDOW
            if hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def sha256(self, name: str, progress: Callable[[int], object] | None = None) -> str:
        """sha256 of the tensor's raw bytes, read a chunk at a time."""
        info, h = self.tensors[name], hashlib.sha256()
        for start, stop in row_chunks(_rows_of(info), info.row_bytes):
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


def _write(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of the file (os.pwrite may write less than asked)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _dontneed(fd: int, offset: int, nbytes: int) -> None:
    """POSIX_FADV_DONTNEED: starts writing back the range's dirty pages and drops its clean ones from the cache."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def _finish(fd: int, drop: bool) -> None:
    """Flush a finished shard to the disk before it can be renamed into place (then drop its pages), close it."""
    try:
        os.fsync(fd)
        if drop:
            _dontneed(fd, 0, 0)  # the whole file, now on the disk
    finally:
        os.close(fd)


class _Scratch:
    """One writer thread's buffers for `produce`: each `take` hands out the next; all are reused for the next chunk.

    A few CHUNK_BYTES buffers, used over and over, stay in the core's cache, and nothing is allocated per chunk."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.used = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > CHUNK_BYTES:  # a single row larger than a chunk: rare, allocate it
            return torch.empty(shape, dtype=dtype)
        if self.used == len(self.buffers):
            self.buffers.append(torch.empty(CHUNK_BYTES, dtype=torch.uint8))
        self.used += 1
        return self.buffers[self.used - 1][:nbytes].view(dtype).reshape(shape)


def write_shards(folder: Path, specs: list[Spec], shard_size: int,
                 produce: Callable[[Spec, Callable[..., torch.Tensor]], Iterable[torch.Tensor]],
                 progress: Callable[[int], object] | None = None, workers: int = WORKERS,
                 drop: bool = False) -> dict[str, str]:
    """Write `specs` into `folder` as HF-layout safetensors, each shard fsynced; return each tensor's sha256.

    `produce(spec, take)` yields contiguous tensors whose bytes, concatenated, are exactly the tensor's bytes. It runs
    in `workers` threads at once, one tensor per thread (each tensor's chunks in order, in one thread), so it must be
    safe to call for different tensors concurrently. `take(shape, dtype)` gives it an uninitialised tensor to compute a
    chunk into, from its thread's own buffers: every tensor taken is reused once the next chunk has been yielded.
    `drop`: take the pages written out of the page cache once they are on the disk (DROP_LAG bytes later, and the
    whole shard after its fsync), so that writing N GB takes a few MB of cache, reused, instead of N GB of it. Where
    memory is lazily backed (a VM), pages never touched before cost ~2 CPU-seconds a GB on first write.
    """
    shards = plan_shards(specs, shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    # The header fixes every tensor's place in its file, so each thread writes its tensor at its own offset (pwrite),
    # in any order, and each chunk is hashed and written by the thread that computed it while its bytes are still
    # in that core's cache (torch, hashlib and file writes all release the GIL). Threads keep to different shards
    # where they can, since two threads writing one file queue for its lock, which costs several times the copy: a
    # thread takes the next tensor of its shard, else the next shard nobody has started, else (at the end) the next
    # tensor of any shard.
    todo: list[collections.deque] = []  # per shard: (spec, byte offset of its data), in file order
    for shard in shards:
        todo.append(collections.deque())
        offset = len(_header(shard))
        for spec in shard:
            todo[-1].append((spec, offset))
            offset += spec.nbytes
    left = [len(shard) for shard in shards]  # tensors not yet written, per shard
    started = 0  # shards before this one have been started
    fds: dict[int, int] = {}  # open shards, until their last tensor is written and they go to the syncer
    hashes: dict[str, str] = {}
    syncs: list[cf.Future] = []
    failed: list[BaseException] = []
    lock = threading.Lock()

    def next_job(mine: int | None) -> tuple[int | None, Spec | None, int]:
        nonlocal started
        while mine is None or not todo[mine]:
            if started < n:  # open the next shard and write its header
                mine, started = started, started + 1
                fds[mine] = os.open(folder / names[mine], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                _write(fds[mine], memoryview(_header(shards[mine])), 0)
                if not left[mine]:  # no tensors (an empty model): the header is the file
                    syncs.append(syncer.submit(_finish, fds.pop(mine), drop))
            else:
                mine = next((i for i in range(n) if todo[i]), None)
                if mine is None:
                    return None, None, 0
        return mine, *todo[mine].popleft()

    def work() -> None:
        scratch, i, written = _Scratch(), None, 0
        behind: collections.deque = collections.deque()  # drop: (offset, nbytes, written) of ours in shard i
        try:
            while not failed:
                with lock:
                    mine = i
                    i, spec, offset = next_job(i)
                    if spec is None:
                        return
                    fd = fds[i]
                if i != mine:
                    behind.clear()  # that shard's fsync drops them (_finish)
                h, pos = hashlib.sha256(), offset
                for chunk in produce(spec, scratch.take):
                    data = as_bytes(chunk)
                    h.update(data)
                    _write(fd, data, pos)
                    pos += len(data)
                    scratch.used = 0
                    if failed:
                        return
                if pos - offset != spec.nbytes:  # a bug, not a user error: never leave a corrupt file
                    raise RuntimeError(f"{spec.name}: produced {pos - offset} bytes, expected {spec.nbytes}")
                # The tensor's pages are dirty: this starts their writeback, so the shard's fsync need not wait for
                # all of them. Pages written DROP_LAG bytes ago are on the disk by now: this drops them.
                _dontneed(fd, offset, spec.nbytes)
                written += spec.nbytes
                if drop:
                    behind.append((offset, spec.nbytes, written))
                    while behind and written - behind[0][2] >= DROP_LAG:
                        _dontneed(fd, *behind.popleft()[:2])
                with lock:  # once a tensor, not a chunk: each lock taken while another thread holds it costs
                    hashes[spec.name] = h.hexdigest()
                    if progress:
                        progress(spec.nbytes)
                    left[i] -= 1
                    if not left[i]:  # the shard's last tensor: fsync and close it while the next ones are written
                        syncs.append(syncer.submit(_finish, fds.pop(i), drop))
        except BaseException as e:  # noqa: BLE001 (handed to the calling thread, which raises it)
            failed.append(e)

    # On an error (a full disk, Ctrl-C) every thread stops at its next chunk; all files are closed before the
    # caller removes the folder (leaving the syncer's `with` waits for the fsyncs already queued).
    with cf.ThreadPoolExecutor(1, thread_name_prefix="rlhfchat-fsync") as syncer:
        threads = [threading.Thread(target=work, name=f"rlhfchat-write-{k}", daemon=True) for k in range(1, workers)]
        try:
            for t in threads:
                t.start()
            work()  # the calling thread is one of the workers
            for t in threads:
                t.join()
        except BaseException as e:  # Ctrl-C while waiting for the others: stop them
            failed.append(e)
            raise
        finally:
            for t in threads:
                if t.is_alive():
                    t.join()
            for fd in fds.values():
                os.close(fd)
    if failed:
        raise failed[0]
    for fut in syncs:
        fut.result()  # an fsync's error (EIO, a full disk)
    if n > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: fname for fname, shard in zip(names, shards) for s in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return hashes
