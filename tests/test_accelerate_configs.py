"""The shipped accelerate configs parse as accelerate's own config and name only options `accelerate launch` knows."""

from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "accelerate").glob("*.yaml"))


def test_the_expected_configs_ship():
    names = {p.stem for p in CONFIGS}
    assert {"ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp", "cpu-2proc"} <= names


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
    if "zero3" in path.stem:
        assert raw["deepspeed_config"]["zero_stage"] == 3
        assert raw["deepspeed_config"]["zero3_save_16bit_model"] is True  # a loadable model folder at the end
    if "offload" in path.stem:
        assert raw["deepspeed_config"]["offload_optimizer_device"] == "cpu"
    if path.stem == "fsdp":
        assert raw["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert config.num_processes >= 1
