"""PPO stage on tiny local models: padding and EOS, the score's position, gradient accumulation, every parameter
training, the saved folder, and resume after SIGKILL."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhfchat.config import load_recipe
from rlhfchat.data.schema import message, prompt_record, write_jsonl
from rlhfchat.errors import RlhfchatError
from rlhfchat.models import load_tokenizer
from rlhfchat.train import rollout as rollout_mod
from rlhfchat.train.policy import response_logprobs
from rlhfchat.train.ppo import PPO
from rlhfchat.train.reward import RewardScorer
from rlhfchat.decoding import Generated, encode_prompt, finish_responses, left_pad
from rlhfchat.train.rollout import check_backend

PROMPTS = [
    [message("user", "What is 2 + 3?")],
    [message("system", "You add numbers."), message("user", "What is 10 + 11? Please write the sum.")],
    [message("user", "Fix the grammar: she go to school.")],
    [message("user", "Write a function that doubles a number.")],
]


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir, tiny_reward_dir) -> Path:
    """A run folder as the earlier stages leave it: sft/, reward/, data/prompts.{train,eval}.jsonl."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    os.symlink(tiny_model_dir, run / "sft")
    os.symlink(tiny_reward_dir, run / "reward")
    train = [prompt_record(f"t{i}", "test", [message("user", f"What is {i} + {i % 5}?")]) for i in range(24)]
    write_jsonl(run / "data" / "prompts.train.jsonl", train)
    write_jsonl(run / "data" / "prompts.eval.jsonl", [prompt_record("e0", "test", PROMPTS[0]),
                                                      prompt_record("e1", "test", PROMPTS[2])])
    return run


def tiny_recipe(run: Path, *overrides: str):
    return load_recipe(None, [f"output_dir={run}", "ppo.num_rollouts=8", "ppo.chunk_size=4", "ppo.batch_size=4",
                              "ppo.ppo_epochs=1", "ppo.generation.max_new_tokens=6", "ppo.eval_prompts=2",
                              "ppo.learning_rate=0.01", "ppo.generation.max_prompt_length=64", *overrides])


def make_ppo(run: Path, *overrides: str) -> PPO:
    recipe = tiny_recipe(run, *overrides)
    return PPO.from_folders(run / "sft", run / "reward", recipe.ppo, seed=0)


