"""FusedGRPOTrainer against stock trl.GRPOTrainer on the same batch.

Both trainers get identical copies of a tiny model and one fixed prepared batch (the `inputs` dict
that TRL's generation step hands to `compute_loss`), with rollout-time and reference log-probs
perturbed away from the current policy so that clipping and the KL term are active. The loss, every
parameter gradient and the logged metrics must agree.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from _tiny import tiny_model, tiny_tokenizer
from datasets import Dataset
from transformers import AutoModelForCausalLM, set_seed
from trl import GRPOConfig, GRPOTrainer

from fusedrl.integrations.trl import FusedGRPOTrainer

PROMPT_LEN, COMPLETION_LEN, BATCH = 4, 6, 4
ACCUMULATION = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny model: with beta > 0 TRL loads the reference model from the policy's path."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model(len(tiny_tokenizer()), seed=3).save_pretrained(path)
    return path


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _reward_length(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def _dataset() -> Dataset:
    return Dataset.from_dict({"prompt": ["1+2=", "3+4=", "ab?", "cd="]})


def _config(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        num_generations=BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_completion_length=COMPLETION_LEN,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-2,
        temperature=0.7,
        epsilon=0.2,
        epsilon_high=0.28,
        bf16=False,  # TRL's default autocasts to bf16 even on CPU; float32 lets the comparison be tight
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def _trainer(cls, model, tmp_path, **overrides):
    tokenizer = tiny_tokenizer()
    trainer = cls(
        model=model,
        reward_funcs=_reward_length,
        args=_config(tmp_path, **overrides),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )
    # Set by the training loop before each accumulation window; driving compute_loss directly needs it.
    trainer.current_gradient_accumulation_steps = ACCUMULATION
    return trainer


def _batch(
    trainer: GRPOTrainer,
    vocab_size: int,
    with_ref: bool,
    lengths=(6, 3, 5, 2),
    noise: float = 0.4,
    advantages=(1.2, -0.7, 0.4, -0.9),
) -> dict:
    """A prepared batch as TRL's generation step builds it: left-padded prompts, right-padded completions.

    A length of 0 is a completion that `mask_truncated_completions` removed; `noise` is the scale of the
    old log-probs' distance from the current ones.
    """
    g = torch.Generator().manual_seed(1234)
    prompt_ids = torch.randint(2, vocab_size, (BATCH, PROMPT_LEN), generator=g)
    prompt_mask = torch.ones(BATCH, PROMPT_LEN, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_ids[1, :2] = 0
    completion_ids = torch.randint(2, vocab_size, (BATCH, COMPLETION_LEN), generator=g)
    lengths = torch.tensor(lengths)
    completion_mask = (torch.arange(COMPLETION_LEN) < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    advantages = torch.tensor(advantages)

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    with torch.no_grad():
        current, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, input_ids, attention_mask, COMPLETION_LEN
        )
    # Old and reference log-probs away from the current policy: ratios reach both clip edges.
    perturbation = torch.randn(current.shape, generator=g)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": (current + noise * perturbation) * completion_mask,
        "num_items_in_batch": completion_mask.sum() * 2,  # the generation batch spans 2 micro-batches
    }
    if with_ref:
        inputs["ref_per_token_logps"] = (current + 0.3 * torch.randn(current.shape, generator=g)) * completion_mask
    return inputs


def _loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


CASES = [
    pytest.param(dict(loss_type="dapo"), id="dapo"),
    pytest.param(dict(loss_type="grpo"), id="grpo"),
    pytest.param(dict(loss_type="dr_grpo"), id="dr_grpo"),
    pytest.param(dict(loss_type="dapo", top_entropy_quantile=0.2), id="dapo-top20"),
    pytest.param(dict(loss_type="grpo", top_entropy_quantile=0.2), id="grpo-top20"),
    pytest.param(dict(loss_type="dr_grpo", top_entropy_quantile=0.2), id="dr_grpo-top20"),
    # beta > 0 with TRL's default use_bias_correction_kl=True (the KL weighted by the ratio) and without.
    pytest.param(dict(loss_type="dapo", beta=0.05), id="dapo-beta"),
    pytest.param(dict(loss_type="dapo", beta=0.05, use_bias_correction_kl=False), id="dapo-beta-unweighted"),
    pytest.param(dict(loss_type="grpo", beta=0.05, top_entropy_quantile=0.2), id="grpo-beta-top20"),
    pytest.param(
        dict(loss_type="grpo", beta=0.05, top_entropy_quantile=0.2, use_bias_correction_kl=False),
        id="grpo-beta-top20-unweighted",
    ),
    pytest.param(dict(loss_type="bnpo", beta=0.05), id="bnpo-beta"),
    pytest.param(dict(loss_type="dr_grpo", beta=0.05, use_bias_correction_kl=False), id="dr_grpo-beta-unweighted"),
    # INTELLECT-2's two-sided clip: delta caps the A < 0 tokens' ratio.
    pytest.param(dict(loss_type="dapo", delta=1.5), id="dapo-delta"),
    # GSPO: one importance weight per response (TRL recommends grpo; dapo weighs responses by length).
    pytest.param(dict(loss_type="grpo", importance_sampling_level="sequence"), id="gspo"),
    pytest.param(dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.05), id="gspo-dapo-beta"),
    pytest.param(
        dict(loss_type="grpo", importance_sampling_level="sequence", top_entropy_quantile=0.2), id="gspo-top20"
    ),
    pytest.param(dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.5), id="gspo-delta"),
    pytest.param(dict(loss_type="luspo", importance_sampling_level="sequence"), id="luspo"),
    # CISPO's cap (TRL's epsilon_high) inside the ratios' range, so that some weights are truncated.
    pytest.param(dict(loss_type="cispo", epsilon_high=1.3), id="cispo"),
    pytest.param(dict(loss_type="cispo", epsilon_high=1.3, importance_sampling_level="sequence"), id="cispo-sequence"),
    pytest.param(dict(loss_type="cispo", epsilon_high=1.3, beta=0.05, top_entropy_quantile=0.2), id="cispo-beta-top20"),
    pytest.param(dict(loss_type="sapo"), id="sapo"),
    pytest.param(
        dict(loss_type="sapo", sapo_temperature_pos=2.0, importance_sampling_level="sequence"), id="sapo-sequence"
    ),
    pytest.param(dict(loss_type="sapo", beta=0.05, top_entropy_quantile=0.2), id="sapo-beta-top20"),
    pytest.param(dict(loss_type="vespo"), id="vespo"),
    pytest.param(dict(loss_type="vespo", vespo_k_neg=1.5, beta=0.05), id="vespo-beta"),
    # DeepSeek-V3.2's off-policy sequence mask: of the two A < 0 responses, the one whose old log-probs
    # sit 0.2 above the current ones on average is dropped, the other kept.
    pytest.param(dict(loss_type="dapo", off_policy_mask_threshold=0.1), id="dapo-off-policy-mask"),
    pytest.param(dict(loss_type="cispo", epsilon_high=1.3, off_policy_mask_threshold=0.1), id="cispo-off-policy-mask"),
]
# The sequence-level weight averages the per-token noise away; this one gives response weights of
# about 1.6, 2.1, 1.0, 0.5 (advantages +, -, +, -): a high clip, a low clip and a ratio above delta.
SEQUENCE_NOISE = -1.5


@pytest.mark.parametrize("overrides", CASES)
def test_loss_and_gradients_match_stock_trl(tmp_path, model_dir, overrides):
    stock = _trainer(GRPOTrainer, _load(model_dir), tmp_path / "stock", **overrides)
    fused = _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path / "fused", **overrides)
    noise = SEQUENCE_NOISE if overrides.get("importance_sampling_level") == "sequence" else 0.4
    inputs = _batch(stock, len(tiny_tokenizer()), with_ref="beta" in overrides, noise=noise)

    stock_loss, stock_grads, stock_metrics = _loss_and_grads(stock, inputs)
    fused_loss, fused_grads, fused_metrics = _loss_and_grads(fused, inputs)
    _assert_same(stock_loss, stock_grads, stock_metrics, fused_loss, fused_grads, fused_metrics)
    assert len(stock_grads) == len(list(stock.model.parameters()))
    # The batch is built to reach each loss type's clipped branches: the comparison covers them.
    if "clip_ratio/low_mean" in stock_metrics:
        assert stock_metrics["clip_ratio/low_mean"] > 0 and stock_metrics["clip_ratio/high_mean"] > 0
    if "delta" in overrides:
        assert _ratio_exceeds(stock, inputs, overrides["delta"], overrides.get("importance_sampling_level", "token"))
    if overrides["loss_type"] == "cispo":
        assert 0 < stock_metrics["cispo_clip_ratio"] < 1
    if "off_policy_mask_threshold" in overrides:
        unmasked = _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path / "unmasked",
                            **{k: v for k, v in overrides.items() if k != "off_policy_mask_threshold"})
        assert abs(_loss_and_grads(unmasked, inputs)[0].item() - fused_loss.item()) > 1e-4


def _assert_same(stock_loss, stock_grads, stock_metrics, fused_loss, fused_grads, fused_metrics):
    """Loss, every parameter gradient and every logged metric (names and values) agree."""
    torch.testing.assert_close(fused_loss, stock_loss, rtol=1e-5, atol=1e-7)
    assert stock_grads.keys() == fused_grads.keys()
    for name, grad in stock_grads.items():
        torch.testing.assert_close(
            fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert fused_metrics.keys() == stock_metrics.keys()
    for name, value in stock_metrics.items():
        assert fused_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), name


def _ratio_exceeds(trainer, inputs, delta, level) -> bool:
    """Some token with A < 0 has its importance weight above delta: the two-sided clip bites."""
    mask = inputs["completion_mask"].bool()
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        current, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, input_ids, attention_mask, COMPLETION_LEN
        )
    log_ratio = torch.where(mask, current - inputs["old_per_token_logps"], 0.0)
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)).expand_as(log_ratio)
    negative = (inputs["advantages"] < 0)[:, None] & mask
    return bool((log_ratio.exp()[negative] > delta).any())


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_metrics_with_empty_completions_match_stock_trl(tmp_path, model_dir, level):
    """Two completions without a valid token (as `mask_truncated_completions` leaves them), the other
    two clipped low: TRL's token-level extremes skip the empty responses, its sequence-level statistics
    count them as unclipped responses; the fused trainer logs the same."""
    overrides = dict(loss_type="grpo", importance_sampling_level=level)
    stock = _trainer(GRPOTrainer, _load(model_dir), tmp_path / "stock", **overrides)
    fused = _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path / "fused", **overrides)
    inputs = _batch(
        stock, len(tiny_tokenizer()), False, lengths=(6, 3, 0, 0), noise=1.5, advantages=(-1.2, -0.7, 0.4, -0.9)
    )
    stock_results = _loss_and_grads(stock, inputs)
    _assert_same(*stock_results, *_loss_and_grads(fused, inputs))
    metrics = stock_results[2]
    if level == "token":
        assert metrics["clip_ratio/low_min"] > 0  # over the two non-empty responses
    else:
        assert metrics["clip_ratio/low_mean"] == 0.5 and metrics["clip_ratio/low_min"] == 0.0  # 2 of 4 rows


VLLM_CASES = [
    pytest.param(dict(loss_type="dapo"), "token", id="dapo-token"),
    # The sampler's log-probs below put the second response (A < 0) 0.1 above the current ones: dropped.
    pytest.param(dict(loss_type="grpo", off_policy_mask_threshold=0.05), "token", id="grpo-off-policy-mask"),
    pytest.param(dict(loss_type="grpo", importance_sampling_level="sequence"), "sequence", id="gspo-sequence"),
    pytest.param(dict(loss_type="cispo", epsilon_high=1.3), "sequence", id="cispo-sequence"),
    pytest.param(dict(loss_type="sapo", beta=0.05), "token", id="sapo-token"),
    pytest.param(dict(loss_type="vespo"), "token", id="vespo-token"),
]


@pytest.mark.parametrize("overrides, weight_level", VLLM_CASES)
def test_vllm_importance_sampling_correction_matches_stock_trl(tmp_path, model_dir, overrides, weight_level):
    """TRL's correction for vLLM's sampling mismatch, as its generation step hands it to the loss:
    `importance_sampling_ratio` [B, T] (token_* modes) or [B, 1] (sequence_* modes), truncated or with
    masked-out zeros. vLLM itself is not installed here: both trainers are switched to it after
    construction, so that only the loss's use of the ratios is compared."""
    stock = _trainer(GRPOTrainer, _load(model_dir), tmp_path / "stock", **overrides)
    fused = _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path / "fused", **overrides)
    noise = SEQUENCE_NOISE if overrides.get("importance_sampling_level") == "sequence" else 0.4
    inputs = _batch(stock, len(tiny_tokenizer()), with_ref="beta" in overrides, noise=noise)
    g = torch.Generator().manual_seed(7)
    shape = (BATCH, COMPLETION_LEN if weight_level == "token" else 1)
    ratio = torch.empty(shape).uniform_(0.5, 1.5, generator=g)
    ratio[1, 0] = 0.0  # a ratio a *_mask mode removed
    if weight_level == "token":  # TRL's ratio is exp(0) = 1 on padding
        ratio = torch.where(inputs["completion_mask"].bool(), ratio, 1.0)
    inputs["importance_sampling_ratio"] = ratio
    # vLLM's own log-probs, which the off-policy mask reads instead of the old ones; one it could not give.
    sampling = inputs["old_per_token_logps"] + 0.3 * torch.randn(inputs["old_per_token_logps"].shape, generator=g)
    sampling[2, 0] = torch.nan
    inputs["sampling_per_token_logps"] = sampling
    results = []
    for trainer in (stock, fused):
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        results.append(_loss_and_grads(trainer, inputs))
    _assert_same(*results[0], *results[1])
    without = _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path / "without", **overrides)
    assert abs(_loss_and_grads(without, inputs)[0].item() - results[1][0].item()) > 1e-4


