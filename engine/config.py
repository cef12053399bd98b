"""The run configuration: one dataclass per concern, loaded from YAML with dotted overrides.

`load_config("run.yaml", ["rollout.group_size=8", "optim.lr=1e-5"])` reads the file into the
structured config with OmegaConf (which rejects unknown keys and wrong types), applies the overrides,
then checks ranges and contradictions. Every problem raises one ConfigError naming the key, before
any model or dataset is read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fusedrl.engine.errors import ConfigError
from fusedrl.engine.mismatch import CORRECTIONS
from fusedrl.engine.optim import SCHEDULES
from fusedrl.engine.tasks import TASKS
from fusedrl.loss.options import LossOptions, OptionError

ALGORITHMS = ("grpo", "ppo", "spo_chain", "spo_tree")
TRAIN_ON = ("sampler", "full")


@dataclass
class RunConfig:
    algorithm: str = "grpo"
    """Training loop: grpo, ppo (with a critic), spo_chain or spo_tree (segment advantages)."""
    output_dir: str = "runs/fusedrl"
    """Directory for metrics, TensorBoard events, checkpoints and plots."""
    steps: int = 100
    """Number of RL steps (one rollout batch each)."""
    seed: int = 0
    """Seed for python, numpy and torch; a run is reproducible on CPU."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    num_threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    save_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    resume: Optional[str] = None
    """Continue from a checkpoint: a checkpoint directory, or "latest" in output_dir."""
    allow_config_changes: bool = False
    """On resume, accept settings that differ from the checkpoint's (the run is then no longer exact)."""
    overwrite: bool = False
    """Let a fresh run start in an output_dir that holds a run, deleting its checkpoints and metrics."""
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints of this output_dir (0: keep all)."""
    progress: bool = True
    """Show a progress bar on the console."""
    tensorboard: bool = True
    """Write TensorBoard events under output_dir/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (needs the wandb package)."""
    wandb_project: str = "fusedrl"
    """Weights & Biases project name."""
    plots: bool = True
    """Write PNG plots of reward and entropy against step at the end."""
    cpu_offload: bool = False
    """Under torchrun: keep the FSDP2 parameter shards, gradients and optimizer state in CPU memory."""


@dataclass
class DemoModelConfig:
    hidden_size: int = 128
    """Width of the built-in demo model (a tiny Llama)."""
    num_layers: int = 4
    """Decoder layers of the demo model."""
    num_heads: int = 4
    """Attention heads of the demo model."""
    intermediate_size: int = 256
    """MLP width of the demo model."""


@dataclass
class ModelConfig:
    path: str = "builtin:demo"
    """Local directory of a transformers causal LM and its tokenizer, or builtin:demo."""
    reference: Optional[str] = None
    """Frozen reference model for the KL term: null, "policy" (a copy of the initial policy) or a path."""
    dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16 (stepped through fp32 master copies); float16 is refused (no loss scaling)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward to save memory."""
    demo: DemoModelConfig = field(default_factory=DemoModelConfig)
    """Shape of the built-in demo model."""


@dataclass
class DataConfig:
    task: Optional[str] = "arithmetic"
    """Built-in task (see fusedrl.engine.tasks.TASKS); null when data.path is set."""
    path: Optional[str] = None
    """Local JSONL or Parquet file of training prompts."""
    eval_path: Optional[str] = None
    """Local held-out file; without it eval_fraction of data.path is held out."""
    eval_fraction: float = 0.1
    """Fraction of data.path held out for evaluation when eval_path is not given."""
    prompt_field: str = "prompt"
    """Name of the prompt field; every other field reaches the reward as a column."""
    answer_field: str = "answer"
    """Name of the reference-answer field (read by the math reward)."""
    train_size: int = 4000
    """Rows generated for a built-in task's training split."""
    eval_size: int = 200
    """Held-out prompts used per evaluation."""
    max_prompt_length: int = 128
    """Longest prompt in tokens; a longer prompt is an error."""
    chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template."""


@dataclass
class WarmStartConfig:
    steps: int = 0
    """Supervised steps on the task's reference completions before RL (built-in tasks only)."""
    batch_size: int = 32
    """Sequences per supervised step."""
    lr: float = 1e-3
    """Peak learning rate of the warm start, reached after a linear warmup over a tenth of the steps."""
    schedule: str = "linear"
    """After the warmup: linear or cosine decay to 0 at the last step, or constant. A decay lands the
    model at a quiet point; at a constant rate the final weights depend on the last few batches."""


