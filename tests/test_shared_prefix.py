"""The leading tokens that every row of a batch shares go through the trunk once (trunk.hidden_from's packed forward,
generation's shared KV cache): the same logprobs, values, reward scores, samples and gradients as a full forward, on
tiny local models."""

from __future__ import annotations

import functools

import pytest
import torch

from rlhfchat.data.schema import message
from rlhfchat.models import load_tokenizer
from rlhfchat.train.policy import Reference, build_policy
from rlhfchat.train.trunk import causal_parts
from rlhfchat.train.reward import RewardScorer
from rlhfchat.decoding import encode_prompt, left_pad
from rlhfchat.train.trunk import MIN_SHARED_PREFIX, hidden_from, shared_prefix_length

SYSTEM = "You add numbers and write the sum."


def test_shared_prefix_length_counts_the_common_leading_real_tokens():
    pad = 0
    ids = torch.tensor([[pad, pad, 5, 6, 7, 8, 9, 4],
                        [5, 6, 7, 8, 3, 4, 1, 4],
                        [pad, 5, 6, 7, 2, 9, 9, 4]])
    mask = (ids != pad).long()
    assert shared_prefix_length(ids, mask, start=7) == 3  # 5 6 7, then row 2 differs
    assert shared_prefix_length(ids, mask, start=4) == 2  # row 0 must keep column 4 for itself
    assert shared_prefix_length(ids, mask, start=2) == 0
    assert shared_prefix_length(ids[1:2], mask[1:2], start=7) == 0  # one row: nothing to share
    assert shared_prefix_length(ids[:2], mask[:2], start=7) == 4


def _batch(tok):
    """Left-padded chat prompts under one system prompt (different lengths) + right-padded responses."""
    prompts = [[message("system", SYSTEM), message("user", f"What is {a} + {b}?" + " Please." * (a % 3))]
               for a, b in [(1, 2), (10, 11), (3, 4), (7, 0)]]
    prompt_ids, prompt_mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    response = torch.randint(3, len(tok), (4, 6), generator=gen)
    response_mask = torch.ones_like(response)
    response[1, 2:], response_mask[1, 2:] = tok.pad_token_id, 0  # a reply that ended early
    ids = torch.cat([prompt_ids, response], 1)
    return ids, torch.cat([prompt_mask, response_mask], 1), prompt_ids.shape[1], response_mask


def _count_calls(trunk, calls):
    original = trunk.forward

    @functools.wraps(original)  # keeps the signature, which tells hidden_from how the trunk takes a KV cache
    def forward(*args, **kwargs):
        calls.append(tuple((args[0] if args else kwargs["input_ids"]).shape))
        return original(*args, **kwargs)

    trunk.forward = forward


