"""FusedGRPOTrainer against stock trl.GRPOTrainer on two data-parallel processes (gloo, CPU).

Each spawned rank sets the environment accelerate reads (RANK, WORLD_SIZE, LOCAL_RANK), so that both
trainers' `Accelerator` sees a 2-process MULTI_CPU run on the gloo group the spawner started, and gets
its half of one fixed prepared batch (the helpers and batch of test_trl.py). What is batch-wide in
TRL 1.16 then spans the processes: dapo's `num_items_in_batch` (the generation batch's valid tokens on
all processes, divided by their number), the top-entropy threshold (TRL gathers the valid entropies of
the current micro-batch from every process and takes one `torch.quantile` of them: global across
processes, per micro-batch), and the logged metrics (sums reduced, clip extremes gathered and
nanmin / nanmax'ed). On every rank the fused loss, every parameter gradient and every logged metric
must equal stock TRL's; and, independently of TRL's multi-process code, the ranks' mean gradient
(what DDP's all-reduce applies) must equal the gradient of one process on the whole batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from _tiny import tiny_model, tiny_tokenizer
from spawn_helpers import run_ranks
from test_trl import (  # noqa: F401  (model_dir: the fixture)
    SEQUENCE_NOISE,
    _assert_same,
    _assert_same_histories,
    _batch,
    _load,
    _loss_and_grads,
    _train_histories,
    _trainer,
    model_dir,
)
from trl import GRPOTrainer

from fusedrl.loss import FusedPolicyLoss
from fusedrl.integrations.trl import FusedGRPOTrainer

WORLD_SIZE = 2
HALVES = (slice(0, 2), slice(2, 4))  # rank r's rows of test_trl's 4-row batch

TRAIN_CASE = dict(loss_type="dapo", top_entropy_quantile=0.2)
# name: (GRPOConfig overrides, test_trl._batch options)
CASES = {
    "dapo": (dict(loss_type="dapo"), {}),
    # 12 valid tokens on rank 0, 3 on rank 1: a threshold per process would keep 3 + 1 tokens, the
    # global one keeps 3 in all.
    "dapo-top20": (dict(loss_type="dapo", top_entropy_quantile=0.2), dict(lengths=(6, 6, 2, 1))),
    "grpo-beta": (dict(loss_type="grpo", beta=0.05), {}),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence"), dict(noise=SEQUENCE_NOISE)),
    # Rank 1 holds only completions without a valid token: no entropies to add to the quantile, and only
    # NaN clip extremes, which TRL's nanmin / nanmax over the processes skip.
    "grpo-top20-empty-rank": (
        dict(loss_type="grpo", top_entropy_quantile=0.2),
        dict(lengths=(6, 3, 0, 0), noise=1.5, advantages=(-1.2, -0.7, 0.4, -0.9)),
    ),
}


def _rows(inputs: dict, rows: slice) -> dict:
    """One rank's share of the prepared batch; `num_items_in_batch` is global, the same on every rank."""
    return {key: value if key == "num_items_in_batch" else value[rows] for key, value in inputs.items()}


def _join_accelerate(process_group) -> int:
    """Point accelerate at the spawned gloo group (it reuses an initialised one); this rank's index."""
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    return rank


def _rank_results(overrides, model_dir, out_dir, inputs, *, process_group):
    """Stock and fused (loss, gradients, logged metrics) on this rank's rows; with dapo's top-entropy
    quantile also the fused gradients with the threshold taken on this process alone."""
    rank = _join_accelerate(process_group)
    stock, fused = (
        _trainer(cls, _load(model_dir), f"{out_dir}/{cls.__name__}-{rank}",
                 per_device_train_batch_size=len(inputs["advantages"]), **overrides)
        for cls in (GRPOTrainer, FusedGRPOTrainer)
    )
    assert stock.accelerator.num_processes == fused.accelerator.num_processes == WORLD_SIZE
    results = {"stock": _loss_and_grads(stock, inputs), "fused": _loss_and_grads(fused, inputs)}
    if overrides.get("loss_type") == "dapo" and "top_entropy_quantile" in overrides:
        fused.fused_loss.process_group = None
        results["per_process_threshold"] = _loss_and_grads(fused, inputs)[1]
    return results