@pytest.mark.parametrize(
    "overrides",
    [dict(loss_type="dapo", top_entropy_quantile=0.2), dict(loss_type="grpo", beta=0.05)],
    ids=["dapo-top20", "grpo-beta"],
)
def test_on_policy_batch_matches_stock_trl(tmp_path, model_dir, overrides):
    """Without old log-probs (one update per generation) both use the current ones, detached; the
    bias-corrected KL's ratio is then 1 in value but not in gradient."""
    stock = _trainer(GRPOTrainer, _load(model_dir), tmp_path / "stock", **overrides)
    fused = _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path / "fused", **overrides)
    inputs = _batch(stock, len(tiny_tokenizer()), with_ref="beta" in overrides)
    del inputs["old_per_token_logps"]
    stock_loss, stock_grads, _ = _loss_and_grads(stock, inputs)
    fused_loss, fused_grads, _ = _loss_and_grads(fused, inputs)
    torch.testing.assert_close(fused_loss, stock_loss, rtol=1e-5, atol=1e-7)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_eval_mode_loss_matches_stock_trl(tmp_path, model_dir, loss_type):
    """In eval (prediction_step) TRL neither splits nor accumulates: a different normaliser."""
    stock = _trainer(GRPOTrainer, _load(model_dir), tmp_path / "stock", loss_type=loss_type)
    fused = _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path / "fused", loss_type=loss_type)
    inputs = _batch(stock, len(tiny_tokenizer()), with_ref=False)
    losses = []
    for trainer in (stock, fused):
        trainer.model.eval()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, inputs))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
    if loss_type == "grpo":  # (dapo's two normalisers coincide when steps_per_generation == accumulation)
        train_loss, _, _ = _loss_and_grads(fused, inputs)
        torch.testing.assert_close(train_loss, losses[1] / ACCUMULATION)


