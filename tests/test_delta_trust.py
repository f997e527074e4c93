"""Deltas trust nothing unverified (issue 18): every damaged delta is a one-line error naming the file, with nothing
written; every carried file is checked; a delta without manifest needs --legacy; a killed apply leaves nothing stale.

    .venv/bin/python -m pytest tests/test_delta_trust.py -q

Each case runs `rlhfchat delta apply` through the CLI (exit status 2, one `error:` line on stderr) on a tiny Llama
delta in several shards, with fixes, a tokenizer, a generation config and a PPO value head.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhfchat import delta as D
from rlhfchat.cli import main as cli_main
from rlhfchat.errors import RlhfchatError
from tests.test_delta import CFG, finetune, listing, llama_tensors, save

TOKENIZER = json.dumps({"added_tokens": [{"id": 0, "content": "<unk>"}, {"id": 1, "content": "<s>"}],
                        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "a": 2, "b": 3}}})
FILES = {"config.json": CFG, "tokenizer.json": TOKENIZER, "generation_config.json": '{"do_sample": false}',
         "chat_template.jinja": "{{ messages }}"}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """base, target (float16, with a value head) and the delta between them, in 3+ shards with fixes."""
    root = tmp_path_factory.mktemp("trust")
    base = llama_tensors(dtype=torch.float16, seed=21)
    save(root / "base", base, files={"config.json": CFG})
    save(root / "target", finetune(base, seed=22), files=FILES)
    save_file({"value_head.weight": torch.randn(1, 32), "value_head.bias": torch.zeros(1)},
              str(root / "target" / D.VALUE_HEAD))
    manifest = D.make_delta(root / "base", root / "target", root / "delta", shard_size=20_000)
    assert sum(e["fixes"] for e in manifest["tensors"].values()) > 0 and manifest["fixes_sha256"]
    assert set(manifest["files"]) == {*FILES, D.VALUE_HEAD}
    assert len(list((root / "delta").glob("model-*.safetensors"))) >= 3
    return root


@pytest.fixture
def copy(made, tmp_path) -> Path:
    """A fresh copy of the delta (to damage) beside a link to the base; the cwd listing is what must not change."""
    import shutil

    shutil.copytree(made / "delta", tmp_path / "delta")
    os.symlink(made / "base", tmp_path / "base")
    return tmp_path


def apply(root: Path, *extra: str, out: str = "out") -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(["delta", "apply", "--base", str(root / "base"), "--delta", str(root / "delta"),
                       "--out", str(root / out), *extra])
    return rc, err.getvalue().strip()


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _flip_byte(path: Path, from_end: int) -> str:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x10
    path.write_bytes(bytes(data))
    return path.name


def _truncate(path: Path, n: int) -> str:
    path.write_bytes(path.read_bytes()[:-n])
    return path.name


def _remove(path: Path) -> str:
    path.unlink()
    return path.name


def _shard_with(root: Path, name: str) -> Path:
    index = json.loads((root / "delta" / "model.safetensors.index.json").read_text())
    return root / "delta" / index["weight_map"][name]


def _fewer_layers(root: Path) -> str:
    _edit_json(root / "delta" / "config.json", lambda c: c.update(num_hidden_layers=1))
    return "config.json"


def _swapped_ids(root: Path) -> str:
    def swap(tok):
        tok["model"]["vocab"]["a"], tok["model"]["vocab"]["b"] = 3, 2

    _edit_json(root / "delta" / "tokenizer.json", swap)
    return "tokenizer.json"


def _sampling_on(root: Path) -> str:
    (root / "delta" / "generation_config.json").write_text('{"do_sample": true}')
    return "generation_config.json"


def _wrong_dtype(root: Path) -> str:
    shard = _shard_with(root, "model.norm.weight")
    sd = load_file(shard)
    sd["model.norm.weight"] = sd["model.norm.weight"].float()
    save_file(sd, str(shard), metadata={"format": "pt"})
    return shard.name


# what is done to the delta (returns the name the one-line error must hold), and what the error must say
DAMAGE = {
    "config altered (2 -> 1 layers)": (_fewer_layers, "differs from the delta's manifest"),
    "tokenizer ids swapped": (_swapped_ids, "differs from the delta's manifest"),
    "tokenizer missing": (lambda r: _remove(r / "delta" / "tokenizer.json"), "is missing"),
    "generation config altered": (_sampling_on, "differs from the delta's manifest"),
    "value head altered": (lambda r: _flip_byte(r / "delta" / D.VALUE_HEAD, 3), "differs"),
    "manifest deleted": (lambda r: _remove(r / "delta" / D.MANIFEST), "pass --legacy"),
    "fixes truncated": (lambda r: _truncate(r / "delta" / D.FIXES, 7), "differs from the delta's manifest"),
    "fixes missing": (lambda r: _remove(r / "delta" / D.FIXES), "is missing"),
    "fixes corrupt": (lambda r: _flip_byte(r / "delta" / D.FIXES, 1), "differs from the delta's manifest"),
    "shard truncated": (lambda r: _truncate(_shard_with(r, "lm_head.weight"), 50), "is truncated"),
    "shard missing": (lambda r: _remove(_shard_with(r, "lm_head.weight")), "which is missing"),
    "shard corrupt": (lambda r: _flip_byte(_shard_with(r, "lm_head.weight"), 5), "is damaged: its tensor"),
    "shard in the wrong dtype": (_wrong_dtype, "float32, the delta's manifest says [32] float16"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_delta_is_one_line_naming_the_file_and_nothing_is_written(copy, case):
    damage, says = DAMAGE[case]
    culprit = damage(copy)
    before = listing(copy)
    rc, err = apply(copy)
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert culprit in err and says in err, err
    assert listing(copy) == before  # no output folder, no temporary


def test_files_the_delta_does_not_list_are_not_copied(made, copy):
    (copy / "delta" / "README.md").write_text("published on the hub\n")  # as a hub upload adds
    rc, err = apply(copy)
    assert rc == 0, err
    assert not (copy / "out" / "README.md").exists()
    assert (copy / "out" / D.VALUE_HEAD).read_bytes() == (made / "target" / D.VALUE_HEAD).read_bytes()
    D.verify_delta(copy / "out", copy / "delta")
    _flip_byte(copy / "out" / D.VALUE_HEAD, 3)
    with pytest.raises(RlhfchatError, match="value_head.safetensors is missing or differs"):
        D.verify_delta(copy / "out", copy / "delta")


def test_a_dangling_symlink_at_out_is_refused(copy):
    os.symlink(copy / "nowhere", copy / "out")
    before = listing(copy)
    rc, err = apply(copy)
    assert rc == 2 and "out is a symlink to" in err and "does not exist" in err and "\n" not in err, err
    assert listing(copy) == before
    assert cli_main(["delta", "make", "--base", str(copy / "base"), "--target", str(copy / "base"),
                     "--out", str(copy / "out")]) == 2


def test_legacy_is_refused_for_a_delta_with_a_manifest(copy):
    rc, err = apply(copy, "--legacy")
    assert rc == 2 and "has a delta.json: apply it without --legacy" in err


def test_a_critic_trunk_is_left_out_of_the_delta(made, tmp_path, caplog):
    import shutil

    shutil.copytree(made / "target", tmp_path / "target")
    save_file({"value_head.weight": torch.zeros(1, 32), "critic.model.norm.weight": torch.ones(32)},
              str(tmp_path / "target" / D.VALUE_HEAD))
    manifest = D.make_delta(made / "base", tmp_path / "target", tmp_path / "delta")
    assert D.VALUE_HEAD not in manifest["files"] and not (tmp_path / "delta" / D.VALUE_HEAD).exists()
    assert "holds a critic's trunk" in caplog.text


def test_a_manifest_file_name_outside_the_folder_is_refused(copy):
    _edit_json(copy / "delta" / D.MANIFEST, lambda m: m["files"].update({"../base/config.json": "0" * 64}))
    rc, err = apply(copy)
    assert rc == 2 and "'../base/config.json' is not a plain file name" in err


def test_a_killed_apply_leaves_a_temporary_the_next_apply_removes(copy):
    """SIGKILL at the rename of the finished output: `.out.*.tmp` stays; the next apply removes it and succeeds."""
    helper = Path(__file__).parent / "_faults.py"
    args = ["delta", "apply", "--base", str(copy / "base"), "--delta", str(copy / "delta"), "--out", str(copy / "out")]
    killed = subprocess.run([sys.executable, str(helper), "write=out", *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = [p.name for p in copy.iterdir() if p.name.startswith(".out.")]
    assert len(left) == 1 and left[0].endswith(".tmp") and not (copy / "out").exists()
    rc, err = apply(copy)
    assert rc == 0, err
    assert sorted(p.name for p in copy.iterdir()) == ["base", "delta", "out"]
    D.verify_delta(copy / "out", copy / "delta")