def _rank_train(overrides, model_dir, out_dir, *, process_group):
    """Stock and fused logged histories of two `train()` steps: DDP-wrapped models, TRL's own
    generation, rewards and `num_items_in_batch` gathered over the processes."""
    rank = _join_accelerate(process_group)
    return _train_histories(model_dir, f"{out_dir}/train-{rank}", overrides)


def _direct_dapo_grads(model, inputs: dict, top_entropy_fraction: float) -> dict:
    """Single-process dapo on the whole micro-batch straight from FusedPolicyLoss (no TRL code), the
    token sum divided by the generation batch's valid-token count."""
    loss_fn = FusedPolicyLoss(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, temperature=0.7,
                              top_entropy_fraction=top_entropy_fraction)
    ids, mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], mask], dim=1)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    model.zero_grad()
    loss, _ = loss_fn(ids, mask, inputs["advantages"], hidden=hidden[:, -ids.shape[1] - 1 : -1],
                      weight=model.lm_head.weight, old_logprobs=inputs["old_per_token_logps"],
                      num_items_in_batch=inputs["num_items_in_batch"])
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.distributed
def test_two_processes_match_stock_trl_and_one_process(tmp_path, model_dir):
    """One spawn of two gloo ranks runs every case (hand-built halves of a batch to compute_loss) and
    two train() steps; the parent compares them with stock TRL and with one process."""
    inputs, singles, jobs = {}, {}, []
    for case, (overrides, batch_options) in CASES.items():
        single = _trainer(GRPOTrainer, _load(model_dir), tmp_path / case, **overrides)
        inputs[case] = _batch(single, len(tiny_tokenizer()), "beta" in overrides, **batch_options)
        singles[case] = _loss_and_grads(single, inputs[case])
        halves = [(overrides, str(model_dir), str(tmp_path), _rows(inputs[case], rows)) for rows in HALVES]
        jobs.append((_rank_results, halves, {}))
    # An untied output embedding: the fused loss uses it outside the DDP-wrapped forward.
    untied = tmp_path / "untied"
    tiny_model(len(tiny_tokenizer()), seed=3, tie_word_embeddings=False).save_pretrained(untied)
    jobs.append((_rank_train, [(TRAIN_CASE, str(untied), str(tmp_path))] * WORLD_SIZE, {}))
    *per_case, histories = run_ranks(WORLD_SIZE, jobs)
    results = dict(zip(CASES, per_case, strict=True))

    for case, per_rank in results.items():
        for rank, result in enumerate(per_rank):
            try:
                _assert_same(*result["stock"], *result["fused"])
            except AssertionError as err:
                raise AssertionError(f"{case}, rank {rank}: fused differs from stock TRL: {err}") from err
        # Data parallelism: the ranks' mean loss and gradient are one process's on the whole batch, and
        # the logged metrics (the same on every rank) are that process's too.
        fused = [result["fused"] for result in per_rank]
        mean_grads = {name: _mean([grads[name] for _, grads, _ in fused]) for name in fused[0][1]}
        for _, _, metrics in fused:
            try:
                _assert_same(*singles[case], _mean([loss for loss, _, _ in fused]), mean_grads, metrics)
            except AssertionError as err:
                raise AssertionError(f"{case}: the ranks differ from one process on the whole batch: {err}") from err

    # The same, for dapo, from FusedPolicyLoss alone: the global token count and the global threshold.
    for case in ("dapo", "dapo-top20"):
        top = CASES[case][0].get("top_entropy_quantile", 1.0)
        for name, grad in _direct_dapo_grads(_load(model_dir), inputs[case], top).items():
            mean = _mean([result["fused"][1][name] for result in results[case]])
            torch.testing.assert_close(mean, grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=name, c=case: f"{c} {n}: {m}")

    # A threshold per process would have been caught.
    differences = [
        (result["per_process_threshold"][name] - grad).abs().max().item()
        for result in results["dapo-top20"] for name, grad in result["stock"][1].items()
    ]
    assert max(differences) > 1e-4

    # The training loop on two processes: each rank logs stock TRL's history, and the logs are global.
    for stock, fused in histories:
        _assert_same_histories(stock, fused)
    _assert_same_histories(histories[0][0], histories[1][0])