def fake_responses(tok) -> torch.Tensor:
    """Four raw generations (B=4, R=8) as generate would return them, each ending differently."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    words = tok(" 5 is the answer", add_special_tokens=False).input_ids
    stop = tok(" ok\n### Human: more", add_special_tokens=False).input_ids
    rows = [
        words[:3] + [eos] + [pad] * 4,                   # EOS after 3 tokens: 4 real tokens, EOS included
        (words * 3)[:8],                                  # ran to max_new_tokens: 8 real tokens, no EOS
        [words[0], eos] + [pad] * 6,                      # 2 real tokens
        (stop + [pad] * 8)[:8],                           # a stop sequence inside: cut before it, EOS in its place
    ]
    return torch.tensor(rows)


def test_left_pad_and_encode(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ids = [encode_prompt(tok, p) for p in PROMPTS[:2]]
    assert tok.decode(ids[0]) == "### Human: What is 2 + 3?\n### Assistant:"
    assert encode_prompt(tok, "### Human: hi\n### Assistant:") == tok("### Human: hi\n### Assistant:").input_ids
    assert encode_prompt(tok, PROMPTS[1], max_prompt_length=5) == ids[1][-5:]  # the left end goes
    batch, mask = left_pad(ids, tok.pad_token_id)
    short = min(len(i) for i in ids)
    assert batch.shape == (2, max(len(i) for i in ids))
    assert mask[:, -short:].all()  # every row ends with its last prompt token (the assistant cue)
    row = 0 if len(ids[0]) == short else 1
    assert (mask[row, : batch.shape[1] - short] == 0).all()
    assert (batch[row, : batch.shape[1] - short] == tok.pad_token_id).all()


def test_finish_responses_eos_stop_and_truncation(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    raw = fake_responses(tok)
    ids, mask, texts, ended = finish_responses(raw, tok, ["### Human:"])
    eos, pad = tok.eos_token_id, tok.pad_token_id
    n_stop = len(tok(" ok", add_special_tokens=False).input_ids)
    assert mask.sum(1).tolist() == [4, 8, 2, n_stop + 1]
    assert ended.tolist() == [True, False, True, True]
    assert ids[0, 3] == eos and ids[2, 1] == eos and ids[3, n_stop] == eos  # trlX: a cut reply ends in EOS
    assert (ids[mask == 0] == pad).all()  # nothing but padding after the end
    assert texts[3] == "ok" and texts[0] == "5 is"
    assert tok.decode(ids[3, :n_stop]).strip() == "ok"


def test_score_lands_on_last_real_token_never_padding(run_dir, monkeypatch):
    # kl_coef 0: the per-token rewards are exactly the score at the last real token and 0 elsewhere
    ppo = make_ppo(run_dir, "ppo.init_kl_coef=0", "ppo.target=null", "ppo.cliprange_reward=0.05")
    raw = fake_responses(ppo.tokenizer)
    monkeypatch.setattr(rollout_mod, "hf_generate", lambda *a, **k: Generated(raw.clone()))
    exp, stats = ppo.make_experience(PROMPTS)
    lengths = exp.mask.sum(1).long()
    assert lengths.tolist() == finish_responses(raw, ppo.tokenizer, ["### Human:"])[1].sum(1).tolist()
    # prompts left-padded, responses right-padded, in one tensor
    assert exp.attention_mask[:, exp.n_prompt - 1].all()
    assert (exp.attention_mask[:, exp.n_prompt:] == exp.mask).all()
    expected_scores = ppo.scorer.score(PROMPTS, finish_responses(raw, ppo.tokenizer, ["### Human:"])[2])
    assert torch.allclose(exp.scores, expected_scores, atol=1e-5)
    clipped = expected_scores.clamp(-0.05, 0.05)
    for i, n in enumerate(lengths.tolist()):
        assert exp.rewards[i, n - 1] == pytest.approx(float(clipped[i]), abs=1e-6)
        assert (exp.rewards[i, : n - 1] == 0).all() and (exp.rewards[i, n:] == 0).all()
        assert (exp.advantages[i, n:] == 0).all() and (exp.values[i, n:] == 0).all()
    # the logprobs of a padded row are those of the same row alone, without any padding
    policy = ppo.unwrapped
    for i in range(4):
        real = exp.attention_mask[i].bool()
        alone = exp.input_ids[i][real][None]
        n_prompt = int(exp.attention_mask[i, : exp.n_prompt].sum())
        with torch.no_grad():
            lp = policy(alone, torch.ones_like(alone), n_prompt).logprobs[0]
        assert torch.allclose(lp, exp.logprobs[i, : lengths[i]], atol=1e-5)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update


def test_logprobs_and_values_kept_from_generation_match_a_full_forward(run_dir):
    # make_experience reads the old logprobs, values and entropy off the generation steps (KV cache, no second
    # pass): they must be what a full forward over prompt + response gives, on every real token
    ppo = make_ppo(run_dir, "ppo.generation.max_new_tokens=8", "ppo.generation.stop_sequences=[e, a, '1']")
    exp, _ = ppo.make_experience(PROMPTS)
    assert exp.mask.sum(1).min() < exp.mask.shape[1]  # some replies were cut by a stop sequence
    with torch.no_grad():
        out = ppo.unwrapped(exp.input_ids, exp.attention_mask, exp.n_prompt, with_entropy=True)
    m = exp.mask.bool()
    assert torch.allclose(out.logprobs[m], exp.logprobs[m], atol=1e-4)
    assert torch.allclose(out.values[m], exp.values[m], atol=1e-4)
    assert torch.allclose(out.entropy[m], exp.entropy[m], atol=1e-4)


def test_reward_scorer_truncates_the_left_of_long_prompts(tiny_reward_dir):
    scorer = RewardScorer(tiny_reward_dir, max_length=24)
    long_prompt = [message("user", "What is 1 + 1? " * 30)]
    text = scorer.text(long_prompt, "2")
    ids = scorer.tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 24
    with torch.no_grad():
        expected = scorer.model(input_ids=torch.tensor([ids[-24:]])).logits[0, 0]
    assert scorer.score([long_prompt], ["2"])[0] == pytest.approx(float(expected), abs=1e-5)


def test_minibatch_of_4_equals_4_accumulated_micro_batches(run_dir, monkeypatch):
    raw = fake_responses(load_tokenizer(run_dir / "sft"))
    monkeypatch.setattr(rollout_mod, "hf_generate", lambda *a, **k: Generated(raw.clone()))
    whole = make_ppo(run_dir, "ppo.batch_size=4", "ppo.grad_accum=1")
    split = make_ppo(run_dir, "ppo.batch_size=1", "ppo.grad_accum=4")
    exp, _ = whole.make_experience(PROMPTS)
    # move the policy off the rollout point so that ratios, clipping and value clipping all take part
    with torch.no_grad():
        exp.logprobs += torch.linspace(-0.3, 0.3, exp.logprobs.numel()).view_as(exp.logprobs) * exp.mask
        exp.values += 0.5 * exp.mask
    idx = torch.tensor([2, 0, 3, 1])
    stats_whole = whole.minibatch_gradients(exp, idx)
    stats_split = split.minibatch_gradients(exp, idx)
    assert stats_whole["policy_loss"] == pytest.approx(stats_split["policy_loss"], abs=1e-5)
    assert stats_whole["value_loss"] == pytest.approx(stats_split["value_loss"], abs=1e-5)
    assert 0 < stats_whole["clipfrac"] < 1
    grads_split = dict(split.unwrapped.named_parameters())
    for name, p in whole.unwrapped.named_parameters():
        assert p.grad is not None, name
        assert torch.allclose(p.grad, grads_split[name].grad, atol=1e-5, rtol=1e-4), name
    # the backward's hooks recorded each gradient as the 4th micro-batch finished it: the clip's norm is torch's
    params = [p for p in split.unwrapped.parameters() if p.grad is not None]
    assert len(split.optimizer.norms.squares) == len(params)
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    assert split.optimizer.step() == pytest.approx(expected, rel=1e-5) and split.optimizer.norms.squares is None


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3], ids=["clipped", "not-clipped"])
def test_clip_folded_into_the_fused_step_equals_clip_then_step(run_dir, max_grad_norm):
    """StepOptimizer.step (the clip as the fused AdamW's gradient scale) == torch's clip_grad_norm_ then step()."""
    fast, plain = (make_ppo(run_dir, f"ppo.max_grad_norm={max_grad_norm}", "ppo.learning_rate=1e-2")
                   for _ in range(2))
    assert fast.optimizer.fused
    start = {n: p.detach().clone() for n, p in fast.unwrapped.named_parameters()}
    torch.manual_seed(0)
    for ppo in (fast, plain):
        for p in ppo.unwrapped.parameters():
            p.grad = None
    params = [p for p in fast.unwrapped.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]
    for ppo in (fast, plain):
        for p, g in zip((p for p in ppo.unwrapped.parameters() if p.requires_grad), grads):
            p.grad = g.clone()
    norm_fast = fast.optimizer.step()
    norm_plain = float(torch.nn.utils.clip_grad_norm_(plain.unwrapped.parameters(), max_grad_norm))
    plain.optimizer.torch_optimizer.step()
    assert norm_fast == pytest.approx(norm_plain, rel=1e-5) and norm_fast > 1
    assert not hasattr(fast.optimizer.torch_optimizer, "grad_scale"), "the scale is taken off after the step"
    other = dict(plain.unwrapped.named_parameters())
    for name, p in fast.unwrapped.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, other[name], atol=1e-6, rtol=1e-5), name
            assert not torch.equal(p, start[name]), name
    # Adam's first step hardly depends on the gradient's scale; its first moment shows the clip:
    # exp_avg = (1 - beta1) x the clipped gradient
    state = fast.optimizer.torch_optimizer.state[params[0]]
    expected = (1 - 0.9) * grads[0] * min(1.0, max_grad_norm / norm_plain)
    assert torch.allclose(state["exp_avg"], expected, rtol=1e-4, atol=1e-9)

@pytest.mark.parametrize("overrides", [(), ("ppo.share_trunk=false",), ("ppo.lora.enabled=true",),
                                       ("ppo.num_layers_unfrozen=1",)],
                         ids=["shared-trunk", "separate-critic", "lora", "top-layer-only"])
def test_every_trainable_parameter_changes(run_dir, tmp_path, overrides):
    ppo = make_ppo(run_dir, *overrides)
    before = {n: p.detach().clone() for n, p in ppo.unwrapped.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in ppo.unwrapped.named_parameters() if not p.requires_grad}
    exp, _ = ppo.make_experience(PROMPTS * 2)
    stats = ppo.update(exp)  # 8 samples / minibatch 4: two optimizer steps
    assert ppo.optimizer_steps == 2 and all(v == v for v in stats.values())
    after = dict(ppo.unwrapped.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n])]
    assert not unchanged, unchanged
    assert all(torch.equal(p, after[n]) for n, p in frozen.items())
    if "ppo.num_layers_unfrozen=1" in overrides:  # trlX's hydra: of 2 blocks only the top one trains
        assert sorted({n.split(".")[2] for n in frozen}) == ["embed_tokens", "layers"]
        assert all(n.startswith(("lm.model.embed_tokens.", "lm.model.layers.0.")) for n in frozen)
        assert {"lm.model.norm.weight", "lm.lm_head.weight", "value_head.0.weight", "value_head.2.weight"} <= set(before)
        assert ppo.reference.lm is None, "the reference shares the frozen bottom instead of a whole copy"
    if frozen:
        # the reference is the SFT model itself (LoRA disabled, or the frozen top swapped in), after training too
        from transformers import AutoModelForCausalLM

        sft = AutoModelForCausalLM.from_pretrained(run_dir / "sft")
        ids, attn = exp.input_ids, exp.attention_mask
        with torch.no_grad():
            assert torch.allclose(ppo.reference.logprobs(ids, attn, exp.n_prompt),
                                  response_logprobs(sft, ids, attn, exp.n_prompt), atol=1e-5)
            trained = ppo.unwrapped(ids, attn, exp.n_prompt).logprobs
            assert not torch.allclose(trained, response_logprobs(sft, ids, attn, exp.n_prompt), atol=1e-3)
    if "ppo.lora.enabled=true" in overrides:
        assert frozen and all("lora_" in n or "value_head" in n for n in before)
        # the saved folder is a plain causal LM with the adapters merged in
        ppo.unwrapped.save_pretrained(tmp_path / "out")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert not any("lora" in n for n, _ in merged.named_parameters())
        with torch.no_grad():
            assert torch.allclose(response_logprobs(merged, ids, attn, exp.n_prompt), trained, atol=1e-4)


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds the tensor's data, or None (anonymous memory)."""
    ptr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
@pytest.mark.parametrize("overrides", [(), ("ppo.lora.enabled=true",), ("ppo.num_layers_unfrozen=1",)],
                         ids=["full", "lora", "top-layer-only"])
def test_trainable_weights_are_copied_out_of_the_checkpoint_mapping(run_dir, overrides):
    """What the optimizer writes lives in the process's memory; what stays frozen is still read from the mapping."""
    ppo = make_ppo(run_dir, *overrides)
    trainable = [n for n, p in ppo.unwrapped.named_parameters() if p.requires_grad]
    assert trainable and not [n for n, p in ppo.unwrapped.named_parameters() if p.requires_grad and _mapped_file(p)]
    frozen = [p for p in ppo.unwrapped.parameters() if not p.requires_grad]
    if not overrides:  # everything trains; the reference is a frozen copy, loaded on its own
        frozen = list(ppo.reference.lm.parameters())
    assert frozen and all(str(_mapped_file(p)).endswith("model.safetensors") for p in frozen)


@pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK), reason="reads the process's page map (Linux)")
@pytest.mark.parametrize("overrides", [(), ("ppo.lora.enabled=true",)], ids=["reference-copy", "lora"])
def test_the_frozen_networks_weights_are_not_resident_in_generation_or_the_update(run_dir, overrides, monkeypatch):
    """On a CPU the reference copy's and the reward model's file-mapped weights leave the process's resident memory
    (runtime.frozen_pages): none is resident when generation starts or in any backward of the update. Under LoRA the
    reference is the policy, whose weights are not given up."""
    from rlhfchat.train import rollout as rollout_module
    from rlhfchat.train.cpu import _file_mappings, file_mapped_pages
    from tests._pagemap import resident_file_bytes

    ppo = make_ppo(run_dir, *overrides)
    maps = _file_mappings()
    spans = ppo.rt.frozen_pages.spans
    networks = [ppo.scorer.model] + ([] if overrides else [ppo.reference.lm])
    for network in networks:  # every page of theirs that can be released is one FrozenPages holds
        assert set(file_mapped_pages(list(network.parameters()), maps)) <= set(spans)
    policy_pages = file_mapped_pages([p for p in ppo.unwrapped.parameters() if not p.requires_grad], maps)
    assert bool(policy_pages) == bool(overrides) and not set(policy_pages) & set(spans)
    seen = []
    generate, backward = rollout_module.generate_rollout, ppo.rt.backward
    monkeypatch.setattr("rlhfchat.train.ppo.generate_rollout",
                        lambda *a, **k: (seen.append(("gen", resident_file_bytes(spans)[0])), generate(*a, **k))[1])
    monkeypatch.setattr(ppo.rt, "backward",
                        lambda loss: (seen.append(("backward", resident_file_bytes(spans)[0])), backward(loss))[1])
    for _ in range(2):  # the second rollout reads the pages the first released
        exp, _ = ppo.make_experience(PROMPTS * 2)
        ppo.update(exp)
    assert [kind for kind, _ in seen].count("backward") == 4 and all(size == 0 for _, size in seen), seen


