"""models.py: the one loader of a model folder (load_model_folder) and the one adapter lookup (find_adapter)."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfchat.errors import RlhfchatError
from rlhfchat.models import find_adapter, load_model_folder, load_tokenizer


def test_a_lora_adapter_folder_loads_as_its_base_with_the_adapters_merged(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")  # adapters only: no tokenizer, no config.json
    adapter = find_adapter(tmp_path / "adapter")
    assert adapter is not None and adapter.base == str(tiny_model_dir) and adapter.tokenizer == str(tiny_model_dir)
    assert find_adapter(tiny_model_dir) is None

    model = load_model_folder(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = peft.merge_and_unload()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
        got = model(ids).logits
    assert not hasattr(model, "peft_config") and torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapters did change the model
    assert load_tokenizer(tmp_path / "adapter").get_vocab() == load_tokenizer(tiny_model_dir).get_vocab()


def test_a_folder_that_does_not_load_is_one_line_naming_it_and_what_it_should_hold(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(RlhfchatError, match=r"broken: cannot load a reward model \(") as e:
        load_model_folder(tmp_path / "broken", what="a reward model")
    assert "\n" not in str(e.value)
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(RlhfchatError, match="adapter_config.json: no base_model_name_or_path"):
        load_model_folder(tmp_path / "lonely")
    gone = {"base_model_name_or_path": str(tmp_path / "gone")}
    (tmp_path / "lonely" / "adapter_config.json").write_text(json.dumps(gone))
    with pytest.raises(RlhfchatError, match="base_model_name_or_path.*gone: no such folder"):
        load_model_folder(tmp_path / "lonely")


def test_a_reward_model_folder_is_refused_where_text_is_generated(tiny_reward_dir):
    """A reward model opened as a causal LM (e.g. `rlhfchat chat RUN/reward`) would get a random LM head and answer in
    noise: one line naming the folder instead. Opened as what it is, it loads."""
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(RlhfchatError, match=r"reward model \(\w+ForSequenceClassification: one score per text\), "
                                            r"not a causal LM"):
        load_model_folder(tiny_reward_dir, what="a causal LM")
    assert load_model_folder(tiny_reward_dir, AutoModelForSequenceClassification).config.num_labels == 1
