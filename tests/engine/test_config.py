"""Config loading, dotted overrides, and one clear error naming the key for every kind of mistake."""

import pytest

from fusedrl.engine.config import Config, load_config
from fusedrl.engine.errors import ConfigError


@pytest.fixture
def write(tmp_path):
    def write(text):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        return path

    return write


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.run.algorithm == "grpo" and cfg.rollout.group_size == 8


def test_yaml_then_overrides(write):
    path = write("rollout:\n  group_size: 4\noptim:\n  lr: 1.0e-3\nloss:\n  dual_clip: 3.0\n")
    cfg = load_config(path, ["optim.lr=2e-5", "run.steps=7", "loss.top_entropy_fraction=0.2",
                             "model.reference=policy", "loss.beta=0.05", "loss.kl_importance_weighted=true"])
    assert cfg.rollout.group_size == 4
    assert cfg.optim.lr == 2e-5
    assert cfg.run.steps == 7
    assert cfg.loss.dual_clip == 3.0
    assert cfg.loss.top_entropy_fraction == 0.2
    assert cfg.model.reference == "policy" and cfg.loss.beta == 0.05 and cfg.loss.kl_importance_weighted


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.loss.top_entropy_fraction == 0.2
    assert cfg.model.path == "builtin:demo"


def _error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("text, key", [
    ("rollout:\n  group_sise: 4\n", "rollout.group_sise"),
    ("rollouts:\n  group_size: 4\n", "rollouts"),
])
def test_unknown_key_in_file(write, text, key):
    assert _error(write(text)) == f"config key {key!r}: unknown key"


def test_unknown_key_in_override():
    assert "'optim.learning_rate': unknown key" in _error(None, ["optim.learning_rate=1e-5"])


@pytest.mark.parametrize("override, key", [
    ("rollout.group_size=eight", "rollout.group_size"),
    ("optim.lr=fast", "optim.lr"),
    ("run.progress=maybe", "run.progress"),
])
def test_wrong_type(override, key):
    message = _error(None, [override])
    assert message.startswith(f"config key {key!r}:")


def test_wrong_type_in_file(write):
    assert _error(write("rollout:\n  temperature: [1, 2]\n")).startswith("config key 'rollout.temperature':")


def test_override_without_equals():
    assert "expected key=value" in _error(None, ["optim.lr"])


def test_missing_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, key, words", [
    ("rollout.group_size=0", "rollout.group_size", "must be >= 1"),
    ("rollout.temperature=0", "rollout.temperature", "must be > 0"),
    ("rollout.top_p=1.5", "rollout.top_p", "(0, 1]"),
    ("loss.top_entropy_fraction=0", "loss.top_entropy_fraction", "(0, 1]"),
    ("loss.top_entropy_fraction=1.2", "loss.top_entropy_fraction", "(0, 1]"),
    ("loss.prob_mask_threshold=0", "loss.prob_mask_threshold", "(0, 1]"),
    ("loss.cov_ratio=2", "loss.cov_ratio", "(0, 1]"),
    ("data.eval_fraction=0", "data.eval_fraction", "(0, 1]"),
    ("optim.lr=-1", "optim.lr", "must be > 0"),
    ("optim.adam_beta2=1", "optim.adam_beta2", "[0, 1)"),
    ("loss.loss_type=ppo", "loss.loss_type", "one of grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo"),
    ("loss.importance_sampling_level=response", "loss.importance_sampling_level", "sequence_token"),
    ("loss.cispo_max_weight=0", "loss.cispo_max_weight", "cispo_max_weight"),
    ("loss.sapo_temperature_neg=-1", "loss.sapo_temperature_neg", "sapo_temperature_neg"),
    ("loss.off_policy_mask_threshold=-0.1", "loss.off_policy_mask_threshold", "off_policy_mask_threshold"),
    ("loss.kl_estimator=k4", "loss.kl_estimator", "one of k1, k2, k3"),
    ("loss.cov_mode=cov", "loss.cov_mode", "one of None, clip_cov, kl_cov"),
    ("loss.epsilon_low=1.0", "loss.epsilon_low", "must be in [0, 1)"),
    ("loss.dual_clip=0.5", "loss.dual_clip", "> 1.0 or None"),
    ("optim.schedule=step", "optim.schedule", "one of constant, linear, cosine"),
    ("loss.backend=cuda", "loss.backend", "one of auto, triton, torch"),
    ("run.algorithm=dpo", "run.algorithm", "one of grpo, ppo, spo_chain, spo_tree"),
    ("data.task=poetry", "data.task", "one of arithmetic"),
    ("reward.function=whatever", "reward.function", "module:function"),
    ("reward.timeout_s=0", "reward.timeout_s", "must be > 0"),
    ("advantage.max_generation_rounds=0", "advantage.max_generation_rounds", "must be >= 1"),
    ("model.dtype=float16", "model.dtype", "loss scaling"),
    ("model.dtype=float64", "model.dtype", "one of float32, bfloat16"),
    ("optim.max_skipped_steps=0", "optim.max_skipped_steps", "must be >= 1"),
    ("run.keep_checkpoints=-1", "run.keep_checkpoints", "must be >= 0"),
])
def test_out_of_range(override, key, words):
    message = _error(None, [override])
    assert message.startswith(f"config key {key!r}:") and words in message


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "spo_chain", "spo_tree"])
def test_every_algorithm_loads(algorithm):
    assert load_config(None, [f"run.algorithm={algorithm}"]).run.algorithm == algorithm


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo"])
def test_selected_normalisation_loads(loss_type):
    cfg = load_config(None, [f"loss.loss_type={loss_type}", "loss.normalize_by=selected"])
    assert (cfg.loss.loss_type, cfg.loss.normalize_by) == (loss_type, "selected")