@dataclass
class VLLMConfig:
    kv_cache_gib: float = 1.0
    """vLLM's KV-cache size in GiB, fixed (its kv_cache_memory_bytes): the trainer keeps the rest of the memory."""
    sleep: bool = True
    """GPU: vLLM's sleep mode frees its KV cache while the policy trains."""
    enforce_eager: bool = True
    """Skip vLLM's graph compilation (and CUDA graphs): start-up in seconds, decoding somewhat slower."""


@dataclass
class RolloutConfig:
    engine: str = "hf"
    """Sampler: hf (transformers' generate on the policy) or vllm (the vllm extra, in-process; docs/vllm.md)."""
    prompts_per_step: int = 16
    """Prompts sampled per RL step."""
    group_size: int = 8
    """Responses sampled per prompt (G)."""
    temperature: float = 1.0
    """Sampling temperature; also the temperature of the log-probs in the loss."""
    top_p: float = 1.0
    """Nucleus sampling: keep the tokens with less than top_p of the mass above them (1: off; vLLM's rules, docs/engine.md)."""
    top_k: Optional[int] = None
    """Sample among the top_k largest logits, ties kept, before top_p (0 or null: off)."""
    train_on: str = "sampler"
    """Distribution of the loss's log-probs and entropies: sampler (the renormalised top_k / top_p kept set
    the responses were drawn from, so the importance ratio is exact) or full (the whole softmax at the temperature)."""
    max_new_tokens: int = 64
    """Longest response in tokens; also the loss's max_completion_length (dr_grpo)."""
    batch_size: int = 256
    """Sequences generated together by hf (vLLM schedules its own batches)."""
    correction: str = "tis"
    """Sampler-to-trainer mismatch correction (vllm): tis, token_mask, sequence_mask or none (engine/mismatch.py)."""
    correction_cap: float = 2.0
    """C > 1: tis weighs each token by min(ratio, C); the masks keep ratios within [1/C, C]."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM's memory and start-up settings (rollout.engine=vllm)."""


@dataclass
class RewardConfig:
    function: str = "task"
    """task (the built-in task's verifier), math (math-verify) or a user function "module:function"."""
    timeout_s: float = 10.0
    """A reward call running longer scores its samples 0 (counted in reward/failures)."""


@dataclass
class AdvantageConfig:
    normalize_std: bool = True
    """Divide by the group's std (GRPO); false gives Dr. GRPO's mean-centred advantage."""
    eps: float = 1e-4
    """Added to the group std before dividing."""
    dynamic_sampling: bool = False
    """Train only on groups whose rewards differ, sampling more prompts until prompts_per_step such groups (DAPO)."""
    max_generation_rounds: int = 10
    """Most rounds of prompts_per_step prompts one step samples to fill its batch with dynamic sampling."""
    overlong_buffer: int = 0
    """Tokens before max_new_tokens over which the overlong penalty grows linearly (0: off)."""
    overlong_penalty: float = 1.0
    """Penalty subtracted from the reward at max_new_tokens."""


@dataclass
class PPOConfig:
    gamma: float = 1.0
    """GAE discount (1 in Xu et al. 2024)."""
    lam: float = 1.0
    """GAE lambda (1 in Xu et al. 2024)."""
    kl_penalty: str = "reward"
    """Where loss.beta's KL goes: reward (-beta * k1 on every token's reward) or loss (the loss's KL term)."""
    reward_clip: Optional[float] = None
    """Clamp sequence rewards to [-reward_clip, reward_clip] before GAE (null: off)."""
    whiten_advantages: bool = True
    """Whiten advantages over the valid tokens of the rollout batch."""
    value_clip: Optional[float] = 0.2
    """Clip range of the value loss around the rollout-time values (null: plain squared error)."""
    normalize_values: bool = False
    """The critic learns returns scaled by their running mean and std."""
    critic_model: Optional[str] = None
    """Local model directory for the critic's backbone (null: a copy of the policy's backbone)."""
    critic_lr: float = 1e-5
    """AdamW learning rate of the critic (constant)."""
    reference_ema: float = 0.0
    """eta of ref <- (1 - eta) ref + eta policy after every step (0: frozen; needs model.reference=policy)."""