def test_bias_correction_kl_changes_the_gradient(tmp_path, model_dir):
    """The weighted and unweighted beta cases above are not the same comparison twice."""
    grads = []
    for weighted in (True, False):
        trainer = _trainer(
            FusedGRPOTrainer, _load(model_dir), tmp_path / str(weighted), beta=0.5, use_bias_correction_kl=weighted
        )
        grads.append(_loss_and_grads(trainer, _batch(trainer, len(tiny_tokenizer()), with_ref=True))[1])
    differences = [(grads[0][name] - grads[1][name]).abs().max().item() for name in grads[0]]
    assert max(differences) > 1e-4


def test_top_entropy_quantile_changes_the_loss(tmp_path, model_dir):
    """The 0.2 case above is not vacuous: masking 80% of the tokens changes the loss."""
    full = _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path / "full")
    top = _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path / "top", top_entropy_quantile=0.2)
    inputs = _batch(full, len(tiny_tokenizer()), with_ref=False)
    full_loss, _, _ = _loss_and_grads(full, inputs)
    top_loss, _, _ = _loss_and_grads(top, inputs)
    assert abs(full_loss.item() - top_loss.item()) > 1e-3


def test_old_and_reference_logprobs_come_from_the_fused_op(tmp_path):
    """TRL's fused-LM-head call (used for old and reference log-probs) is answered by fusedrl's op
    and equals stock TRL's values; here with an untied output embedding."""
    tokenizer = tiny_tokenizer()
    path = tmp_path / "untied"
    tiny_model(len(tokenizer), seed=5, tie_word_embeddings=False).save_pretrained(path)
    stock = _trainer(GRPOTrainer, _load(path), tmp_path / "stock", beta=0.1)
    fused = _trainer(FusedGRPOTrainer, _load(path), tmp_path / "fused", beta=0.1)
    for patched in (fused.model, fused.ref_model):
        assert patched.forward.__func__.__code__.co_filename.endswith("fusedrl/integrations/trl.py")
    inputs = _batch(stock, len(tokenizer), with_ref=False)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    # TRL asks the policy for entropies too, the reference model for log-probs only.
    for trainer_model, with_entropy in (("model", True), ("ref_model", False)):
        with torch.no_grad():
            expected = stock._get_per_token_logps_and_entropies(
                getattr(stock, trainer_model), input_ids, attention_mask, COMPLETION_LEN, compute_entropy=with_entropy
            )
            got = fused._get_per_token_logps_and_entropies(
                getattr(fused, trainer_model), input_ids, attention_mask, COMPLETION_LEN, compute_entropy=with_entropy
            )
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
        if with_entropy:
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_two_step_train_runs_and_logs_trl_metrics(tmp_path, model_dir):
    tokenizer = tiny_tokenizer()
    model = _load(model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = FusedGRPOTrainer(
        model=model,
        reward_funcs=_reward_length,
        # TRL's default bf16 autocast (on CPU too): the fused op then runs on bf16 hidden states and head.
        args=_config(
            tmp_path,
            max_steps=2,
            beta=0.05,
            top_entropy_quantile=0.2,
            gradient_accumulation_steps=1,
            bf16=True,
        ),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 2
    for log in steps:
        for name in ("loss", "entropy", "kl", "clip_ratio/region_mean", "reward"):
            assert name in log and torch.isfinite(torch.tensor(log[name])), name
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed, "two optimizer steps left every parameter unchanged"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(loss_type="dapo", top_entropy_quantile=0.2),
        dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05),
    ],
    ids=["dapo-top20", "gspo-beta"],
)
def test_train_steps_log_what_stock_trl_logs(tmp_path, model_dir, overrides):
    """Two optimizer steps of `train()`, two updates per generation (the second clips), from the same
    seed: stock and fused trainers generate the same completions and log the same values under the
    same names, the loss, the gradient norm and every metric of the loss included."""
    _assert_same_histories(*_train_histories(model_dir, tmp_path, overrides))