def test_every_loss_field_reaches_the_loss():
    """The loss section is LossOptions: a value set in the config is the loss's."""
    from fusedrl.engine.update import make_loss

    cfg = load_config(None, ["loss.loss_type=sapo", "loss.importance_sampling_level=sequence_token",
                             "loss.sapo_temperature_pos=0.7", "loss.sapo_temperature_neg=1.3",
                             "loss.off_policy_mask_threshold=0.5", "rollout.temperature=0.9"])
    loss = make_loss(cfg)
    assert (loss.loss_type, loss.importance_sampling_level) == ("sapo", "sequence_token")
    assert (loss.sapo_temperature_pos, loss.sapo_temperature_neg) == (0.7, 1.3)
    assert (loss.off_policy_mask_threshold, loss.temperature) == (0.5, 0.9)


@pytest.mark.parametrize("overrides, key, words", [
    (["rollout.group_size=1"], "advantage.normalize_std", "group of 1"),
    (["rollout.group_size=1", "advantage.normalize_std=false", "advantage.dynamic_sampling=true"],
     "advantage.dynamic_sampling", "group_size >= 2"),
    (["loss.beta=0.1"], "loss.beta", "model.reference"),
    (["data.path=x.jsonl"], "data.task", "exactly one"),
    (["data.task=null"], "data.task", "exactly one"),
    (["data.task=null", "data.path=x.jsonl", "warm_start.steps=5", "reward.function=math"],
     "warm_start.steps", "built-in task"),
    (["data.task=null", "data.path=x.jsonl"], "reward.function", "'task' needs data.task"),
    (["advantage.overlong_buffer=100", "rollout.max_new_tokens=64"], "advantage.overlong_buffer", "<="),
    (["loss.cov_lower=5", "loss.cov_upper=1"], "loss.cov_lower", "below cov_upper"),
    (["optim.micro_batch_tokens=100"], "optim.micro_batch_tokens", "one full sequence"),
    (["optim.micro_batch_layout=flat"], "optim.micro_batch_layout", "auto, packed, padded"),
    (["model.demo.num_heads=3"], "model.demo.num_heads", "divide"),
    (["optim.mini_batches=1000"], "optim.mini_batches", "responses per step"),
    (["loss.normalize_by=selected", "loss.loss_type=dr_grpo"], "loss.normalize_by", "'valid' for loss_type='dr_grpo'"),
    # Refused by FusedPolicyLoss itself, named by the config:
    (["loss.importance_sampling_level=sequence", "loss.cov_mode=kl_cov"], "loss.importance_sampling_level",
     "single tokens' ratios"),
    (["loss.loss_type=cispo", "loss.dual_clip=3"], "loss.dual_clip", "no PPO clip"),
    (["loss.loss_type=luspo", "loss.normalize_by=selected"], "loss.normalize_by", "number of responses"),
])
def test_contradictions(overrides, key, words):
    message = _error(None, overrides)
    assert message.startswith(f"config key {key!r}:") and words in message


def test_cli_prints_one_line_without_traceback(tmp_path, capsys):
    from fusedrl.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  group_size: 1\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedrl: error: config key 'advantage.normalize_std':")
    assert "Traceback" not in err and err.count("\n") == 1
