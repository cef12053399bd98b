"""fusedrl's verl integration against the installed verl (0.9.1 in requirements/verl.txt).

The references are verl's own: its registered `vanilla`, `clip_cov` and `kl_cov` policy losses, its
`ppo_loss`, its hydra config and its model patch, in float64 where they compute a loss. fusedrl's
token masks have no verl counterpart; they are checked as verl's loss with `rollout_is_weights` set
to the mask, each mask built here from its definition (torch.quantile for the entropy threshold).
Run by scripts/test_verl.sh in .venv-verl; skipped in the main suite, which has no verl.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from _tiny import tiny_model
from _verl_data import actor_config, batch, micro_batch, require_verl

require_verl()
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY  # noqa: E402

from fusedrl.integrations import verl as fused_verl  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
# The options of verl's own losses, chosen so that each bites: Clip-Cov draws every candidate
# (ratio 1), so that its random draw is the same set in both.
MODES = {
    "vanilla": {},
    "clip_cov": dict(clip_cov_ratio=1.0, clip_cov_lb=0.0, clip_cov_ub=5.0),
    "kl_cov": dict(kl_cov_ratio=0.1, ppo_kl_coef=0.7),
}
# What each mode's test must see happen, so that it cannot pass on a batch where the loss does nothing.
BITES = {"vanilla": ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"), "clip_cov": ("actor/pg_clipfrac",),
         "kl_cov": ("actor/kl_cov_frac",)}


def _tolerance(loss_agg_mode: str, mask: torch.Tensor) -> float:
    # verl divides each response's sum by its token count plus 1e-8 in seq-mean-token-mean; fusedrl by the
    # count: a relative difference of at most 1e-8 / (shortest response). Elsewhere float64 rounding.
    if loss_agg_mode == "seq-mean-token-mean":
        return 1.5e-8 / mask.sum(-1).min().item()
    return 1e-12


def test_losses_register_through_the_entry_point_and_the_environment_variable():
    """A fresh `import verl` registers the losses and wraps ppo_loss through fusedrl's `verl.plugins` entry
    point, and through VERL_USE_EXTERNAL_MODULES with entry points off; with both off, nothing does."""
    probe = ("import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as r; "
             "import verl.workers.utils.losses as l; "
             "print(sorted(k for k in r if k.startswith('fusedrl')), getattr(l.ppo_loss, '__fusedrl_wrapped__', False))")
    base = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    envs = {
        "entry point": base,
        "environment variable": {**base, "VERL_USE_EXTERNAL_PLUGINS": "none",
                                 "VERL_USE_EXTERNAL_MODULES": "fusedrl.integrations.verl_plugin"},
        "neither": {**base, "VERL_USE_EXTERNAL_PLUGINS": "none"},
    }
    runs = {name: subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for name, env in envs.items()}
    lines = {}
    for name, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"{name}: {err[-2000:]}"
        lines[name] = out.strip().splitlines()[-1]
    registered = "['fusedrl_clip_cov', 'fusedrl_kl_cov', 'fusedrl_vanilla'] True"
    assert lines == {"entry point": registered, "environment variable": registered, "neither": "[] False"}


def test_install_wraps_every_name_ppo_loss_is_bound_to(monkeypatch):
    """engine_workers binds ppo_loss at import (the actor's loss_fn); an import after install() takes the
    wrapped one, and install() rewraps the names bound before it ran."""
    import verl.workers.engine_workers as engine_workers
    import verl.workers.utils.losses as losses

    assert losses.ppo_loss.__fusedrl_wrapped__ and engine_workers.ppo_loss is losses.ppo_loss
    original = losses.ppo_loss.__wrapped__
    early = type(sys)("verl.fusedrl_test_early_binding")
    early.ppo_loss = original
    monkeypatch.setitem(sys.modules, early.__name__, early)
    for module in (losses, engine_workers):
        monkeypatch.setattr(module, "ppo_loss", original)
    fused_verl.install()
    assert losses.ppo_loss.__fusedrl_wrapped__ and losses.ppo_loss.__wrapped__ is original
    assert engine_workers.ppo_loss is losses.ppo_loss and early.ppo_loss is losses.ppo_loss


@pytest.mark.parametrize("info", ["local", "global"])
@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
@pytest.mark.parametrize("mode", list(MODES))
def test_equals_verls_own_loss(mode, loss_agg_mode, info):
    """fusedrl_<mode> and verl's <mode>: the same loss, gradient and metrics in float64, for every
    aggregation, with the micro-batch's own counts (local) or verl's global batch sizes, dp_size and
    rollout importance weights (global)."""
    old, lp, adv, _, mask = batch(6, 11, seed=3)
    config = actor_config(f"fusedrl_{mode}", loss_agg_mode, **MODES[mode])
    weights = None
    if info == "global":
        config.global_batch_info.update(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=13,
                                        loss_scale_factor=17)
        weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    args = (old, lp, adv, mask, loss_agg_mode, config, weights)
    loss, metrics = POLICY_LOSS_REGISTRY[f"fusedrl_{mode}"](*args)
    expected, expected_metrics = POLICY_LOSS_REGISTRY[mode](*args)
    (grad,) = torch.autograd.grad(loss, lp)
    (expected_grad,) = torch.autograd.grad(expected, lp)

    tol = _tolerance(loss_agg_mode, mask)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=tol, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=tol, atol=1e-14)
    assert {k: metrics[k] for k in expected_metrics} == pytest.approx(expected_metrics, rel=1e-6, abs=1e-12)
    assert all(metrics[name] > 0 for name in BITES[mode]), metrics


@pytest.mark.parametrize("bound_in, nested_prompts, tokens", [
    ("verl.workers.utils.losses", True, "high"), ("verl.workers.utils.losses", False, "high"),
    ("verl.workers.engine_workers", True, "high"), ("verl.workers.utils.losses", True, "low"),
])
def test_ppo_loss_on_a_micro_batch_with_the_top_entropy_mask(bound_in, nested_prompts, tokens):
    """verl's ppo_loss, called by either name it is bound to, on a TensorDict micro-batch as verl's FSDP
    engine builds it (packed log-probs and entropy; nested or left-padded prompts): fusedrl_vanilla with
    top_entropy_fraction=0.3 is verl's vanilla on the tokens whose entropy reaches the 0.7 quantile (or,
    with entropy_tokens=low, on the others), divided by all valid tokens."""
    ppo_loss = importlib.import_module(bound_in).ppo_loss
    old, lp, adv, entropy, mask = batch(5, 12, seed=6)
    prompt_lengths = torch.tensor([3, 1, 4, 2, 5])
    config = actor_config("fusedrl_vanilla", top_entropy_fraction=0.3, entropy_tokens=tokens)
    output, data = micro_batch(old, lp, adv, entropy, mask, prompt_lengths=prompt_lengths,
                               nested_prompts=nested_prompts, batch_num_tokens=int(mask.sum()), global_batch_size=5)
    loss, metrics = ppo_loss(config, output, data)
    (grad,) = torch.autograd.grad(loss, lp)

    high = entropy >= torch.quantile(entropy[mask], 1 - 0.3)
    selected = mask & (high if tokens == "high" else ~high)
    expected, _ = POLICY_LOSS_REGISTRY["vanilla"](old, lp, adv, mask, "token-mean", config, selected.double())
    (expected_grad,) = torch.autograd.grad(expected, lp)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    assert metrics["actor/top_entropy_frac"].aggregate() == pytest.approx(selected.sum().item() / mask.sum().item())
    assert 0 < selected.sum() < mask.sum()


def test_every_option_from_verls_command_line():
    """verl's own hydra config with fusedrl's policy-loss class selected by `_target_`: Clip-Cov's
    parameters, the top-entropy fraction and the probability mask, set as a verl user sets options, reach
    the loss. Without the `_target_` line verl refuses the new keys (the gap this class closes)."""
    import verl.workers.utils.losses as losses
    from hydra import compose, initialize_config_module
    from verl.utils.config import omega_conf_to_dataclass

    prefix = "actor_rollout_ref.actor.policy_loss"
    options = [f"{prefix}.loss_mode=fusedrl_clip_cov", f"{prefix}.clip_cov_ratio=1.0", f"{prefix}.clip_cov_lb=0.0",
               f"+{prefix}.top_entropy_fraction=0.5", f"+{prefix}.prob_mask_threshold=0.4",
               "actor_rollout_ref.actor.calculate_entropy=True", "actor_rollout_ref.actor.clip_ratio_high=0.28",
               "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", "actor_rollout_ref.rollout.n=1"]
    selected_class = f"{prefix}._target_=fusedrl.integrations.verl.PolicyLossConfig"
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = omega_conf_to_dataclass(compose("ppo_trainer", [selected_class, *options]).actor_rollout_ref.actor)
        with pytest.raises(Exception, match="unexpected keyword argument 'top_entropy_fraction'"):
            omega_conf_to_dataclass(compose("ppo_trainer", options).actor_rollout_ref.actor)
        with pytest.raises(Exception, match=r"actor\.policy_loss\.top_entropy_fraction: .* in \(0, 1\]"):
            bad = [f"+{prefix}.top_entropy_fraction=1.5" if "top_entropy" in o else o for o in options]
            omega_conf_to_dataclass(compose("ppo_trainer", [selected_class, *bad]).actor_rollout_ref.actor)
    assert isinstance(config.policy_loss, fused_verl.PolicyLossConfig)

    old, lp, adv, entropy, mask = batch(6, 10, seed=4)
    output, data = micro_batch(old, lp, adv, entropy, mask, prompt_lengths=torch.full((6,), 2), nested_prompts=True,
                               batch_num_tokens=int(mask.sum()), global_batch_size=6)
    loss, metrics = losses.ppo_loss(config, output, data)
    kept = mask & (entropy >= torch.quantile(entropy[mask], 0.5)) & (old.exp() < 0.4)
    expected, expected_metrics = POLICY_LOSS_REGISTRY["clip_cov"](old, lp, adv, mask, "token-mean", config,
                                                                  kept.double())
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    assert metrics["actor/pg_clipfrac"].aggregate() == pytest.approx(expected_metrics["actor/pg_clipfrac"])
    assert 0 < kept.sum() < mask.sum() and expected_metrics["actor/pg_clipfrac"] > 0


def test_the_docs_recipe_is_a_valid_verl_config():
    """The GRPO command line of docs/integrations.md, composed by verl's hydra config and checked by verl's
    own validation, selects fusedrl's loss, mask and forward."""
    import shlex
    from pathlib import Path

    from hydra import compose, initialize_config_module
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    text = (Path(__file__).parents[2] / "docs" / "integrations.md").read_text()
    recipe = text.split("<!-- verl-recipe")[1].split("```bash")[1].split("```")[0]
    words = shlex.split(recipe.replace("\\\n", " "))
    assert words[:3] == ["python3", "-m", "verl.trainer.main_ppo"]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose("ppo_trainer", words[3:])
    validate_config(config, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, fused_verl.PolicyLossConfig)
    assert (actor.policy_loss.loss_mode, actor.policy_loss.top_entropy_fraction) == ("fusedrl_vanilla", 0.2)
    assert actor.calculate_entropy and config.algorithm.adv_estimator == "grpo"
    model = config.actor_rollout_ref.model
    assert model.use_fused_kernels and model.fused_kernel_options.impl_backend == fused_verl.FUSED_KERNELS_BACKEND