def test_generation_runs_on_merged_copies_of_the_adapted_weights_and_puts_the_base_back(tiny_model_dir):
    """lora.adapters_merged: the same logits without the adapters' own products, and afterwards the frozen base
    (the PPO reference) bit for bit as it was, also after an exception."""
    from rlhfchat.config import LoraConfig
    from rlhfchat.lora import adapters_merged
    from rlhfchat.train.policy import build_policy

    lm = build_policy(tiny_model_dir, lora=LoraConfig(enabled=True)).lm
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:  # a trained adapter (B starts at zero)
                p.normal_(0, 0.05)
    base = {name: (p, p.detach().clone()) for name, p in lm.named_parameters() if "base_layer" in name}
    adapter_calls = []
    first_a = next(m for name, m in lm.named_modules() if name.endswith("lora_A.default"))
    first_a.register_forward_hook(lambda *args: adapter_calls.append(1))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        assert adapter_calls
        adapter_calls.clear()
        with adapters_merged(lm) as merged_lm:
            assert merged_lm is lm
            assert torch.allclose(lm(input_ids=ids).logits, expected, atol=1e-5) and not adapter_calls
            assert any(not torch.equal(p, saved) for p, saved in base.values())  # the merged copies are in use
        assert all(torch.equal(p, saved) for p, saved in base.values())
        assert torch.equal(lm(input_ids=ids).logits, expected) and adapter_calls
        with pytest.raises(ValueError), adapters_merged(lm):
            raise ValueError
        assert all(torch.equal(p, saved) for p, saved in base.values())
        assert not any(getattr(m, "merged_adapters", None) for m in lm.modules())


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2"])
def test_frozen_bottom_keeps_the_reference_exact(tiny_model_dir, tmp_path, arch, monkeypatch):
    """Tied input and output embeddings (and GPT-2's learned positions): the output layer and the position embeddings
    freeze with the embeddings (the shared bottom must stay the SFT model's), the branch holds only the top block and
    the final norm, and the policy gets its own modules back."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    from rlhfchat.train import trunk as trunk_mod
    from rlhfchat.train.policy import Reference, build_policy
    from rlhfchat.train.trunk import causal_parts
    from rlhfchat.train.trunk import MIN_SHARED_PREFIX, decoder_blocks, shared_prefix_length

    if arch == "gpt2":
        config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        frozen_prefixes, parts = ("lm.transformer.wte.", "lm.transformer.wpe.", "lm.transformer.h.0."), ["1", "ln_f"]
    else:
        config = AutoConfig.from_pretrained(tiny_model_dir)
        config.tie_word_embeddings = True
        frozen_prefixes, parts = ("lm.model.embed_tokens.", "lm.model.layers.0."), ["1", "norm"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    with pytest.raises(RlhfchatError, match=r"ppo.num_layers_unfrozen: expected -1 \(all\) or 0..2"):
        build_policy(tmp_path / arch, num_layers_unfrozen=3)
    policy = build_policy(tmp_path / arch, num_layers_unfrozen=1)
    trunk, head = causal_parts(policy.lm)
    assert head.weight is policy.lm.get_input_embeddings().weight and not head.weight.requires_grad
    frozen = [n for n, p in policy.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(frozen_prefixes) for n in frozen)
    assert {prefix for prefix in frozen_prefixes if any(n.startswith(prefix) for n in frozen)} == set(frozen_prefixes)
    reference = Reference(policy, tmp_path / arch)
    assert [name for _, name, _ in reference.branch.parts] == parts
    own = [module for _, _, module in ((o, n, getattr(o, n)) for o, n, _ in reference.branch.parts)]
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    # rows with 9 shared leading tokens: the reference's packed forward runs under the swap too (the swapped-in copies
    # have configs of their own, which must switch to the packed attention as well)
    shared = list(range(40, 49))
    ids = torch.tensor([[3, 3] + shared + [60, 61, 62, 63, 64], [3] + shared + [70, 71, 72, 73, 74, 75],
                        shared + [80, 81, 82, 83, 84, 85, 86]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, 0] = 0
    assert shared_prefix_length(ids, mask, 11) >= MIN_SHARED_PREFIX
    packed = []
    monkeypatch.setattr(trunk_mod, "packed_hidden", lambda *a, f=trunk_mod.packed_hidden: packed.append(1) or f(*a))
    sft = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
    with torch.no_grad():
        expected = response_logprobs(sft, ids, mask, 12, share_prefix=False)
        assert torch.allclose(reference.logprobs(ids, mask, 12), expected, atol=1e-6) and packed
        assert not torch.allclose(response_logprobs(policy.lm, ids, mask, 12), expected, atol=1e-3)
    assert [getattr(o, n) for o, n, _ in reference.branch.parts] == own
    assert decoder_blocks(trunk)[1] is own[0]


def test_frozen_bottom_stays_out_of_the_backward_under_gradient_checkpointing(tiny_model_dir):
    """transformers makes the embeddings' output require grad for checkpointing; with a frozen bottom the lower
    blocks must still stay out of the autograd graph, and the gradients must be those without checkpointing."""
    from rlhfchat.train.policy import build_policy
    from rlhfchat.train.trunk import causal_parts
    from rlhfchat.train.trunk import decoder_blocks

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])
    mask = torch.ones_like(ids)
    grads = {}
    for checkpointing in (False, True):
        policy = build_policy(tiny_model_dir, num_layers_unfrozen=1, gradient_checkpointing=checkpointing)
        policy.train()
        seen = []
        for block in decoder_blocks(causal_parts(policy.lm)[0]):
            block.register_forward_hook(
                lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
        out = policy(ids, mask, 4)
        (out.logprobs.sum() + out.values.sum()).backward()
        assert seen == [False, True], (checkpointing, seen)
        grads[checkpointing] = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        assert g is not None and torch.allclose(grads[True][name], g, atol=1e-6), name


def test_vllm_backend_is_a_clear_error():
    with pytest.raises(RlhfchatError, match="vllm"):
        check_backend("vllm")


def test_sigkill_mid_run_resumes_to_the_same_step_count(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        f"output_dir: {run_dir}\n"
        "ppo:\n  num_rollouts: 8\n  chunk_size: 8\n  batch_size: 8\n  ppo_epochs: 1\n  total_steps: 10\n"
        "  generation: {max_new_tokens: 6}\n  eval_prompts: 2\n  save_steps: 1\n  learning_rate: 0.001\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfchat.cli", "ppo", str(recipe_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = run_dir / "ppo" / "checkpoints"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("step-*/state.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    step = json.loads(next(ckpts.glob("step-*/state.json")).read_text())["step"]
    assert 1 <= step < 10

    from rlhfchat.train.ppo import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process: the same float sums, so the runs can match exactly
    try:
        metrics = main(load_recipe(recipe_path))
        # the same recipe without the kill ends with the same weights
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        for name in ("sft", "reward", "data"):
            os.symlink((run_dir / name).resolve(), fresh / name)
        main(load_recipe(recipe_path, [f"output_dir={fresh}"]))
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file

    resumed = load_file(run_dir / "ppo" / "model.safetensors")
    uninterrupted = load_file(fresh / "ppo" / "model.safetensors")
    assert all(torch.allclose(resumed[k], uninterrupted[k], atol=1e-6) for k in resumed)
    assert metrics["steps"] == 10 and metrics["resumed_from_step"] >= step
    assert metrics["optimizer_steps"] == 10
    lines = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 11))
    for key in ("score", "kl", "policy_loss", "value_loss", "clipfrac", "response_len", "entropy"):
        assert key in lines[-1]
    saved = json.loads((run_dir / "ppo" / "metrics.json").read_text())
    for key in ("eval_reward_before", "eval_reward_after", "eval_reward_std_before", "kl", "steps", "wall_time_s"):
        assert key in saved
    assert [p.name for p in ckpts.iterdir()] == ["step-000010"]
    assert (run_dir / "ppo" / "value_head.safetensors").is_file()
    assert load_tokenizer(run_dir / "ppo").chat_template
    AutoModelForCausalLM.from_pretrained(run_dir / "ppo")


def test_bench_ppo_prints_one_json_line(tiny_model_dir, tiny_reward_dir, tmp_path, capsys):
    from rlhfchat.cli import main as cli_main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "### Human: What is 2 + 2?\n### Assistant:"}) + "\n"
                       + json.dumps({"prompt": PROMPTS[1]}) + "\n")
    threads = torch.get_num_threads()
    try:
        assert cli_main(["bench", "ppo", "--policy", str(tiny_model_dir), "--reward", str(tiny_reward_dir),
                         "--prompts", str(prompts), "--batch", "4", "--new-tokens", "5", "--rollouts", "2",
                         "--ppo-epochs", "1", "--minibatch", "2", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["samples"] == 8 and result["optimizer_steps"] == 4
    assert result["advantage_estimator"] == "gae" and result["value_head"] is True and result["kl_penalty"] == "reward"
    assert result["tokens_per_s"] == pytest.approx(result["samples_per_s"] * 5, rel=0.01)  # exactly 5 tokens each
    for key in ("samples_per_s", "tokens_per_s", "gen_s", "train_s", "peak_rss_mb", "score_s", "forward_s",
                "update_s"):
        assert result[key] > 0
    # the phases split the run: together at most its wall time, and most of it (advantages are the rest)
    phases = result["gen_s"] + result["score_s"] + result["forward_s"] + result["update_s"]
    assert 0.5 * result["total_s"] <= phases <= result["total_s"] + 0.005


def test_bench_ppo_runs_grpo_groups_without_a_value_head(tiny_model_dir, tiny_reward_dir, tmp_path, capsys):
    from rlhfchat.cli import main as cli_main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    threads = torch.get_num_threads()
    try:
        assert cli_main(["bench", "ppo", "--policy", str(tiny_model_dir), "--reward", str(tiny_reward_dir),
                         "--prompts", str(prompts), "--batch", "2", "--samples-per-prompt", "3",
                         "--advantage-estimator", "grpo", "--new-tokens", "4", "--rollouts", "2",
                         "--ppo-epochs", "2", "--minibatch", "3", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    # 2 rollouts of 2 prompts x 3 replies; 2 epochs of minibatches of 3 over 6 samples
    assert result["samples"] == 12 and result["prompts"] == 4 and result["optimizer_steps"] == 8
    assert result["tokens_per_s"] == pytest.approx(result["samples_per_s"] * 4, rel=0.01)
    assert result["advantage_estimator"] == "grpo" and result["samples_per_prompt"] == 3
    assert result["kl_penalty"] == "loss" and result["value_head"] is False


def test_the_benchmark_fixtures_build_from_the_sample_data_and_run(tmp_path, capsys):
    """scripts/bench_models.py (the fixtures docs/benchmarks.md's GRPO table uses): a policy, a one-label reward
    model on its tokenizer and system + user prompts, which `bench ppo` then runs on."""
    from transformers import AutoConfig

    from rlhfchat.cli import main as cli_main

    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_models.py"), str(tmp_path / "b")],
                         capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    paths = json.loads(out.stdout.splitlines()[-1])
    assert AutoConfig.from_pretrained(paths["reward"]).num_labels == 1
    rows = [json.loads(line) for line in Path(paths["prompts"]).read_text().splitlines()]
    assert len(rows) == 64 and all([m["role"] for m in r["prompt"]] == ["system", "user"] for r in rows)
    threads = torch.get_num_threads()
    try:
        assert cli_main(["bench", "ppo", "--policy", paths["policy"], "--reward", paths["reward"], "--prompts",
                         paths["prompts"], "--batch", "2", "--samples-per-prompt", "2", "--advantage-estimator",
                         "grpo", "--new-tokens", "4", "--rollouts", "1", "--ppo-epochs", "1", "--minibatch", "2",
                         "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    assert result["samples"] == 4 and result["optimizer_steps"] == 2 and result["policy_params_m"] > 10


def test_bench_ppo_names_the_bad_input(tiny_reward_dir, tmp_path, capsys):
    from rlhfchat.cli import main as cli_main

    good = tmp_path / "prompts.jsonl"
    good.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "Hi"}) + "\n{oops\n")
    empty_dir = tmp_path / "not_a_model"
    empty_dir.mkdir()
    cases = [(str(tiny_reward_dir), str(tmp_path / "missing.jsonl"), "missing.jsonl: cannot read the prompts"),
             (str(tiny_reward_dir), str(broken), "broken.jsonl line 2: not JSON"),
             (str(empty_dir), str(good), "not_a_model: cannot load a tokenizer")]
    for policy, prompts, message in cases:
        assert cli_main(["bench", "ppo", "--policy", policy, "--reward", str(tiny_reward_dir),
                         "--prompts", prompts]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_the_update_picks_the_math_attention_kernel_only_for_bf16_on_a_cpu():
    from rlhfchat.train.cpu import training_attention

    with training_attention(torch.device("cpu"), "bf16"):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    for device, precision in (("cpu", "no"), ("cuda", "bf16")):
        with training_attention(torch.device(device), precision):
            assert torch.backends.cuda.flash_sdp_enabled()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_a_run_without_deepspeed_does_not_import_it(tiny_model_dir, tiny_reward_dir):
    """Where deepspeed is installed but not selected, a PPO run on one process never imports it (accelerate's
    unwrap_model would: about 20 MB of a CPU run's memory)."""
    script = (
        "import sys\n"
        "from rlhfchat.config import PPOConfig\n"
        "from rlhfchat.train.ppo import PPO\n"
        "from rlhfchat.train.runtime import Runtime\n"
        "ppo = PPO.from_folders(sys.argv[1], sys.argv[2], PPOConfig(num_rollouts=4, chunk_size=4), Runtime.start())\n"
        "ppo.update(ppo.make_experience(['Hello there'] * 4, seeds=[0, 1, 2, 3])[0])\n"
        "print('deepspeed' in sys.modules, ppo.unwrapped is ppo.policy)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(tiny_reward_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["False", "True"]
