"""Benchmark `delta make` and `delta apply` against a plain `cp -r` of the same folders (the disk's limit).

    rlhfchat bench delta --size-gb 2 [--workdir DIR] [--dtype float16] [--shard-size-mb 500] [--keep]

Builds a synthetic Llama-shaped base of about N GB (several safetensors shards, written with safetensors directly)
and a fine-tuned-looking target (base + 1% noise, one added vocabulary row), then times, each in its own
subprocess so that its peak RSS is its own: `cp -r` of both folders, `make`, `apply`. Prints one JSON line.
Targets: apply's peak RSS at most the largest tensor + 500 MB; apply at least 0.4x the copy's GB/s.

Throughput counts the bytes each operation must read and write once: copy reads and writes both folders, make
reads base and target and writes the delta, apply reads base and delta and writes the target (its extra read of
the base, to check it before writing, is not counted). Make and apply fsync their shards before renaming the
folder into place, so the copy is timed up to the fsync of its files as well (`cp_seconds_before_fsync` is the
`cp -r` alone), and every step starts after a `sync`: each is measured against the disk, not the page cache.
Peak RSS is the child's VmHWM, polled; cpu_seconds is the child's user + system time, and load_average the
machine's at the end: on a shared machine, a CPU-bound step's wall time depends on the other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfchat.errors import RlhfchatError

if TYPE_CHECKING:  # torch is imported when the benchmark runs, so that `rlhfchat --help` stays fast
    import torch

    from rlhfchat.delta.weights import Spec

VOCAB = 32000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of the synthetic base model (GB)")
    parser.add_argument("--workdir", default=None, help="folder for the models (default: system temp); "
                        "a fresh subfolder is made there and removed afterwards")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--shard-size-mb", type=int, default=500, help="shard size of all folders written")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--seed", type=int, default=0)


def llama_specs(size_bytes: float, dtype: torch.dtype, vocab: int) -> tuple[list[Spec], dict]:
    """Tensor list and config.json of a Llama with about `size_bytes` of weights (hidden 2048 from 1 GB up)."""
    from rlhfchat.delta.weights import Spec

    hidden = 2048 if size_bytes >= 1e9 else 256
    inter = (hidden * 11 // 4 + 127) // 128 * 128
    item = dtype.itemsize
    layer_bytes = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * item
    layers = max(1, round((size_bytes - 2 * VOCAB * hidden * item) / layer_bytes))
    specs = [Spec("model.embed_tokens.weight", (vocab, hidden), dtype)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [Spec(p + f"self_attn.{x}_proj.weight", (hidden, hidden), dtype) for x in "qkvo"]
        specs += [Spec(p + f"mlp.{x}_proj.weight", (inter, hidden), dtype) for x in ("gate", "up")]
        specs += [Spec(p + "mlp.down_proj.weight", (hidden, inter), dtype),
                  Spec(p + "input_layernorm.weight", (hidden,), dtype),
                  Spec(p + "post_attention_layernorm.weight", (hidden,), dtype)]
    specs += [Spec("model.norm.weight", (hidden,), dtype), Spec("lm_head.weight", (vocab, hidden), dtype)]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
              "num_key_value_heads": hidden // 128, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": str(dtype).removeprefix("torch.")}
    return specs, config


def build_pair(workdir: Path, size_bytes: float, dtype: torch.dtype, shard_size: int,
               seed: int) -> tuple[Path, Path]:
    """Write base (vocab 32000) and target (base + 1% noise, vocab 32001) shard by shard; return their folders."""
    import torch
    from safetensors.torch import save_file

    from rlhfchat.delta.weights import plan_shards

    base_specs, base_cfg = llama_specs(size_bytes, dtype, VOCAB)
    target_specs, target_cfg = llama_specs(size_bytes, dtype, VOCAB + 1)
    g = torch.Generator().manual_seed(seed)
    folders = workdir / "base", workdir / "target"
    for folder in folders:
        folder.mkdir()
    for folder, cfg in zip(folders, (base_cfg, target_cfg)):
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    shards = plan_shards(target_specs, shard_size)
    shapes = {s.name: s.shape for s in base_specs}
    maps: tuple[dict, dict] = ({}, {})
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        base_part, target_part = {}, {}
        for spec in shard:
            b = torch.randn(shapes[spec.name], generator=g) * 0.02
            t = torch.randn(spec.shape, generator=g) * 0.02  # rows beyond the base's: the new token
            t[: b.shape[0]] = b + torch.randn(b.shape, generator=g) * 2e-4
            base_part[spec.name], target_part[spec.name] = b.to(dtype), t.to(dtype)
        for folder, part, wmap in zip(folders, (base_part, target_part), maps):
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            wmap.update(dict.fromkeys(part, fname))
        del base_part, target_part
    for folder, wmap in zip(folders, maps):
        index = {"metadata": {}, "weight_map": wmap}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folders


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _hwm_mb(pid: int, cmd: list[str]) -> float:
    """The process's own peak RSS so far (VmHWM, kept by the kernel), or its current RSS where /proc lacks it.

    0 until the child has exec'd `cmd`: before that it shares (vfork) or copies this process's memory, and its
    VmHWM would be ours."""
    try:
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] != [os.fsencode(c) for c in cmd]:
            return 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def timed_child(cmd: list[str], what: str) -> tuple[float, float, float]:
    """Run `cmd`; return (seconds, peak RSS in MB, CPU seconds user + system) of that process alone.

    The peak is polled from the child's VmHWM: its rusage's ru_maxrss would start from this (larger) process's
    RSS, which Linux carries across fork and exec.
    """
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        peak = 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _hwm_mb(proc.pid, cmd))
            time.sleep(0.005)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
            raise RlhfchatError(f"bench: {what} failed with status {proc.returncode}: {lines[-1]}")
    return seconds, peak, usage.ru_utime + usage.ru_stime


def run(args: argparse.Namespace) -> dict:
    from rlhfchat.delta.weights import dtype_from_name

    dtype = dtype_from_name(args.dtype)
    shard_size = args.shard_size_mb << 20
    parent = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rlhfchat-bench-delta-", dir=parent))
    try:
        base, target = build_pair(work, args.size_gb * 1e9, dtype, shard_size, args.seed)
        delta, out = work / "delta", work / "out"
        sizes = {"base": folder_bytes(base), "target": folder_bytes(target)}
        largest = max(s.nbytes for s in llama_specs(args.size_gb * 1e9, dtype, VOCAB + 1)[0])

        # the disk's limit: copy both folders (each byte read once and written once) and fsync the copies,
        # as make and apply fsync what they write
        copy_s = cp_s = copy_cpu = 0.0
        for src in (base, target):
            os.sync()  # every timed step starts with nothing dirty in the page cache
            dst = work / f"copy-{src.name}"
            seconds, _, cpu = timed_child(["cp", "-r", str(src), str(dst)], "cp")
            copy_cpu += cpu
            t0 = time.perf_counter()
            fsync_tree(dst)
            cp_s += seconds
            copy_s += seconds + time.perf_counter() - t0
            shutil.rmtree(dst)
        copy_bytes = 2 * (sizes["base"] + sizes["target"])

        py = [sys.executable, "-m", "rlhfchat.delta"]
        shard = ["--shard-size-mb", str(args.shard_size_mb)]
        os.sync()
        make_s, make_rss, make_cpu = timed_child(py + ["make", "--base", str(base), "--target", str(target),
                                             "--out", str(delta)] + shard, "make")
        sizes["delta"] = folder_bytes(delta)
        os.sync()
        apply_s, apply_rss, apply_cpu = timed_child(py + ["apply", "--base", str(base), "--delta", str(delta),
                                               "--out", str(out)] + shard, "apply")
        sizes["out"] = folder_bytes(out)
        fixes = sum(e["fixes"] for e in json.loads((delta / "delta.json").read_text())["tensors"].values())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    make_bytes = sizes["base"] + sizes["target"] + sizes["delta"]
    apply_bytes = sizes["base"] + sizes["delta"] + sizes["out"]
    copy_gbps = copy_bytes / copy_s / 1e9
    apply_gbps = apply_bytes / apply_s / 1e9
    rss_limit = largest / 2**20 + 500
    result = {
        "bench": "delta", "size_gb": round(sizes["base"] / 1e9, 3), "dtype": args.dtype,
        "largest_tensor_mb": round(largest / 2**20, 1), "delta_gb": round(sizes["delta"] / 1e9, 3),
        "fixes": fixes,
        "copy": {"seconds": round(copy_s, 2), "gb_per_s": round(copy_gbps, 3),
                 "cp_seconds_before_fsync": round(cp_s, 2), "cpu_seconds": round(copy_cpu, 2)},
        "make": {"seconds": round(make_s, 2), "peak_rss_mb": round(make_rss, 1),
                 "gb_per_s": round(make_bytes / make_s / 1e9, 3), "cpu_seconds": round(make_cpu, 2)},
        "apply": {"seconds": round(apply_s, 2), "peak_rss_mb": round(apply_rss, 1), "gb_per_s": round(apply_gbps, 3),
                  "cpu_seconds": round(apply_cpu, 2)},
        "load_average": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "apply_vs_copy": round(apply_gbps / copy_gbps, 3),
        "apply_rss_limit_mb": round(rss_limit, 1),
        "targets_met": {"memory": apply_rss <= rss_limit, "throughput": apply_gbps >= 0.4 * copy_gbps},
        "workdir": str(work) if args.keep else None,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m rlhfchat.bench.delta", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
