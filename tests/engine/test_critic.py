"""The critic: values from the backbone's hidden states, never from vocabulary-sized tensors."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusedrl.engine.critic import ValueModel

VOCAB = 97  # distinct from every other dimension, so a vocabulary-sized output is recognisable


def _policy():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _batch():
    ids = torch.randint(0, VOCAB, (3, 9))
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # a left-padded prompt
    return ids, attn


def test_values_read_the_state_before_each_response_token():
    policy = _policy()
    critic = ValueModel.from_policy(policy)
    torch.nn.init.normal_(critic.head.weight)
    ids, attn = _batch()
    values = critic(ids, attn, prompt_length=5, completion_length=4)
    # Row 0 is left-padded by two: its positions start at 0 on its first real token.
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    hidden = critic.backbone(input_ids=ids, attention_mask=attn, position_ids=positions).last_hidden_state
    expected = hidden[:, 4:8] @ critic.head.weight[0] + critic.head.bias
    assert values.shape == (3, 4) and values.dtype == torch.float32
    torch.testing.assert_close(values, expected)


def test_critic_is_an_own_copy_and_builds_no_vocabulary_sized_tensor():
    policy = _policy()
    critic = ValueModel.from_policy(policy)
    assert not any(p is q for p in critic.parameters() for q in policy.parameters())
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(getattr(o, "shape", None)))
             for m in critic.modules()]
    ids, attn = _batch()
    values = critic(ids, attn, prompt_length=5, completion_length=4)
    for h in hooks:
        h.remove()
    assert all(s is None or s[-1] != VOCAB for s in shapes)
    values.sum().backward()
    assert critic.head.weight.grad is not None
    assert all(p.grad is None for p in policy.parameters())
    # The zero-initialised head starts every value at 0.
    assert torch.equal(values, torch.zeros_like(values))


def test_save_and_load_round_trip(tmp_path):
    critic = ValueModel.from_policy(_policy())
    torch.nn.init.normal_(critic.head.weight)
    critic.save_pretrained(tmp_path)
    loaded = ValueModel.from_pretrained(tmp_path).eval()
    ids, attn = _batch()
    torch.testing.assert_close(loaded(ids, attn, 6, 3), critic(ids, attn, 6, 3))


def test_bad_inputs():
    critic = ValueModel.from_policy(_policy())
    ids, attn = _batch()
    with pytest.raises(ValueError, match="do not fit"):
        critic(ids, attn, prompt_length=5, completion_length=6)
    with pytest.raises(ValueError, match="not a directory"):
        ValueModel.from_pretrained("/nonexistent/critic")


def test_a_16_bit_critic_keeps_an_fp32_head():
    """The backbone in the model's dtype, the head in fp32: its values are fp32 and a step at a critic's
    learning rate moves them (a bf16 bias of 0.5 cannot move by 1e-5)."""
    from types import SimpleNamespace

    from fusedrl.engine.config import load_config
    from fusedrl.engine.ppo import make_critic

    policy = _policy().to(torch.bfloat16)
    session = SimpleNamespace(cfg=load_config(None, ["run.algorithm=ppo", "model.dtype=bfloat16"]), resume_from=None,
                              model=policy, device=torch.device("cpu"), packed=False)
    critic = make_critic(session)
    assert critic.head.weight.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in critic.backbone.parameters())
    torch.nn.init.constant_(critic.head.bias, 0.5)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-5)
    ids, attn = _batch()
    values = critic(ids, attn, prompt_length=5, completion_length=4)
    assert values.dtype == torch.float32
    ((values - 1.0) ** 2).mean().backward()
    optimizer.step()
    assert critic.head.bias.item() == pytest.approx(0.5 + 1e-5, rel=1e-6)