@dataclass
class SPOConfig:
    num_continuations: int = 4
    """K: continuations sampled per chain boundary to estimate its value (4 on MATH, 9 on GSM8K)."""
    cutpoint_threshold: float = 0.9
    """rho: a token whose rollout probability is below this is a cutpoint (spo_chain)."""
    cutpoint_interval: int = 5
    """Keep every cutpoint_interval-th cutpoint, from the first, as a segment boundary (spo_chain)."""
    tree_branching: list[int] = field(default_factory=lambda: [6, 6, 6])
    """Children per node at each tree level (spo_tree); its length is the depth."""
    tree_level_tokens: list[int] = field(default_factory=lambda: [30, 30])
    """New tokens per node at every level but the last, which runs to max_new_tokens (spo_tree)."""
    tree_std_normalize: bool = False
    """Divide each node's advantage by the std of its siblings' values + 1e-8 (spo_tree)."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """AdamW learning rate of the RL phase."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    schedule: str = "constant"
    """Learning-rate schedule after warmup: constant, linear or cosine (to 0 at the last update)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    updates_per_batch: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per pass (the rollout batch is split into this many mini-batches)."""
    micro_batch_tokens: int = 8192
    """Token budget of a forward/backward (packed: the sequences' tokens; padded: rows x padded length);
    gradients accumulate across them."""
    micro_batch_layout: str = "auto"
    """packed (sequences end to end, no padding), padded, or auto: packed where the model's attention can."""
    max_skipped_steps: int = 3
    """Optimizer steps with a non-finite gradient are skipped; this many in a row stop the run."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on the held-out split every N steps (0: only before and after RL)."""
    temperature: float = 0.0
    """0 for greedy decoding, else sampling at this temperature."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """The run: algorithm, steps, output directory, seed, device, resume, logging."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (and reference) model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out prompts: a built-in task or a local file."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    """Supervised steps before RL (built-in tasks)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of the responses."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward function."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Group-relative advantages and DAPO's reward shaping (GRPO)."""
    loss: LossOptions = field(default_factory=LossOptions)
    """The policy loss's options (fusedrl.loss.LossOptions), checked where they are declared."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO's critic, GAE and reference (run.algorithm=ppo)."""
    spo: SPOConfig = field(default_factory=SPOConfig)
    """SPO's segments and value estimates (run.algorithm=spo_chain or spo_tree)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer, its schedule, mini-batches and the micro-batch token budget."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (or the defaults when path is None) and `key=value` overrides."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            layers.append(_read_yaml(Path(path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-5")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OptionError as e:  # raised by LossOptions's own check, naming its field
        raise ConfigError(f"config key {'loss.' + e.option!r}: {e}") from None
    except ConfigKeyError as e:
        raise ConfigError(f"config key {e.full_key!r}: unknown key") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key {e.full_key!r}: {_first_line(e)}") from None
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> DictConfig:
    """The config file as an OmegaConf mapping; a file that is not YAML, or whose top level is not a
    mapping of sections, is a ConfigError naming the file (and the line, where YAML gives one)."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r}{where}: not valid YAML "
                          f"({getattr(e, 'problem', None) or _first_line(e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r}: not UTF-8 text") from None
    except OSError as e:
        if e.errno is not None:
            raise ConfigError(f"config file {str(path)!r}: cannot read it ({e.strerror})") from None
        # OmegaConf's "Invalid loaded object type": the file holds a bare scalar.
        raise ConfigError(f"config file {str(path)!r}: {_NOT_A_MAPPING}, got a scalar") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(path)!r}: {_NOT_A_MAPPING}, got a list")
    return loaded


