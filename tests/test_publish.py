"""A publishable delta and hub ids where a model folder is taken (issue 22).

    .venv/bin/python -m pytest tests/test_publish.py -q

A delta carries a model card with the exact apply command (run here, verbatim, from the card), none of a run's
bookkeeping, files others can read, and every loader of a model folder refuses it in one line. Hub ids: recognised
by their spelling, one line when the hub cannot be reached (HF_HUB_OFFLINE, set by conftest), and served from the
local hub cache when they are in it (a cache written here by hand, in huggingface_hub's layout). No test touches
the network.
"""

from __future__ import annotations

import json
import re
import shlex
import stat
from pathlib import Path

import pytest
import torch

from rlhfchat import delta as D
from rlhfchat import hub
from rlhfchat.cli import main as cli_main
from rlhfchat.delta.card import fingerprint
from rlhfchat.errors import RlhfchatError
from rlhfchat.delta.weights import file_sha256
from tests.test_delta import CFG, finetune, llama_tensors, save

BOOKKEEPING = {"manifest.json": json.dumps({"stage": "ppo", "status": "complete"}), "metrics.json": "{}",
               "metrics.jsonl": "{}\n", "README.md": "# the run's own notes\n"}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """`base` and a run's stage folder `ppo` (config, tokenizer, bookkeeping), and `my-model-delta` between them."""
    root = tmp_path_factory.mktemp("publish")
    base = llama_tensors(dtype=torch.float16, seed=31)
    save(root / "base", base, files={"config.json": CFG})
    save(root / "ppo", finetune(base, seed=32), files={"config.json": CFG, "tokenizer_config.json": "{}",
                                                        **BOOKKEEPING})
    assert cli_main(["delta", "make", "--base", str(root / "base"), "--target", str(root / "ppo"),
                     "--out", str(root / "my-model-delta"), "--base-name", "base"]) == 0
    return root


def test_the_delta_has_a_card_no_bookkeeping_and_is_readable_by_others(published):
    delta = published / "my-model-delta"
    files = {p.name for p in delta.iterdir()}
    assert files == {"model.safetensors", "config.json", "tokenizer_config.json", "delta.json", "README.md",
                     *(["delta-fixes.safetensors"] if (delta / "delta-fixes.safetensors").exists() else [])}
    manifest = json.loads((delta / "delta.json").read_text())
    assert set(manifest["files"]) == {"config.json", "tokenizer_config.json"}
    assert manifest["base_model"] == "base" and manifest["name"] == "my-model-delta"
    for path in [delta, *delta.iterdir()]:  # readable by group and others (not mkdtemp's 0700, mkstemp's 0600)
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, (path.name, oct(mode))
        if path.is_dir():
            assert mode & 0o011 == 0o011
    card = (delta / "README.md").read_text()
    assert card.startswith("---\ntags:\n- rlhfchat\n- weight-delta\n---\n")
    assert "base_model:" not in card  # `base` is not a hub id with an owner: no hub link
    tensors = {n: {**e} for n, e in manifest["tensors"].items()}
    for want in (fingerprint(tensors, "base_sha256"), fingerprint(tensors, "sha256"),
                 file_sha256(delta / "delta.json"), manifest["files"]["config.json"]):
        assert f"`{want}`" in card
    assert "not a model" in card and f"| model | `base` |" in card


def test_the_cards_apply_command_runs_as_written(published, monkeypatch, capsys):
    card = (published / "my-model-delta" / "README.md").read_text()
    command = re.search(r"^rlhfchat delta apply .*$", card, re.M).group(0)
    assert command == "rlhfchat delta apply --base base --delta my-model-delta --out my-model"
    monkeypatch.chdir(published)
    assert cli_main(shlex.split(command)[1:]) == 0
    verify = re.search(r"`(rlhfchat delta verify [^`]*)`", card).group(1)
    assert cli_main(shlex.split(verify)[1:]) == 0
    assert "my-model: matches my-model-delta" in capsys.readouterr().out
    assert not (published / "my-model" / "README.md").exists()  # the card describes the delta, not the model


@pytest.fixture(scope="module")
def tiny_delta(tiny_model_dir, tmp_path_factory) -> Path:
    """A delta of a real transformers model (the tiny Llama against itself: the loaders look only at the marker)."""
    out = tmp_path_factory.mktemp("tiny-delta") / "tiny-delta"
    D.make_delta(tiny_model_dir, tiny_model_dir, out, base_name="org/tiny-base")
    return out


