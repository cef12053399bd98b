"""vLLM rollouts under torchrun with FSDP2 (real vLLM CPU build, two gloo ranks; run by scripts/test_vllm.sh).

Two spawned processes join a gloo group the way torchrun's do (RANK, LOCAL_RANK, WORLD_SIZE in the
environment), and each starts its own in-process vLLM engine inside that group. In one spawn, to start
vLLM's imports once per rank, each rank:
- syncs vLLM from an FSDP2-sharded 4-layer policy, counting the bytes of gathered tensors still alive
  at each step of the sync, then samples its share of the prompts greedily next to transformers'
  greedy generate on an unsharded copy of the same weights;
- trains GRPO for 2 steps with rollout.engine=vllm, which this process also trains on one process.
"""

import copy
import json
import math
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

pytest.importorskip("vllm")

from _live_bytes import LiveBytes  # noqa: E402
from _tiny_run import REWARD_MODULE  # noqa: E402

from fusedrl.engine import distributed  # noqa: E402
from fusedrl.engine.config import load_config  # noqa: E402
from fusedrl.engine.model import load_policy  # noqa: E402
from fusedrl.engine.samplers import HFSampler, make_sampler  # noqa: E402
from fusedrl.engine.train import train  # noqa: E402

# vLLM's CPU attention takes head sizes of 32 and up: 64 wide, 2 heads.
VLLM = ["rollout.engine=vllm", "model.demo.hidden_size=64", "model.demo.num_heads=2",
        "model.demo.intermediate_size=128", "data.max_prompt_length=16", "rollout.max_new_tokens=24",
        "rollout.vllm.kv_cache_gib=0.05"]
# Three prompts per step on two ranks: shares of two prompts and one, responses of uneven lengths.
GRPO = [*VLLM, "run.steps=2", "run.progress=false", "run.tensorboard=false", "run.plots=false",
        "run.num_threads=1", "run.device=cpu", "warm_start.steps=0", "data.train_size=32", "data.eval_size=3",
        "model.demo.num_layers=2", "rollout.prompts_per_step=3", "rollout.group_size=4", "optim.lr=1e-3",
        "optim.micro_batch_tokens=120", "loss.top_entropy_fraction=0.5", "reward.function=toy_reward:parity"]
SYNC = [*VLLM, "model.demo.num_layers=4"]
PROMPTS = ["1+2=", "345+6=", "78+901=", "5+5=", "12+34="]
UNCOMPARED = ("time/", "tokens_per_second", "memory/")


def _sync_and_sample() -> dict:
    """An FSDP2 policy synced into vLLM: the peak of gathered bytes alive, and greedy responses of this
    rank's prompts from vLLM and from transformers on the same (unsharded) weights."""
    cfg = load_config(None, SYNC)
    torch.manual_seed(0)
    model, tokenizer = load_policy(cfg.model, "builtin:demo", torch.device("cpu"))
    with torch.no_grad():
        # Peaked distributions: a freshly initialised model's near-uniform logits leave greedy decoding
        # to ties that float rounding decides.
        for p in model.parameters():
            p.mul_(8.0)
    unsharded = copy.deepcopy(model)
    world = distributed.init(torch.device("cpu"))
    sampler = make_sampler(cfg, model, tokenizer)  # dummy weights: only the sync makes them the model's
    distributed.shard(model, world, torch.float32)
    live = LiveBytes()
    rpc = sampler.llm.collective_rpc
    sampler.llm.collective_rpc = lambda method, kwargs: rpc(
        method, kwargs={"weights_iterator": live.track(kwargs["weights_iterator"])})
    try:
        sampler.sync_weights(model)
        prompts = tokenizer([PROMPTS[i] for i in world.share(len(PROMPTS))])["input_ids"]
        vllm = sampler.generate(prompts, 2, temperature=0, max_new_tokens=24)
    finally:
        sampler.close()
    ranks = torch.ones(1)
    dist.all_reduce(ranks)  # the trainer's process group outlives vLLM's shutdown
    hf = HFSampler(unsharded, tokenizer, top_p=1.0, batch_size=64).generate(prompts, 2, temperature=0,
                                                                           max_new_tokens=24)
    layers = distributed.decoder_layers(unsharded)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    fields = ("input_ids", "completion_ids", "completion_mask", "truncated")
    return {"ranks_after_close": int(ranks), "peak": live.peak, "yielded": live.count,
            "names": len(unsharded.state_dict()), "layers": len(layers),
            "layer_bytes": max(sum(p.nbytes for p in layer.parameters()) for layer in layers),
            "root_bytes": sum(p.nbytes for p in unsharded.parameters() if id(p) not in in_layers),
            "largest_bytes": max(p.nbytes for p in unsharded.parameters()),
            "model_bytes": sum(p.nbytes for p in unsharded.parameters()),
            "vllm": {k: getattr(vllm, k) for k in fields}, "hf": {k: getattr(hf, k) for k in fields}}


