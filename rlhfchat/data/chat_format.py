"""The one chat format: Vicuna v0, as StableVicuna was trained and prompted.

    A chat between a curious human and an artificial intelligence assistant. ...   (optional system line)
    ### Human: What is 2 + 3?
    ### Assistant: 2 + 3 = 5.</s>
    ### Human: ...

It lives as a Jinja chat template on the tokenizer, so `tokenizer.apply_chat_template(messages,
return_assistant_tokens_mask=True, return_dict=True)` gives the assistant-token mask that SFT trains on (the
`{% generation %}` markers), and serving and evaluation format prompts through the same template
(`add_generation_prompt=True` ends the prompt with "### Assistant:"). The reply starts with a space inside the
generation block, so the prompt's last token is the same in training and at inference.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
HUMAN = "### Human:"
ASSISTANT = "### Assistant:"
STOP_SEQUENCES = [HUMAN]
"""Text that ends a reply when the model does not emit EOS."""

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + '\\n' }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '### Human: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Assistant:' }}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('roles must be system (first only), user or assistant; got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:' }}{%- endif -%}"
)


def apply_template(tokenizer: Any) -> Any:
    """Set the Vicuna v0 template on a Hugging Face tokenizer (saved with it as chat_template.jinja)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render(messages: list[dict[str, str]], eos_token: str = "</s>", add_generation_prompt: bool = False) -> str:
    """The template rendered without a tokenizer (for tests, logs and the benchmark's string prompts)."""
    out = []
    if messages and messages[0]["role"] == "system":
        out.append(messages[0]["content"] + "\n")
        messages = messages[1:]
    for m in messages:
        if m["role"] == "user":
            out.append(f"{HUMAN} {m['content']}\n")
        elif m["role"] == "assistant":
            out.append(f"{ASSISTANT} {m['content']}{eos_token}\n")
        else:
            raise ValueError(f"roles must be system (first only), user or assistant; got {m['role']}")
    if add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)


def cut_at_stop(text: str, stops: list[str] | tuple[str, ...] = tuple(STOP_SEQUENCES)) -> tuple[str, bool]:
    """Cut a generated reply at the first stop sequence; returns (reply, whether a stop was found)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut], cut < len(text)


def reward_text(tokenizer: Any, prompt: list[dict[str, str]], reply: str) -> str:
    """What the reward model scores: the prompt and the reply rendered as one conversation (ending in EOS).

    Reward training (TRL's RewardTrainer on conversational pairs) and PPO scoring both go through this template,
    so the reward model sees the same text in both.
    """
    return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