def test_every_loader_of_a_model_folder_refuses_a_delta(tiny_delta, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from rlhfchat.chat.engine import ChatEngine
    from rlhfchat.eval.generate import load_causal_lm
    from rlhfchat.models import load_pretrained, load_tokenizer
    from rlhfchat.train.policy import build_policy
    from rlhfchat.train.reward import RewardScorer

    message = (f"{tiny_delta}: this is a weight delta: apply it with `rlhfchat delta apply --base org/tiny-base "
               f"--delta {tiny_delta} --out tiny`")
    loaders = [lambda: load_tokenizer(tiny_delta), lambda: load_pretrained(AutoModelForCausalLM, tiny_delta,
                                                                           torch.float32),
               lambda: build_policy(tiny_delta), lambda: build_policy(tiny_delta, share_trunk=False),
               lambda: RewardScorer(tiny_delta), lambda: load_causal_lm(tiny_delta), lambda: ChatEngine(tiny_delta),
               lambda: D.make_delta(tiny_model_dir, tiny_delta, tiny_delta.parent / "x"),
               lambda: D.apply_delta(tiny_delta, tiny_delta, tiny_delta.parent / "x")]
    for load in loaders:
        with pytest.raises(RlhfchatError) as e:
            load()
        assert str(e.value) == message
    # through the CLI: one line, exit status 2
    assert cli_main(["chat", str(tiny_delta)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("name, is_id", [
    ("Qwen/Qwen2.5-0.5B-Instruct", True), ("CarperAI/stable-vicuna-13b-delta", True), ("gpt2", True),
    ("runs/tiny-cpu/ppo", False), ("./ppo", False), ("/abs/ppo", False), ("~/models/x", False),
    ("bad--name/x", False), ("x.git", False), ("", False)])
def test_hub_ids_are_told_from_paths_by_their_spelling(name, is_id):
    assert hub.is_hub_id(name) is is_id


def test_an_existing_folder_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not hub.is_hub_id("org/model") and hub.is_hub_id("org/other")


def test_files_to_fetch_take_one_weight_format_and_the_top_level_files():
    repo = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json", "flax_model.msgpack", "tf_model.h5", "config.json",
            "tokenizer.json", "tokenizer.model", "chat_template.jinja", "merges.txt", "README.md", ".gitattributes",
            "original/consolidated.00.pth", "original/params.json", "onnx/model.onnx", "delta.json"]
    assert hub.files_to_fetch(repo) == [
        "README.md", "chat_template.jinja", "config.json", "delta.json", "merges.txt",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "tokenizer.json", "tokenizer.model"]
    legacy = ["pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin",
              "pytorch_model-00003-of-00003.bin", "pytorch_model.bin.index.json", "config.json"]
    assert hub.files_to_fetch(legacy) == sorted(legacy)


OFFLINE = ("no such folder here, and the Hugging Face Hub cannot be reached to fetch it (HF_HUB_OFFLINE is set); "
           "fetch it once where the hub can be reached (it is then in the cache), or give a local folder")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty local hub cache, offline (HF_HUB_OFFLINE), in huggingface_hub's own layout."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_model(cache: Path, repo: str, folder: Path) -> Path:
    """Put `folder` into the hub cache as repo's snapshot of `main` (files as symlinks to blobs, as the hub writes)."""
    import hashlib

    storage = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir()
    for f in folder.iterdir():
        blob = storage / "blobs" / file_sha256(f)
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(blob)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def test_offline_a_hub_id_is_one_line_in_eval_delta_and_the_loaders(hub_cache, tmp_path, published, capsys):
    from rlhfchat.config import load_recipe
    from rlhfchat.eval.run import models_to_evaluate
    from rlhfchat.models import load_tokenizer, resolve_model

    with pytest.raises(RlhfchatError, match=re.escape(f"base.model: Qwen/Qwen2.5-0.5B-Instruct: {OFFLINE}")):
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct", "base.model")
    with pytest.raises(RlhfchatError, match=re.escape(f"Qwen/Qwen2.5-0.5B-Instruct: {OFFLINE}")):
        load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\noutput_dir: {tmp_path / 'run'}\neval: {{models: [org/judge-7b]}}\n")
    with pytest.raises(RlhfchatError, match=re.escape(f"eval.models: org/judge-7b: {OFFLINE}")):
        models_to_evaluate(load_recipe(recipe))
    for args in (["apply", "--base", "huggyllama/llama-13b", "--delta", str(published / "my-model-delta")],
                 ["apply", "--base", str(published / "base"), "--delta", "CarperAI/stable-vicuna-13b-delta",
                  "--legacy"]):
        assert cli_main(["delta", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f": {OFFLINE}" in err and f"--{args[1 if 'huggy' in args[2] else 3][2:]}: " \
            in err, err
    assert not (tmp_path / "out").exists()


def test_a_cached_hub_model_loads_offline_and_a_cached_hub_delta_is_refused(hub_cache, tmp_path, published,
                                                                           tiny_model_dir, tiny_delta, capsys):
    from rlhfchat.models import load_tokenizer, resolve_model

    # delta apply with the base and the delta as hub ids, both from the cache
    cache_model(hub_cache, "org/base", published / "base")
    cache_model(hub_cache, "me/my-model-delta", published / "my-model-delta")
    assert cli_main(["delta", "apply", "--base", "org/base", "--delta", "me/my-model-delta",
                     "--out", str(tmp_path / "m")]) == 0
    assert cli_main(["delta", "verify", "--target", str(tmp_path / "m"), "--delta", "me/my-model-delta"]) == 0
    # a transformers model from the cache: its snapshot folder, so nothing waits on the hub
    snapshot = cache_model(hub_cache, "org/tiny", tiny_model_dir)
    assert resolve_model("org/tiny") == str(snapshot)
    assert load_tokenizer("org/tiny").chat_template
    cache_model(hub_cache, "org/tiny-delta", tiny_delta)
    with pytest.raises(RlhfchatError, match=r"^org/tiny-delta: this is a weight delta: apply it with `rlhfchat delta "
                                            r"apply --base org/tiny-base --delta org/tiny-delta --out tiny`$"):
        resolve_model("org/tiny-delta")