_NOT_A_MAPPING = "the top level must be a mapping of sections (run:, model:, data:, ...)"


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Keys a resumed run may change without changing what it computes: where it logs and saves, how long
# it runs, how often it evaluates.
RESUME_SAFE_KEYS = {"run.resume", "run.allow_config_changes", "run.steps", "run.output_dir", "run.save_every",
                    "run.progress", "run.tensorboard", "run.wandb", "run.wandb_project", "run.plots",
                    "run.num_threads", "eval.every", "run.overwrite", "run.keep_checkpoints",
                    "optim.max_skipped_steps", "run.cpu_offload"}


def config_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every setting that differs from `saved`, a config
    as to_dict wrote it into a checkpoint; keys absent from either side count as changed."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = flat(saved), flat(to_dict(cfg))
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(old.keys() | new.keys())
            if old.get(k, "<absent>") != new.get(k, "<absent>")]


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


def _fail(key: str, message: str):
    raise ConfigError(f"config key {key!r}: {message}")


def _choice(key: str, value, choices):
    if value not in choices:
        _fail(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def _at_least(key: str, value, low):
    if not (value >= low and math.isfinite(value)):
        _fail(key, f"must be >= {low}; got {value}")


def _positive(key: str, value):
    if not (value > 0 and math.isfinite(value)):
        _fail(key, f"must be > 0; got {value}")


def _fraction(key: str, value):
    if not 0 < value <= 1:
        _fail(key, f"must be in (0, 1]; got {value}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises one ConfigError naming the first offending key."""
    run, model, data, rollout, adv, loss, optim = (cfg.run, cfg.model, cfg.data, cfg.rollout,
                                                   cfg.advantage, cfg.loss, cfg.optim)
    _choice("run.algorithm", run.algorithm, ALGORITHMS)
    _at_least("run.steps", run.steps, 1)
    _choice("run.device", run.device, ("auto", "cpu", "cuda"))
    _at_least("run.num_threads", run.num_threads, 0)
    _at_least("run.save_every", run.save_every, 0)
    _at_least("run.keep_checkpoints", run.keep_checkpoints, 0)
    if model.dtype == "float16":
        # fp16's range underflows small gradients without loss scaling, which the engine does not do.
        _fail("model.dtype", "float16 training needs loss scaling, which the engine does not do; "
                             "use bfloat16 (same memory, fp32's range) or float32")
    _choice("model.dtype", model.dtype, ("float32", "bfloat16"))
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _at_least(f"model.demo.{name}", getattr(model.demo, name), 1)
    if model.demo.hidden_size % model.demo.num_heads:
        _fail("model.demo.num_heads", f"must divide model.demo.hidden_size ({model.demo.hidden_size})")
    if (data.task is None) == (data.path is None):
        _fail("data.task", "set exactly one of data.task (a built-in task) and data.path (a local file)")
    if data.task is not None:
        _choice("data.task", data.task, tuple(TASKS))
    _fraction("data.eval_fraction", data.eval_fraction)
    if data.eval_fraction == 1:
        _fail("data.eval_fraction", "must leave training rows; got 1")
    _at_least("data.train_size", data.train_size, 1)
    _at_least("data.eval_size", data.eval_size, 1)
    _at_least("data.max_prompt_length", data.max_prompt_length, 1)
    _at_least("warm_start.steps", cfg.warm_start.steps, 0)
    _at_least("warm_start.batch_size", cfg.warm_start.batch_size, 1)
    _positive("warm_start.lr", cfg.warm_start.lr)
    _choice("warm_start.schedule", cfg.warm_start.schedule, SCHEDULES)
    if cfg.warm_start.steps and data.task is None:
        _fail("warm_start.steps", "the warm start needs a built-in task's reference completions")
    _at_least("rollout.prompts_per_step", rollout.prompts_per_step, 1)
    _at_least("rollout.group_size", rollout.group_size, 1)
    _positive("rollout.temperature", rollout.temperature)
    _fraction("rollout.top_p", rollout.top_p)
    if rollout.top_k is not None:
        _at_least("rollout.top_k", rollout.top_k, 0)
    _choice("rollout.train_on", rollout.train_on, TRAIN_ON)
    _at_least("rollout.max_new_tokens", rollout.max_new_tokens, 1)
    _at_least("rollout.batch_size", rollout.batch_size, 1)
    _validate_engine(rollout)
    if cfg.reward.function not in ("task", "math") and ":" not in cfg.reward.function:
        _fail("reward.function", f"must be task, math or an import path module:function; got "
                                 f"{cfg.reward.function!r}")
    if cfg.reward.function == "task" and data.task is None:
        _fail("reward.function", "'task' needs data.task; with data.path use math or module:function")
    _positive("reward.timeout_s", cfg.reward.timeout_s)
    if run.algorithm == "grpo" and rollout.group_size == 1 and adv.normalize_std:
        _fail("advantage.normalize_std", "a group of 1 has no std; set rollout.group_size >= 2 or "
                                         "advantage.normalize_std=false")
    if run.algorithm == "grpo" and rollout.group_size == 1 and adv.dynamic_sampling:
        _fail("advantage.dynamic_sampling", "every group of 1 has equal rewards; needs rollout.group_size >= 2")
    _positive("advantage.eps", adv.eps)
    _at_least("advantage.max_generation_rounds", adv.max_generation_rounds, 1)
    _at_least("advantage.overlong_buffer", adv.overlong_buffer, 0)
    if adv.overlong_buffer > rollout.max_new_tokens:
        _fail("advantage.overlong_buffer", f"must be <= rollout.max_new_tokens ({rollout.max_new_tokens})")
    _at_least("advantage.overlong_penalty", adv.overlong_penalty, 0)
    if loss.beta > 0 and model.reference is None:
        _fail("loss.beta", "a KL term needs a reference model; set model.reference (e.g. policy)")
    _positive("optim.lr", optim.lr)
    _at_least("optim.weight_decay", optim.weight_decay, 0)
    for key in ("adam_beta1", "adam_beta2"):
        value = getattr(optim, key)
        if not 0 <= value < 1:
            _fail(f"optim.{key}", f"must be in [0, 1); got {value}")
    _choice("optim.schedule", optim.schedule, SCHEDULES)
    _at_least("optim.warmup_steps", optim.warmup_steps, 0)
    _at_least("optim.max_grad_norm", optim.max_grad_norm, 0)
    _at_least("optim.updates_per_batch", optim.updates_per_batch, 1)
    _at_least("optim.mini_batches", optim.mini_batches, 1)
    _choice("optim.micro_batch_layout", optim.micro_batch_layout, ("auto", "packed", "padded"))
    _at_least("optim.max_skipped_steps", optim.max_skipped_steps, 1)
    if run.algorithm != "spo_tree" and optim.mini_batches > rollout.prompts_per_step * rollout.group_size:
        _fail("optim.mini_batches", f"must be <= the responses per step "
                                    f"({rollout.prompts_per_step * rollout.group_size})")
    longest = data.max_prompt_length + rollout.max_new_tokens
    if optim.micro_batch_tokens < longest:
        _fail("optim.micro_batch_tokens", f"must hold one full sequence: >= data.max_prompt_length + "
                                          f"rollout.max_new_tokens = {longest}; got {optim.micro_batch_tokens}")
    _at_least("eval.every", cfg.eval.every, 0)
    _at_least("eval.temperature", cfg.eval.temperature, 0)
    if run.algorithm == "ppo":
        _validate_ppo(cfg)
    if run.algorithm in ("spo_chain", "spo_tree"):
        _validate_spo(cfg)


def sampler_kept_set(rollout: RolloutConfig) -> tuple[int | None, float | None]:
    """(top_k, top_p) of the sampler as the fused ops take them, None where off."""
    return rollout.top_k or None, (None if rollout.top_p >= 1 else rollout.top_p)


def loss_kept_set(rollout: RolloutConfig) -> tuple[int | None, float | None]:
    """(top_k, top_p) of the distribution the loss computes log-probs over: rollout.train_on's."""
    return sampler_kept_set(rollout) if rollout.train_on == "sampler" else (None, None)


def _validate_engine(rollout: RolloutConfig) -> None:
    _choice("rollout.engine", rollout.engine, ("hf", "vllm"))
    _choice("rollout.correction", rollout.correction, CORRECTIONS)
    if not (rollout.correction_cap > 1 and math.isfinite(rollout.correction_cap)):
        _fail("rollout.correction_cap", f"must be > 1; got {rollout.correction_cap}")
    if rollout.engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        _fail("rollout.engine", "'vllm' needs the vllm extra: pip install 'fusedrl[vllm]' (on a CPU machine "
                                "scripts/test_vllm.sh builds that environment; docs/vllm.md)")
    if rollout.train_on == "full" and sampler_kept_set(rollout) != (None, None):
        # vLLM's log-probs are of its kept set, the loss's of the whole vocabulary: the correction would
        # weigh every token by the mass the kept set dropped.
        _fail("rollout.train_on", "must be sampler with rollout.engine=vllm and rollout.top_k or top_p set: "
                                  "vLLM's log-probs are of its kept set; got full")
    _positive("rollout.vllm.kv_cache_gib", rollout.vllm.kv_cache_gib)


def _validate_ppo(cfg: Config) -> None:
    ppo = cfg.ppo
    for key in ("gamma", "lam"):
        if not 0 <= getattr(ppo, key) <= 1:
            _fail(f"ppo.{key}", f"must be in [0, 1]; got {getattr(ppo, key)}")
    _choice("ppo.kl_penalty", ppo.kl_penalty, ("reward", "loss"))
    if ppo.reward_clip is not None:
        _positive("ppo.reward_clip", ppo.reward_clip)
    if ppo.value_clip is not None:
        _positive("ppo.value_clip", ppo.value_clip)
    _positive("ppo.critic_lr", ppo.critic_lr)
    if not 0 <= ppo.reference_ema <= 1:
        _fail("ppo.reference_ema", f"must be in [0, 1]; got {ppo.reference_ema}")
    if ppo.reference_ema > 0 and cfg.model.reference != "policy":
        _fail("ppo.reference_ema", "moves the reference toward the policy: needs model.reference=policy")
    if cfg.advantage.dynamic_sampling or cfg.advantage.overlong_buffer:
        _fail("advantage.dynamic_sampling" if cfg.advantage.dynamic_sampling else "advantage.overlong_buffer",
              "is GRPO's group shaping; ppo does not use it")


def _validate_spo(cfg: Config) -> None:
    spo, rollout = cfg.spo, cfg.rollout
    if cfg.advantage.dynamic_sampling or cfg.advantage.overlong_buffer:
        _fail("advantage.dynamic_sampling" if cfg.advantage.dynamic_sampling else "advantage.overlong_buffer",
              "is GRPO's group shaping; spo does not use it")
    if cfg.run.algorithm == "spo_chain":
        _at_least("spo.num_continuations", spo.num_continuations, 1)
        _fraction("spo.cutpoint_threshold", spo.cutpoint_threshold)
        _at_least("spo.cutpoint_interval", spo.cutpoint_interval, 1)
        return
    if not spo.tree_branching or min(spo.tree_branching) < 1:
        _fail("spo.tree_branching", f"must be a non-empty list of counts >= 1; got {spo.tree_branching}")
    if len(spo.tree_level_tokens) != len(spo.tree_branching) - 1:
        _fail("spo.tree_level_tokens", f"needs one count per level but the last ({len(spo.tree_branching) - 1}); "
                                       f"got {spo.tree_level_tokens}")
    if spo.tree_level_tokens and min(spo.tree_level_tokens) < 1:
        _fail("spo.tree_level_tokens", f"counts must be >= 1; got {spo.tree_level_tokens}")
    if sum(spo.tree_level_tokens) >= rollout.max_new_tokens:
        _fail("spo.tree_level_tokens", f"must leave tokens for the last level: sum < rollout.max_new_tokens "
                                       f"({rollout.max_new_tokens}); got {sum(spo.tree_level_tokens)}")
