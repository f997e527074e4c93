"""Weight deltas: exact round trips, refusing a wrong base, the StableVicuna layout, and bad inputs.

    .venv/bin/python -m pytest tests/test_delta.py -q

Models are tiny Llama state dicts (hidden 32, 2 layers, vocabulary 64) written directly with safetensors or
torch.save, so most tests never import transformers.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhfchat import delta as D
from rlhfchat.errors import RlhfchatError
from rlhfchat.delta.weights import Checkpoint

H, INTER, LAYERS, VOCAB = 32, 64, 2, 64
BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---- tiny models ------------------------------------------------------------------------------------------------

def llama_tensors(vocab: int = VOCAB, hidden: int = H, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (INTER, hidden), p + "mlp.up_proj.weight": (INTER, hidden),
                       p + "mlp.down_proj.weight": (hidden, INTER), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    return {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}


def llama_config(vocab: int = VOCAB, hidden: int = H, dtype: torch.dtype = torch.float32) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "dtype": str(dtype).removeprefix("torch.")}


def save(folder: Path, sd: dict, fmt: str = "safetensors", shards: int = 1, files: dict | None = None) -> Path:
    """Write `sd` in the HF layout: one file, or `shards` files plus the index json."""
    folder.mkdir(parents=True)
    names = list(sd)
    groups = [names[i::shards] for i in range(shards)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, str(folder / fname), metadata={"format": "pt"})
        else:
            torch.save(part, folder / fname)
        weight_map.update(dict.fromkeys(group, fname))
    if shards > 1:
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


def finetune(base: dict, seed: int = 1, scale: float = 0.05, vocab: int | None = None) -> dict:
    """A target: base + noise (5%: some weights cross zero), grown to `vocab` rows, with awkward values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, b in base.items():
        t = b.float() + torch.randn(b.shape, generator=g) * 0.02 * scale
        if vocab and k in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, torch.randn(vocab - t.shape[0], t.shape[1], generator=g) * 0.02])
        out[k] = t.to(b.dtype)
    norm = out["model.norm.weight"]
    norm[0], norm[1], norm[2] = -0.0, float("inf"), float("nan")  # -0.0 and NaN only survive bit for bit
    return out


def read_all(folder: Path) -> dict:
    with Checkpoint(folder) as ck:
        return {n: ck.rows(n, 0, i.shape[0] if i.shape else 1).clone() for n, i in ck.tensors.items()}


def assert_bits_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:  # noqa: PLC0206 (two dicts)
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        bits = BITS[a[k].dtype.itemsize]
        assert torch.equal(a[k].reshape(-1).view(bits), b[k].reshape(-1).view(bits)), k


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


CFG = json.dumps(llama_config())


# ---- the arithmetic -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_combine_is_the_float32_sum_rounded_once(dtype):
    # every 16-bit pattern as the base, random patterns as the delta: native add == explicit float32 formula
    base = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    delta = torch.randint(-32768, 32768, (65536,), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int32).to(torch.int16).view(dtype)
    ref = (base.float() + delta.float()).to(dtype)
    assert torch.equal(D.combine(base, delta, dtype).view(torch.int16), ref.view(torch.int16))
    # hand-computed: 1 + 2**-11 is halfway between float16 1.0 and 1.0009765625, ties go to even -> 1.0
    one = torch.tensor([1.0], dtype=torch.float16)
    assert D.combine(one, torch.tensor([2.0**-11], dtype=torch.float16), torch.float16).item() == 1.0
    # a float32 base and a float16 delta: the sum is float32, rounded once to the target's float16
    assert D.combine(torch.tensor([1.0]), torch.tensor([2.0**-11], dtype=torch.float16), torch.float16).item() == 1.0
    # grown rows: 0 + -0.0 = +0.0, as the reference script's float16 add gives
    assert D.combine(None, torch.tensor([-0.0], dtype=dtype), dtype).view(torch.int16).item() == 0