def test_errors_name_verls_keys():
    old, lp, adv, _, mask = batch(2, 6, seed=5)
    with pytest.raises(ValueError, match=r"actor\.policy_loss\.prob_mask_threshold"):
        fused_verl.PolicyLossConfig(loss_mode="fusedrl_vanilla", prob_mask_threshold=0.0)
    with pytest.raises(ValueError, match=r"actor\.policy_loss\.entropy_tokens"):  # low needs a fraction < 1
        fused_verl.PolicyLossConfig(loss_mode="fusedrl_vanilla", entropy_tokens="low")
    config = actor_config("fusedrl_clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0)
    with pytest.raises(ValueError, match=r"actor\.policy_loss\.clip_cov_lb"):
        POLICY_LOSS_REGISTRY["fusedrl_clip_cov"](old, lp, adv, mask, "token-mean", config)
    config = actor_config("fusedrl_vanilla", top_entropy_fraction=0.2)
    with pytest.raises(ValueError, match="calculate_entropy=True"):  # called outside ppo_loss: no entropy
        POLICY_LOSS_REGISTRY["fusedrl_vanilla"](old, lp, adv, mask, "token-mean", config)


def _plain_log_probs(model, input_ids, attention_mask, temperature):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double() / temperature
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, torch.roll(input_ids, -1, dims=-1)[..., None]).squeeze(-1)
    return lp, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("tied", [True, False])
