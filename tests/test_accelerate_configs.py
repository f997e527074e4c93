"""The shipped accelerate configs parse as accelerate's own config and name only options `accelerate launch` knows."""

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_the_expected_configs_ship():
    names = {p.stem for p in CONFIGS}
    assert {"ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp", "cpu-2proc", "cpu-zero2",
            "cpu-zero3"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_names_real_options(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # raises on an unknown top-level key
    raw = yaml.safe_load(path.read_text())
    launch_options = {a.dest for a in launch_command_parser()._actions}
    for section in ("deepspeed_config", "fsdp_config"):
        for key in raw.get(section, {}):
            assert key in launch_options, f"{path.name}: {section}.{key} is not an accelerate launch option"
    ds = raw.get("deepspeed_config", {})
    if "deepspeed_config_file" in ds:  # relative to the repository's root, where the docs launch from
        zero = json.loads((ROOT / ds["deepspeed_config_file"]).read_text())["zero_optimization"]
        ds = {"zero_stage": zero["stage"], "zero3_save_16bit_model": zero["stage3_gather_16bit_weights_on_model_save"],
              **ds}
    if "zero3" in path.stem:
        assert ds["zero_stage"] == 3
        assert ds["zero3_save_16bit_model"] is True  # a loadable model folder at the end
    if path.stem.startswith("cpu-zero"):  # what makes accelerate keep DeepSpeed on a machine without GPUs
        assert raw["use_cpu"] is False and raw["num_processes"] == 2
    if "offload" in path.stem:
        assert raw["deepspeed_config"]["offload_optimizer_device"] == "cpu"
    if path.stem == "fsdp":
        assert raw["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert config.num_processes >= 1


def test_a_deepspeed_config_without_deepspeed_is_one_clear_line(monkeypatch):
    import sys

    from rlhfchat.errors import RlhfchatError
    from rlhfchat.train.distributed import new_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    with pytest.raises(RlhfchatError, match=r"^accelerate config: DeepSpeed is selected but deepspeed is not "
                                            r"installed; DS_BUILD_OPS=0 pip install 'rlhfchat\[deepspeed\]'"):
        new_accelerator()