def _train(output_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """A GRPO run with vLLM rollouts: its metric rows and its final policy's weights."""
    cfg = load_config("configs/demo.yaml", [*GRPO, f"run.output_dir={output_dir}"])
    train(cfg)
    path = output_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return rows, load_file(output_dir / f"checkpoint-{cfg.run.steps}" / "model.safetensors")


def _rank(rank: int, size: int, port: int, reward_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(size))
    sys.path.insert(0, reward_dir)
    dist.init_process_group("gloo")
    try:
        out = Path(out_dir)
        result = {"sync": _sync_and_sample(), "grpo": _train(out / "grpo")}
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs():
    """The two ranks' results, and the one-process GRPO run (metric rows, weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "toy_reward.py").write_text(REWARD_MODULE)
        (tmp / "ranks").mkdir()
        mp.spawn(_rank, args=(2, _free_port(), str(tmp), str(tmp / "ranks")), nprocs=2, join=True)
        ranks = [torch.load(tmp / "ranks" / f"rank{r}.pt") for r in range(2)]
        sys.path.insert(0, str(tmp))
        try:
            single = _train(tmp / "single")
        finally:
            sys.path.remove(str(tmp))
    return ranks, single


def test_sync_from_fsdp2_gathers_one_layer_at_a_time(runs):
    """Every parameter reaches vLLM under each of its names (the tied embedding twice), and the gathered
    tensors alive at once never exceed one decoder layer plus the root unit's parameters (embedding, final
    norm): vLLM keeps a layer's tensors until that layer is complete, and the vocabulary-padded embedding
    to the end of the reload; the whole model, four layers, is never held."""
    for rank in runs[0]:
        sync = rank["sync"]
        assert sync["ranks_after_close"] == 2
        assert sync["yielded"] == sync["names"] and sync["layers"] == 4
        assert sync["largest_bytes"] <= sync["peak"] <= sync["layer_bytes"] + sync["root_bytes"], sync
        assert sync["layer_bytes"] + sync["root_bytes"] < sync["model_bytes"] / 2


def test_greedy_vllm_after_an_fsdp2_sync_equals_greedy_hf(runs):
    """Each rank's share of the prompts, ending and cut responses alike: vLLM started from dummy weights,
    so equal responses mean the sharded policy's weights arrived whole."""
    truncated = []
    for rank in runs[0]:
        vllm, hf = rank["sync"]["vllm"], rank["sync"]["hf"]
        for key, value in hf.items():
            assert torch.equal(vllm[key], value), key
        truncated += hf["truncated"].tolist()
    assert any(truncated) and not all(truncated)


def test_two_ranks_with_vllm_equal_one_process(runs):
    """Per-prompt seeds make the samples independent of which rank draws them: two steps on two ranks
    equal one process, metrics (finite, the weight sync timed) and final weights."""
    (rows_2, weights_2), (rows, weights) = runs[0][0]["grpo"], runs[1]
    trained = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in trained] == [1, 2] and [r["step"] for r in rows] == [r["step"] for r in rows_2]
    for row, row_2 in zip(rows, rows_2):
        keys = {k for k in row if not k.startswith(UNCOMPARED)}
        assert keys == {k for k in row_2 if not k.startswith(UNCOMPARED)}
        for key in keys:
            assert row_2[key] == pytest.approx(row[key], rel=1e-5, abs=1e-6, nan_ok=True), (row["step"], key)
    for r in [*trained, *(r for r in rows_2 if "loss/policy" in r)]:
        assert all(math.isfinite(r[k]) for k in ("loss/policy", "reward/mean", "mismatch/abs_lp_diff",
                                                 "mismatch/kl"))
        assert r["time/weight_sync_s"] > 0 and r["grad_norm"] > 0
        assert r["mismatch/abs_lp_diff"] < 1e-4 and r["mismatch/ratio_outside"] == 0
    # Adam divides each step by the gradient's own scale: where a gradient is near zero, the two layouts'
    # differently ordered sums (float rounding) moved a weight by up to 5e-6 (measured, with or without the
    # tis correction), where a different sample would move many by about the learning rate, 1e-3.
    assert weights.keys() == weights_2.keys()
    for name, value in weights.items():
        torch.testing.assert_close(weights_2[name], value, rtol=1e-5, atol=1e-5, msg=name)