@pytest.mark.parametrize("lora", [False, True])
def test_policy_and_reference_with_a_shared_prefix_equal_the_full_forward(tiny_model_dir, lora, monkeypatch):
    from rlhfchat.config import LoraConfig
    from rlhfchat.train import trunk as trunk_mod

    monkeypatch.setattr(trunk_mod, "PACK_PADDING_FROM", 0.0)  # the rows' padding always left out

    tok = load_tokenizer(tiny_model_dir)
    ids, mask, n_prompt, response_mask = _batch(tok)
    assert shared_prefix_length(ids, mask, n_prompt - 1) >= MIN_SHARED_PREFIX
    results = {}
    for share in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        policy = build_policy(tiny_model_dir, lora=LoraConfig(enabled=lora), seed=0, share_prefix=share)
        trunk, _ = causal_parts(policy.lm)
        calls: list[tuple[int, ...]] = []
        _count_calls(trunk, calls)
        out = policy(ids, mask, n_prompt)
        weights = torch.randn(out.logprobs.shape, generator=torch.Generator().manual_seed(1))
        ((out.logprobs + out.values) * weights * response_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        # sharing: one packed row (the prefix once, then the real tokens of each of the 4 rows); else the whole batch
        assert [c[0] for c in calls] == ([1] if share else [4])
        if share:
            assert calls[0][1] == int(mask.sum()) - 3 * shared_prefix_length(ids, mask, n_prompt - 1)
        ref = Reference(policy, tiny_model_dir).logprobs(ids, mask, n_prompt)
        results[share] = out.logprobs.detach(), out.values.detach(), grads, ref
    full, shared = results[False], results[True]
    m = response_mask.bool()
    for a, b in zip(full[:2], shared[:2]):
        assert torch.allclose(a[m], b[m], atol=1e-5)
    assert torch.allclose(full[3][m], shared[3][m], atol=1e-5)
    assert full[2].keys() == shared[2].keys()
    for name, grad in full[2].items():
        assert (grad - shared[2][name]).norm() <= 1e-5 * grad.norm(), name


def test_gradient_checkpointing_takes_the_full_forward_when_training(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ids, mask, n_prompt, _ = _batch(tok)
    policy = build_policy(tiny_model_dir, gradient_checkpointing=True)
    trunk, _ = causal_parts(policy.lm)
    calls: list[tuple[int, ...]] = []
    _count_calls(trunk, calls)
    policy.train()
    states = hidden_from(trunk, ids, mask, n_prompt - 1)
    assert calls == [tuple(ids.shape)] and states.shape[:2] == (4, ids.shape[1] - n_prompt + 1)
    with torch.no_grad():  # no backward to replay: the prefix is shared, in one packed call
        shared = hidden_from(trunk, ids, mask, n_prompt - 1)
    real = mask[:, n_prompt - 1 :].bool()  # a padding column's state is not computed
    assert [c[0] for c in calls[1:]] == [1] and torch.allclose(shared[real], states[real], atol=1e-5)


def test_reward_scores_with_a_shared_prefix_equal_the_models_own_pooling(tiny_reward_dir):
    scorer = RewardScorer(tiny_reward_dir)
    texts = [f"{SYSTEM}\n### Human: What is {a} + {a}?{' Please.' * a}\n### Assistant: {2 * a}" for a in range(5)]
    calls: list[tuple[int, ...]] = []
    _count_calls(scorer.model.model, calls)
    scores = scorer.score_texts(texts)
    assert calls[0][0] == 1  # the shared prefix went through once
    tok = scorer.tokenizer
    for side in ("left", "right"):
        tok.padding_side = side
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            expected = scorer.model(**enc).logits[:, 0]
        assert torch.allclose(scores, expected, atol=1e-5), side
    plain = RewardScorer(tiny_reward_dir, share_prefix=False)  # ppo.share_prompt_prefix: false
    calls.clear()
    _count_calls(plain.model.model, calls)
    assert torch.allclose(plain.score_texts(texts), scores, atol=1e-5) and calls == [calls[0]] and calls[0][0] == 5


def test_generation_prefills_the_shared_prefix_once_and_samples_the_same(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rlhfchat.decoding import GenerationSettings, hf_generate

    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [[message("system", SYSTEM), message("user", f"What is {a} + {a}?" + " Please." * (a % 3))]
               for a in range(5)]
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    out = {}
    for share in (False, True):
        settings = GenerationSettings(max_new_tokens=8, min_new_tokens=8, share_prefix=share)
        calls: list[tuple[int, ...]] = []
        _count_calls(model.model, calls)
        out[share] = hf_generate(model, tok, ids, mask, settings, capture=True, seeds=list(range(5)))
        del model.model.forward
        assert calls[0][0] == (1 if share else 5)
    assert torch.equal(out[False].tokens, out[True].tokens)
    assert torch.allclose(out[False].hidden, out[True].hidden, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "llama-gqa", "gpt2"])
@pytest.mark.parametrize("share", ["no", "packed", "packed-without-padding"])
def test_the_last_blocks_mlp_runs_only_on_the_columns_read(tiny_model_dir, tmp_path, arch, share, monkeypatch):
    """Logprobs, values and every gradient equal the plain forward's (the trunk on the whole batch, every column),
    while the last block's MLP sees only the response columns; with sharing, in the packed forward, with or without
    the rows' padding."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from rlhfchat.train import trunk as trunk_mod

    monkeypatch.setattr(trunk_mod, "PACK_PADDING_FROM", 0.0 if share == "packed-without-padding" else 1.0)

    from rlhfchat.train.policy import output_logits
    from rlhfchat.train.ppo_math import logprobs_of_labels
    from rlhfchat.train.trunk import decoder_blocks, position_ids_from_mask

    tok = load_tokenizer(tiny_model_dir)
    folder = tiny_model_dir
    if arch == "gpt2":  # its MLP's Conv1D takes only contiguous input
        torch.manual_seed(0)
        folder = tmp_path / "gpt2"
        AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                                    n_positions=128)).save_pretrained(folder)
    if arch == "llama-gqa":  # two query heads per key/value head
        torch.manual_seed(0)
        folder = tmp_path / "gqa"
        AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    ids, mask, n_prompt, response_mask = _batch(tok)
    policy = build_policy(folder, seed=0, share_prefix=share != "no")
    trunk, _ = causal_parts(policy.lm)
    widths = []
    # a forward hook sees the arguments the MLP ran on
    decoder_blocks(trunk)[-1].mlp.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    weights = torch.randn(response_mask.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for plain in (True, False):
        policy.zero_grad()
        widths.clear()
        if plain:
            hidden = trunk(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
                           ).last_hidden_state[:, n_prompt - 1 : -1]
            logprobs = logprobs_of_labels(output_logits(policy.lm, hidden), ids[:, n_prompt:])
            values = policy.values_of(hidden)
        else:
            out = policy(ids, mask, n_prompt)
            logprobs, values = out.logprobs, out.values
        ((logprobs + values) * weights * response_mask).sum().backward()
        results.append((logprobs.detach(), values.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()},
                        list(widths)))
    (lp, v, grads, plain_widths), (lp2, v2, grads2, trimmed_widths) = results
    m = response_mask.bool()
    assert torch.allclose(lp[m], lp2[m], atol=1e-5) and torch.allclose(v[m], v2[m], atol=1e-5)
    for name, grad in grads.items():
        assert (grad - grads2[name]).norm() <= 1e-5 * grad.norm(), name
    assert plain_widths == [ids.shape[1]]
    # the response columns and the one before them (whose state predicts the first response token), of every row;
    # without the padding, only the real ones
    expected = {"no": response_mask.shape[1] + 1, "packed": 4 * (response_mask.shape[1] + 1),
                "packed-without-padding": 4 + int(response_mask.sum())}
    assert trimmed_widths == [expected[share]]
    mlp = decoder_blocks(trunk)[-1].mlp
    assert len(mlp._forward_hooks) == 1 and not mlp._forward_pre_hooks  # only this test's own hook is left


class _SeenMLP(torch.nn.Module):
    """Records the columns it runs on; `residual` as Bloom's MLP takes it."""

    def __init__(self, routed: bool = False):
        super().__init__()
        self.widths: list[int] = []
        self.routed = routed

    def forward(self, x, residual=None):
        self.widths.append(x.shape[1])
        out = 2 * x if residual is None else 2 * x + residual
        return (out, x.sum(-1)) if self.routed else out  # an MoE block's (states, router scores)


def _trunk(mlp: torch.nn.Module) -> torch.nn.Module:
    from types import SimpleNamespace

    trunk = torch.nn.Module()
    trunk.config = SimpleNamespace(num_hidden_layers=1)
    trunk.layers = torch.nn.ModuleList([torch.nn.Module()])
    trunk.layers[0].mlp = mlp
    return trunk


def test_last_mlp_from_narrows_only_a_call_on_the_states_alone_and_always_cleans_up():
    from rlhfchat.train.trunk import last_mlp_from

    x = torch.randn(2, 5, 4)
    routed = _SeenMLP(routed=True)
    with last_mlp_from(_trunk(routed), 3):
        out, router = routed(x)
    assert routed.widths == [2] and router.shape == (2, 2)
    assert torch.equal(out[:, 3:], 2 * x[:, 3:]) and not out[:, :3].any()

    mlp = _SeenMLP()
    trunk = _trunk(mlp)
    with last_mlp_from(trunk, 3):
        assert torch.equal(mlp(x, x), 3 * x)  # Bloom's call, with the residual: left whole
        mlp(x[:, :2])  # narrower than `start` (a decode step): left whole
        with last_mlp_from(trunk, 1):  # inside another: the outer narrowing alone
            mlp(x)
    assert mlp.widths == [5, 2, 2]
    indexed = _SeenMLP()  # named columns (a packed forward's): gathered, and the outputs put back in their place
    with last_mlp_from(_trunk(indexed), torch.tensor([1, 3])):
        y = indexed(x)
        indexed(x[:, :3])  # too narrow to hold column 3: left whole
    assert indexed.widths == [2, 3]
    assert torch.equal(y[:, [1, 3]], 2 * x[:, [1, 3]]) and not y[:, [0, 2, 4]].any()
    with pytest.raises(ValueError), last_mlp_from(trunk, 3):
        raise ValueError
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks and not hasattr(mlp, "_rlhfchat_narrowed")
    trunk.layers[0]._checkpoint_wrapped_module = torch.nn.Identity()  # accelerate's activation checkpointing
    trunk.train()
    with last_mlp_from(trunk, 3):
        mlp(x)
    assert mlp.widths[-1] == 5


def test_a_packed_forward_leaves_the_trunk_as_it_was_and_only_sdpa_trunks_pack(tiny_model_dir):
    from transformers import AutoModel

    from rlhfchat.errors import RlhfchatError
    from rlhfchat.train.trunk import decoder_blocks, packable, packed_attention

    tok = load_tokenizer(tiny_model_dir)
    ids, mask, n_prompt, _ = _batch(tok)
    model = AutoModel.from_pretrained(tiny_model_dir)
    assert model.config._attn_implementation == "sdpa" and packable(model)
    expected = hidden_from(model, ids, mask, n_prompt - 1, share_prefix=False)

    def fail(module, args):
        raise RuntimeError("stopped in the last block")

    stop = decoder_blocks(model)[-1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="last block"):
        hidden_from(model, ids, mask, n_prompt - 1)
    stop.remove()
    mlp = decoder_blocks(model)[-1].mlp
    assert model.config._attn_implementation == "sdpa" and not mlp._forward_hooks and not mlp._forward_pre_hooks
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from rlhfchat.train.trunk import PACKED

    # nothing global outlives the call: the attention and mask functions are registered only inside it
    assert PACKED not in AttentionInterface._global_mapping and PACKED not in AttentionMaskInterface._global_mapping
    real = mask[:, n_prompt - 1 :].bool()
    assert torch.allclose(hidden_from(model, ids, mask, n_prompt - 1)[real], expected[real], atol=1e-5)
    q = torch.zeros(1, 2, 5, 16)
    with pytest.raises(RlhfchatError, match="packed_forward"):  # the attention function alone has no layout
        packed_attention(decoder_blocks(model)[0].self_attn, q, q, q, None)

    eager = AutoModel.from_pretrained(tiny_model_dir, attn_implementation="eager")  # no packing: the plain forward
    calls: list[tuple[int, ...]] = []
    _count_calls(eager, calls)
    assert not packable(eager)
    assert torch.allclose(hidden_from(eager, ids, mask, n_prompt - 1), expected, atol=1e-5)
    assert calls == [tuple(ids.shape)]