# ---- round trips --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    base = llama_tensors(dtype=dtype)
    base["model.norm.weight"][3] = float("inf")  # target 1.0 - base inf: the delta alone cannot give it back
    target = finetune(base)
    target["model.norm.weight"][3] = 1.0
    save(tmp_path / "base", base, shards=2, files={"config.json": CFG})
    save(tmp_path / "target", target, files={"config.json": CFG, "chat_template.jinja": "{{ messages }}"})

    manifest = D.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta", shard_size=20_000)
    assert manifest["format_version"] == D.FORMAT_VERSION and manifest["dtype"] == str(dtype)[6:]
    assert manifest["tensors"]["model.norm.weight"]["fixes"] >= 2  # -0.0 (in growth only), inf, nan, 1.0
    assert (tmp_path / "delta" / "model.safetensors.index.json").is_file()  # several shards
    assert (tmp_path / "delta" / "chat_template.jinja").read_text() == "{{ messages }}"

    out = D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out", shard_size=20_000)
    assert out == tmp_path / "out"
    assert_bits_equal(read_all(out), target)
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}" and not (out / D.MANIFEST).exists()
    D.verify_delta(out, tmp_path / "delta")
    D.verify_delta(tmp_path / "target", tmp_path / "delta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_in_small_chunks_on_several_threads_is_bit_exact(tmp_path, monkeypatch, dtype):
    import rlhfchat.delta.weights as W

    # chunks of one to three rows, written by 3 threads at once into 4 small shards: every chunk boundary, a grown
    # tensor's split and the fixes that fall on either side of them must come out the same as in one piece
    monkeypatch.setattr(W, "CHUNK_BYTES", 3 * H * dtype.itemsize - 1)
    monkeypatch.setattr(W, "DROP_LAG", 1000)  # apply drops the pages it wrote from the cache after every 1000 bytes
    monkeypatch.setattr(D, "WORKERS", 3)
    base = llama_tensors(dtype=dtype, seed=11)
    target = finetune(base, seed=12, scale=2.0, vocab=VOCAB + 3)  # scale 2: many weights cross zero, many fixes
    save(tmp_path / "base", base, shards=2, files={"config.json": CFG})
    save(tmp_path / "target", target, files={"config.json": CFG})

    manifest = D.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta", shard_size=4000)
    assert sum(e["fixes"] for e in manifest["tensors"].values()) > (10 if dtype.itemsize == 2 else 0)
    assert len(list((tmp_path / "delta").glob("model-*.safetensors"))) > 3
    out = D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out", shard_size=4000)
    assert_bits_equal(read_all(out), target)
    D.verify_delta(out, tmp_path / "delta")

    # the same files as a single-threaded writer in whole-tensor chunks produces
    monkeypatch.setattr(W, "CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(D, "WORKERS", 1)
    D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out1", shard_size=4000)
    for path in sorted(out.iterdir()):
        assert path.read_bytes() == (tmp_path / "out1" / path.name).read_bytes(), path.name


def test_wrong_base_is_refused_with_several_threads(tmp_path, monkeypatch):
    import rlhfchat.delta.weights as W

    monkeypatch.setattr(W, "CHUNK_BYTES", 100)
    monkeypatch.setattr(D, "WORKERS", 3)
    base = llama_tensors(dtype=torch.bfloat16, seed=13)
    save(tmp_path / "base", base, shards=3)
    save(tmp_path / "target", finetune(base, seed=14))
    D.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta", shard_size=4000)
    base["model.layers.0.mlp.down_proj.weight"][-1, -1] *= -1  # the last element of one tensor
    save(tmp_path / "other", base, shards=3)
    before = listing(tmp_path)
    with pytest.raises(RlhfchatError, match="tensor model.layers.0.mlp.down_proj.weight differs"):
        D.apply_delta(tmp_path / "other", tmp_path / "delta", tmp_path / "out")
    assert listing(tmp_path) == before


def test_vocab_growth_stores_new_rows_whole_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    base = llama_tensors(dtype=torch.float16)
    target = finetune(base, vocab=VOCAB + 1)
    tok = json.dumps({"added_tokens": [{"id": 0, "content": "<unk>"}, {"id": VOCAB, "content": "[PAD]"}]})
    save(tmp_path / "base", base, files={"config.json": CFG})
    save(tmp_path / "target", target, shards=3,
         files={"config.json": json.dumps(llama_config(VOCAB + 1, dtype=torch.float16)), "tokenizer.json": tok})

    manifest = D.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    assert manifest["vocab"] == {"base_rows": VOCAB, "target_rows": VOCAB + 1,
                                 "grown_tensors": ["lm_head.weight", "model.embed_tokens.weight"],
                                 "added_tokens": [{"id": VOCAB, "content": "[PAD]"}]}
    stored = read_all(tmp_path / "delta")
    for name in manifest["vocab"]["grown_tensors"]:
        assert torch.equal(stored[name][VOCAB:], target[name][VOCAB:])  # the new row, whole

    out = D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out", shard_size=30_000)
    assert_bits_equal(read_all(out), target)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (VOCAB + 1, H)
    assert torch.equal(model.lm_head.weight, target["lm_head.weight"].float())


def test_bin_input_round_trip(tmp_path):
    base = llama_tensors(seed=3)
    target = finetune(base, seed=4)
    save(tmp_path / "base", base, fmt="bin")
    save(tmp_path / "target", target, fmt="bin", shards=2)
    D.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    out = D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    assert_bits_equal(read_all(out), target)


# ---- the published StableVicuna delta ---------------------------------------------------------------------------

def test_stablevicuna_layout_applies_like_its_apply_delta_script(tmp_path):
    from transformers import AutoTokenizer

    # LLaMA as converted to HF in 2023: float16 .bin shards; vocabulary 64 stands for 32000
    base = llama_tensors(dtype=torch.float16, seed=5)
    save(tmp_path / "llama", base, fmt="bin", shards=2, files={"config.json": json.dumps(llama_config())})
    # the delta repo: target - (base grown by one zero row), float16, 3 .bin shards + index, tokenizer with [PAD]
    target = finetune(base, seed=6, vocab=VOCAB + 1)
    grown = {k: torch.cat([v, torch.zeros(target[k].shape[0] - v.shape[0], *v.shape[1:], dtype=v.dtype)])
             for k, v in base.items()}
    legacy = {k: target[k] - grown[k] for k in target}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = {"version": "1.0", "added_tokens": [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for c, i in (("<unk>", 0), ("<s>", 1), ("</s>", 2), ("[PAD]", VOCAB))],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    files = {"config.json": json.dumps(llama_config(VOCAB + 1, dtype=torch.float16)),
             "tokenizer.json": json.dumps(tokenizer), "added_tokens.json": json.dumps({"[PAD]": VOCAB}),
             "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                    "pad_token": "[PAD]"}),
             "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                                  "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"})}
    save(tmp_path / "stable-vicuna-delta", legacy, fmt="bin", shards=3, files=files)
    assert (tmp_path / "stable-vicuna-delta" / "pytorch_model-00003-of-00003.bin").is_file()

    with pytest.raises(RlhfchatError, match="has no delta.json, so nothing in it can be checked; .* pass --legacy"):
        D.apply_delta(tmp_path / "llama", tmp_path / "stable-vicuna-delta", tmp_path / "stable-vicuna")
    assert not (tmp_path / "stable-vicuna").exists()
    out = D.apply_delta(tmp_path / "llama", tmp_path / "stable-vicuna-delta", tmp_path / "stable-vicuna", legacy=True)

    # the script's arithmetic: base in float16, embedding and output grown with zero rows, then param += delta
    ref = {k: v.clone() for k, v in base.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        ref[k] = torch.cat([ref[k], torch.zeros(1, H, dtype=torch.float16)])
    for k in ref:
        ref[k] += legacy[k]
    assert_bits_equal(read_all(out), ref)
    for name in files:  # the delta's tokenizer and config
        assert (out / name).read_bytes() == (tmp_path / "stable-vicuna-delta" / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == VOCAB and len(tok) == VOCAB + 1
    with pytest.raises(RlhfchatError, match="no delta.json"):
        D.verify_delta(out, tmp_path / "stable-vicuna-delta")


# ---- refusing a wrong base --------------------------------------------------------------------------------------

@pytest.fixture
def made(tmp_path):
    """base, target (float16) and the delta between them."""
    base = llama_tensors(dtype=torch.float16, seed=7)
    target = finetune(base, seed=8)
    save(tmp_path / "base", base, files={"config.json": CFG})
    save(tmp_path / "target", target, files={"config.json": CFG, "tokenizer_config.json": "{}"})
    D.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    return tmp_path, base, target


def test_wrong_base_is_refused_before_anything_is_written(made):
    tmp_path, _, _ = made
    save(tmp_path / "other", llama_tensors(dtype=torch.float16, seed=99))
    before = listing(tmp_path)
    with pytest.raises(RlhfchatError, match=r"is not the base this delta was made from: tensor lm_head.weight"):
        D.apply_delta(tmp_path / "other", tmp_path / "delta", tmp_path / "out")
    assert listing(tmp_path) == before  # no output, no temporary folder


def test_modified_base_names_the_first_differing_tensor(made):
    tmp_path, base, _ = made
    modified = {k: v.clone() for k, v in base.items()}
    modified["model.layers.1.mlp.up_proj.weight"][3, 4] += 0.001
    modified["model.norm.weight"][0] += 0.001
    save(tmp_path / "modified", modified)
    with pytest.raises(RlhfchatError, match="tensor model.layers.1.mlp.up_proj.weight differs") as err:
        D.apply_delta(tmp_path / "modified", tmp_path / "delta", tmp_path / "out")
    assert "model.norm.weight" not in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_verify_catches_a_tampered_target(made):
    tmp_path, _, _ = made
    out = D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    D.verify_delta(out, tmp_path / "delta")
    sd = load_file(out / "model.safetensors")
    sd["model.layers.0.self_attn.v_proj.weight"][0, 0] *= 2
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RlhfchatError, match="tensor model.layers.0.self_attn.v_proj.weight in .* differs"):
        D.verify_delta(out, tmp_path / "delta")
    (tmp_path / "target" / "tokenizer_config.json").write_text('{"pad_token": "x"}')
    with pytest.raises(RlhfchatError, match="tokenizer_config.json is missing or differs"):
        D.verify_delta(tmp_path / "target", tmp_path / "delta")


# ---- bad input: one line, nothing half-written --------------------------------------------------------------------

def test_manifest_from_another_format_version_is_refused(made):
    tmp_path, _, _ = made
    manifest = json.loads((tmp_path / "delta" / D.MANIFEST).read_text())
    manifest["format_version"] = D.FORMAT_VERSION + 1
    (tmp_path / "delta" / D.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RlhfchatError, match=f"version {D.FORMAT_VERSION + 1}; this rlhfchat reads"):
        D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    with pytest.raises(RlhfchatError, match="version"):
        D.verify_delta(tmp_path / "target", tmp_path / "delta")
    assert not (tmp_path / "out").exists()


def test_missing_folders_and_weights(made):
    tmp_path, _, _ = made
    with pytest.raises(RlhfchatError, match="nope: no such folder"):
        D.make_delta(tmp_path / "nope", tmp_path / "target", tmp_path / "d2")
    with pytest.raises(RlhfchatError, match="nope: no such folder"):
        D.apply_delta(tmp_path / "base", tmp_path / "nope", tmp_path / "out")
    with pytest.raises(RlhfchatError, match="nope: no such folder"):
        D.verify_delta(tmp_path / "nope", tmp_path / "delta")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RlhfchatError, match="no model weights"):
        D.apply_delta(tmp_path / "empty", tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "d2").exists()


def test_truncated_delta_is_refused_before_writing(made):
    tmp_path, _, _ = made
    shard = tmp_path / "delta" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(RlhfchatError, match="model.safetensors is truncated"):
        D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(made):
    tmp_path, _, _ = made
    save(tmp_path / "wide", llama_tensors(hidden=48, dtype=torch.float16))
    with pytest.raises(RlhfchatError, match=r"shape mismatch for lm_head.weight: base \[64, 48\] vs target \[64, 32\]"):
        D.make_delta(tmp_path / "wide", tmp_path / "target", tmp_path / "d2")
    with pytest.raises(RlhfchatError, match=r"shape mismatch for .*: base \[.*48.*\] float16 vs"):
        D.apply_delta(tmp_path / "wide", tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "d2").exists()


@pytest.mark.parametrize("where, failure", [
    ("write", OSError(errno.ENOSPC, "No space left on device")),  # a full disk, in the writer thread
    ("compute", KeyboardInterrupt()),  # Ctrl-C, in the main thread
])
def test_interrupted_apply_leaves_no_output(made, monkeypatch, where, failure):
    import rlhfchat.delta.weights as W

    tmp_path, _, _ = made
    module, attr = (W, "_write") if where == "write" else (D, "combine")
    before, calls, real = listing(tmp_path), [], getattr(module, attr)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # a few tensors in
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, failing)
    expected = RlhfchatError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected, match="disk full while writing" if expected is RlhfchatError else None):
        D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    assert len(calls) >= 5 and listing(tmp_path) == before


def test_refuses_without_space_or_over_an_existing_folder(made, monkeypatch):
    tmp_path, _, _ = made
    (tmp_path / "exists").mkdir()
    with pytest.raises(RlhfchatError, match="already exists"):
        D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "exists")
    monkeypatch.setattr(D.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(RlhfchatError, match="not enough disk space"):
        D.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_module_main_prints_one_line_errors(made):
    """`python -m rlhfchat.delta ...` is the CLI's delta command."""
    import subprocess
    import sys

    tmp_path, _, _ = made

    def module(*args):
        return subprocess.run([sys.executable, "-m", "rlhfchat.delta", *args], capture_output=True, text=True,
                              timeout=300)

    assert module("verify", "--target", str(tmp_path / "target"), "--delta", str(tmp_path / "delta")).returncode == 0
    out = module("apply", "--base", str(tmp_path / "nope"), "--delta", str(tmp_path / "delta"),
                 "--out", str(tmp_path / "out"))
    err = out.stderr.strip()
    assert out.returncode == 2 and err.startswith("error: ") and "no such folder" in err and "\n" not in err


# ---- the benchmark ----------------------------------------------------------------------------------------------

def test_bench_runs_and_prints_one_json_line(tmp_path, capsys):
    import argparse

    from rlhfchat.bench import delta as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    result = bench.run(parser.parse_args(["--size-gb", "0.01", "--workdir", str(tmp_path), "--shard-size-mb", "8"]))
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and json.loads(line) == result
    for op in ("make", "apply"):
        assert result[op]["seconds"] > 0 and result[op]["peak_rss_mb"] > 0 and result[op]["gb_per_s"] > 0
    assert result["copy"]["gb_per_s"] > 0 and set(result["targets_met"]) == {"memory", "throughput"}
    assert list(tmp_path.iterdir()) == []  # the models were removed