def test_fused_forward_through_verls_monkey_patch(tied):
    """verl's apply_monkey_patch with fused_kernels_backend=fusedrl installs fusedrl's forward: its
    log_probs and entropy (fp32) equal the plain model's, in float64 from its logits, gradients too."""
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    model = tiny_model(vocab_size=61, seed=6, tie_word_embeddings=tied)
    input_ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    expected_lp, expected_h = _plain_log_probs(model, input_ids, attention_mask, 0.7)
    (expected_grad,) = torch.autograd.grad((expected_lp + 0.5 * expected_h).sum(), model.lm_head.weight)

    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="fusedrl")
    out = model(input_ids=input_ids, attention_mask=attention_mask, temperature=0.7, return_dict=True)
    (grad,) = torch.autograd.grad((out.log_probs + 0.5 * out.entropy).sum(), model.lm_head.weight)
    assert out.log_probs.dtype == torch.float32 and out.log_probs.shape == (3, 9)
    torch.testing.assert_close(out.log_probs.double(), expected_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.entropy.double(), expected_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    # verl's remove-padding path hands the labels over as shift_labels: they are scored as given.
    labels = torch.roll(input_ids, -1, dims=-1)
    shifted = model(input_ids=input_ids, attention_mask=attention_mask, temperature=0.7, shift_labels=labels)
    torch.testing.assert_close(shifted.log_probs, out.log_probs, rtol=0, atol=0)


def test_verls_own_backends_are_left_alone(monkeypatch):
    from transformers import Qwen2ForCausalLM
    from verl.models.transformers.dense_common import forward_with_torch_backend
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    monkeypatch.setattr(Qwen2ForCausalLM, "forward", Qwen2ForCausalLM.forward)  # verl patches the class
    model = tiny_model(vocab_size=23, seed=8)
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend="torch")
    assert "forward" not in model.__dict__ and type(model).forward is forward_with_torch_backend


def test_fused_forward_refuses_transformed_logits():
    model = tiny_model(vocab_size=23, seed=9)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fused_verl.patch_model_forward(model)
