"""distributed.full_parameters, the weight sync's source under FSDP2, on two gloo ranks against the unsharded
model (no vLLM needed; tests/engine/test_vllm_distributed.py runs it into real vLLM engines)."""

import pytest
import torch
import torch.distributed as dist
from _live_bytes import LiveBytes
from spawn_helpers import run_ranks
from transformers import LlamaConfig, LlamaForCausalLM

from fusedrl.engine import distributed


def _model(tied: bool) -> LlamaForCausalLM:
    # A vocabulary of 37 rows splits unevenly over two ranks (19 and 18).
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))


def _gather(tied: bool, dtype: torch.dtype, *, process_group):
    """Gathers a sharded model's parameters one at a time, each dropped before the next."""
    from torch.distributed.device_mesh import init_device_mesh

    model = _model(tied)
    world = distributed.World(rank=dist.get_rank(), size=dist.get_world_size(), group=process_group,
                              mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    distributed.shard(model, world, dtype)
    live, gathered = LiveBytes(), []
    for name, tensor in live.track(distributed.full_parameters(model, dtype, torch.device("cpu"))):
        gathered.append((name, tensor.clone()))  # a copy, as a consumer copies into its own weights
        del tensor  # dropped before the next is asked for: what stays alive is the generator's doing
    return gathered, live.peak


CASES = [(tied, dtype) for tied in (True, False) for dtype in (torch.float32, torch.bfloat16)]


@pytest.fixture(scope="module")
def ranks():
    """{case: each rank's (gathered, peak)}, all cases in one spawn of two ranks."""
    results = run_ranks(2, [(_gather, [case] * 2, {}) for case in CASES])
    return dict(zip(CASES, results))


@pytest.mark.parametrize("case", CASES, ids=["tied-fp32", "tied-bf16", "untied-fp32", "untied-bf16"])
def test_sharded_parameters_gathered_one_at_a_time_equal_the_model(ranks, case):
    """Each rank gets every parameter whole, in module order, a tied embedding under both names, each equal to the
    unsharded model's cast to the dtype (a bf16 cast commutes with the gather); never more than one of
    them is alive at once (the generator keeps none after handing it out)."""
    tied, dtype = case
    model = _model(tied)
    expected = [(name, p.detach().to(dtype)) for name, p in model.state_dict().items()]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    largest = max(p.nbytes for _, p in expected)
    for gathered, peak in ranks[case]:
        assert [n for n, _ in gathered] == [n for n, _ in expected]
        for (name, tensor), (_, value) in zip(gathered, expected):
            assert tensor.dtype == dtype and torch.equal(tensor, value), name
        assert peak == largest
