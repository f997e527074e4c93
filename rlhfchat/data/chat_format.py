"""Chat formats: a model's own chat template, or Vicuna v0, as StableVicuna was trained and prompted.

    A chat between a curious human and an artificial intelligence assistant. ...   (optional system line)
    ### Human: What is 2 + 3?
    ### Assistant: 2 + 3 = 5.</s>
    ### Human: ...

Every format lives as a Jinja chat template on the tokenizer, used everywhere the same way: training (SFT's loss on
assistant tokens, the reward model's texts), rollouts, serving and evaluation format prompts through it
(`add_generation_prompt=True` ends the prompt with the assistant's cue). `choose_template` picks it from the recipe's
`base.chat_template`: `model` keeps the model's own template (Vicuna v0 when it has none), `vicuna_v0` sets Vicuna
v0, a path reads a Jinja file.

Vicuna v0 marks the assistant's tokens with `{% generation %}` (so `return_assistant_tokens_mask=True` gives SFT its
mask) and starts the reply with a space inside that block, so the prompt's last token is the same in training and
at inference. Templates without the markers (ChatML, Llama 3, Mistral, as models publish them) get their assistant
spans by rendering (`assistant_token_mask`). Where a reply ends comes from the template too (`template_stops`): its
end-of-turn token (ChatML's <|im_end|>, Llama 3's <|eot_id|>, EOS) and the text that opens the next turn when it is
plain text (Vicuna's "### Human:").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
Prompt = str | list[dict[str, str]]
"""What a model is asked: chat messages (rendered through the chat template) or a string used verbatim as the input."""

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


TEMPLATE_CHOICES = ("model", "vicuna_v0")
"""base.chat_template: one of these, or the path of a Jinja file."""


def apply_template(tokenizer: Any) -> Any:
    """Set the Vicuna v0 template on a Hugging Face tokenizer (saved with it as chat_template.jinja)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def choose_template(tokenizer: Any, choice: str = "model") -> Any:
    """Set the chat template a run uses: `model` (the tokenizer's own; Vicuna v0 when it has none), `vicuna_v0`, or
    the path of a Jinja template file. Returns the tokenizer."""
    from pathlib import Path

    from rlhfchat.errors import RlhfchatError

    if choice == "vicuna_v0" or (choice == "model" and not tokenizer.chat_template):
        return apply_template(tokenizer)
    if choice == "model":
        if isinstance(tokenizer.chat_template, dict):  # named variants: the default one is the chat format
            tokenizer.chat_template = tokenizer.chat_template.get("default") or next(iter(
                tokenizer.chat_template.values()))
        return tokenizer
    path = Path(choice).expanduser()
    if not path.is_file():
        raise RlhfchatError(f"base.chat_template: expected {', '.join(TEMPLATE_CHOICES)} or a Jinja template file, "
                            f"got {choice!r} (no such file)")
    tokenizer.chat_template = path.read_text(encoding="utf-8")
    return tokenizer


def has_generation_markers(template: Any) -> bool:
    return isinstance(template, str) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies, found by rendering.

    Reply i's span runs from the end of the conversation before it rendered with the assistant's cue
    (`add_generation_prompt=True`) to the end of the conversation up to it, less trailing whitespace: the reply, and
    whatever the template writes to end the turn (an end-of-turn token or EOS). Needs a template that renders a
    conversation's beginning as the beginning of the whole (prefix-preserving), as chat templates are; one that is not
    is an error naming the message.
    """
    from rlhfchat.errors import RlhfchatError

    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not upto.startswith(before) or not full.startswith(upto):
            raise RlhfchatError(f"chat template: rendering messages[{i}] changes the text before it (the template is "
                                "not prefix-preserving); assistant tokens cannot be found by rendering, add "
                                "{% generation %} markers to the template")
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def assistant_token_mask(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) of a conversation through any chat template: 1 on the tokens of the assistant
    replies and their end of turn (see assistant_spans), 0 elsewhere. A token that straddles a span's edge counts as
    the reply's. What `return_assistant_tokens_mask=True` gives for a template with generation markers."""
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < end and b > start for start, end in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


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


def reward_text(tokenizer: Any, prompt: list[dict[str, str]], reply: str) -> str:
    """What the reward model scores: the prompt and the reply rendered as one conversation (ending in EOS).

    Reward training (TRL's RewardTrainer on conversational pairs) and PPO scoring both go through this template,
    so the reward model sees the same text in both.
    """
    return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)


@dataclass
class TemplateStops:
    """Where a reply ends under a chat template (template_stops)."""

    token_ids: list[int] = field(default_factory=list)
    """End-of-turn tokens: the template's (<|im_end|>, <|eot_id|>) and EOS."""
    strings: list[str] = field(default_factory=list)
    """The plain text that opens the next turn, where it is plain text ("### Human:" for Vicuna v0)."""


_REPLY, _NEXT = "zqxREPLYzqx", "zqxNEXTzqx"


def template_stops(tokenizer: Any) -> TemplateStops:
    """The end-of-turn tokens and stop texts of the tokenizer's chat template, found by rendering a reply followed by
    a user turn: the first special token after the reply ends the turn (with EOS, always); the text between the reply
    and the next user message, when it holds no special token, is a stop text too (a small model may write the
    next turn's header instead of ending its own)."""
    text = _render(tokenizer, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _REPLY},
                               {"role": "user", "content": _NEXT}])
    between = text[text.index(_REPLY) + len(_REPLY): text.index(_NEXT)]
    ids = tokenizer(between, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    stops = TemplateStops()
    if tokenizer.eos_token_id is not None:
        stops.token_ids.append(int(tokenizer.eos_token_id))
    first = next((i for i, t in enumerate(ids) if t in special), None)
    if first is not None and ids[first] not in stops.token_ids:
        stops.token_ids.append(int(ids[first]))
    header = ids[first + 1:] if first is not None else ids
    if header and not any(t in special for t in header):
        opener = tokenizer.decode(header).strip()
        if opener:
            stops.strings.append(opener)
    return stops