def _train_histories(model_dir, out_dir, overrides) -> list[list[dict]]:
    """The logged steps of two `train()` optimizer steps (one generation, two updates), stock then fused."""
    histories = []
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        set_seed(0)
        trainer = cls(
            model=_load(model_dir),
            reward_funcs=_reward_length,
            args=_config(f"{out_dir}/{cls.__name__}", max_steps=2, num_iterations=2, seed=0, **overrides),
            train_dataset=_dataset(),
            processing_class=tiny_tokenizer(),
        )
        trainer.train()
        histories.append([log for log in trainer.state.log_history if "loss" in log])
    return histories


def _assert_same_histories(stock, fused):
    assert len(stock) == len(fused) == 2
    assert stock[1]["clip_ratio/region_mean"] > 0
    for stock_log, fused_log in zip(stock, fused):
        assert fused_log.keys() == stock_log.keys()
        for name, value in stock_log.items():
            if name != "step_time":
                assert fused_log[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize(
    "overrides, option",
    [
        (dict(entropy_coef=0.01), "entropy_coef"),
            (dict(delta=1.2), "delta"),  # below 1 + epsilon_high = 1.28
        (dict(loss_type="vespo", importance_sampling_level="sequence"), "importance_sampling_level"),
    ],
)
def test_unsupported_options_are_refused_by_name(tmp_path, model_dir, overrides, option):
    with pytest.raises(ValueError, match=option):
        _trainer(FusedGRPOTrainer, _load(model_dir), tmp_path, **overrides)


def test_missing_trl_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "fusedrl.integrations.trl")
    with pytest.raises(ImportError, match=r"pip install 'fusedrl\[trl\]'"):
        importlib.import_module("fusedrl.integrations.trl")
