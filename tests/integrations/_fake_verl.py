"""Stand-ins for the parts of verl 0.9 that fusedrl.integrations.verl touches, mirroring their documented
signatures (verl is not installed in the test environment: it pulls in Ray and a CUDA torch pin).

- verl.trainer.ppo.core_algos: POLICY_LOSS_REGISTRY, register_policy_loss(name) -> decorator,
  get_policy_loss_fn(name), agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens,
  global_batch_size, loss_scale_factor) for "token-mean", "token-sum" and "seq-mean-token-mean".
- verl.workers.utils.losses: ppo_loss(config, model_output, data, dp_group=None), calling the
  registered loss with verl's keyword arguments.
- verl.workers.utils.padding: no_padding_2_padding(tensor, data) (identity: data is already padded).
- verl.models.transformers.monkey_patch: patch_forward_with_backends(model, use_fused_kernels,
  fused_kernels_backend).
"""

from __future__ import annotations

import sys
import types

import torch

# verl 0.9's PolicyLossFn parameters, in order (verl/trainer/ppo/core_algos.py).
POLICY_LOSS_PARAMETERS = [
    "old_log_prob",
    "log_prob",
    "advantages",
    "response_mask",
    "loss_agg_mode",
    "config",
    "rollout_is_weights",
]


def _core_algos() -> types.ModuleType:
    module = types.ModuleType("verl.trainer.ppo.core_algos")
    module.POLICY_LOSS_REGISTRY = {}

    def register_policy_loss(name):
        def decorator(func):
            module.POLICY_LOSS_REGISTRY[name] = func
            return func

        return decorator

    def get_policy_loss_fn(name):
        if name not in module.POLICY_LOSS_REGISTRY:
            raise ValueError(f"Unsupported loss mode: {name}")
        return module.POLICY_LOSS_REGISTRY[name]

    def agg_loss(
        loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
        loss_scale_factor=None,
    ):  # fmt: skip
        mask = loss_mask.to(loss_mat.dtype)
        if loss_agg_mode == "token-mean":
            count = mask.sum() if batch_num_tokens is None else batch_num_tokens
            return (loss_mat * mask).sum() / count * dp_size
        if loss_agg_mode == "token-sum":
            return (loss_mat * mask).sum() * dp_size
        if loss_agg_mode == "seq-mean-token-mean":
            per_seq = (loss_mat * mask).sum(-1) / (mask.sum(-1) + 1e-8)
            seq_mask = (mask.sum(-1) > 0).to(loss_mat.dtype)
            count = seq_mask.sum() if global_batch_size is None else global_batch_size
            return (per_seq * seq_mask).sum() / count * dp_size
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")

    module.register_policy_loss = register_policy_loss
    module.get_policy_loss_fn = get_policy_loss_fn
    module.agg_loss = agg_loss
    return module


def _losses(core_algos) -> types.ModuleType:
    module = types.ModuleType("verl.workers.utils.losses")

    def ppo_loss(config, model_output, data, dp_group=None):
        fn = core_algos.get_policy_loss_fn(config.policy_loss.loss_mode)
        return fn(
            old_log_prob=data["old_log_probs"],
            log_prob=model_output["log_probs"],
            advantages=data["advantages"],
            response_mask=data["response_mask"].bool(),
            loss_agg_mode=config.loss_agg_mode,
            config=config,
            rollout_is_weights=data.get("rollout_is_weights"),
        )

    module.ppo_loss = ppo_loss
    return module


def _padding() -> types.ModuleType:
    module = types.ModuleType("verl.workers.utils.padding")
    module.no_padding_2_padding = lambda tensor, data: tensor
    return module


def _monkey_patch() -> types.ModuleType:
    module = types.ModuleType("verl.models.transformers.monkey_patch")

    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        model._verl_fused_kernels_backend = fused_kernels_backend

    module.patch_forward_with_backends = patch_forward_with_backends
    return module


def fake_verl_modules() -> dict[str, types.ModuleType]:
    core_algos = _core_algos()
    return {
        "verl": types.ModuleType("verl"),
        "verl.trainer": types.ModuleType("verl.trainer"),
        "verl.trainer.ppo": types.ModuleType("verl.trainer.ppo"),
        "verl.trainer.ppo.core_algos": core_algos,
        "verl.workers": types.ModuleType("verl.workers"),
        "verl.workers.utils": types.ModuleType("verl.workers.utils"),
        "verl.workers.utils.losses": _losses(core_algos),
        "verl.workers.utils.padding": _padding(),
        "verl.models": types.ModuleType("verl.models"),
        "verl.models.transformers": types.ModuleType("verl.models.transformers"),
        "verl.models.transformers.monkey_patch": _monkey_patch(),
    }


def install_fake_verl(setitem=None) -> dict[str, types.ModuleType]:
    """Put the stand-ins into sys.modules (through `setitem`, e.g. monkeypatch.setitem, to undo later)."""
    modules = fake_verl_modules()
    for name, module in modules.items():
        if setitem is None:
            sys.modules[name] = module
        else:
            setitem(sys.modules, name, module)
    return modules


def actor_config(loss_mode: str, loss_agg_mode: str = "token-mean", **policy_loss):
    """An actor config with ActorConfig's field names (verl's losses also accept a DictConfig)."""
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": 3.0,
            "loss_agg_mode": loss_agg_mode,
            "global_batch_info": {},
            "policy_loss": {"loss_mode": loss_mode, **policy_loss},
        }
    )


def batch(rows: int, cols: int, generator: torch.Generator):
    """old lp, lp (leaf, requires grad), advantages [B, T] and a right-padded mask."""
    old = -torch.rand(rows, cols, generator=generator, dtype=torch.float64) * 3
    lp = (old + 0.3 * torch.randn(rows, cols, generator=generator, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(rows, 1, generator=generator, dtype=torch.float64).expand(rows, cols).contiguous()
    lengths = torch.randint(1, cols + 1, (rows,), generator=generator)
    mask = torch.arange(cols) < lengths[:, None]
    return old, lp, adv, mask
