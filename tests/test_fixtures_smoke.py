from rlhfchat.models import load_tokenizer


def test_tiny_model_has_template_and_loads(tiny_model_dir, tiny_reward_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = load_tokenizer(tiny_model_dir)
    assert "{% generation %}" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "### Human: What is 2 + 3?\n### Assistant:"
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir)
    ids = tok(text, return_tensors="pt")
    assert lm(**ids).logits.shape[-1] == len(tok)
    assert rm(**ids).logits.shape == torch.Size([1, 1])
