"""What every training loop shares: set-up from the config, evaluation, logging, checkpoints, the end.

A loop (grpo.py, ppo.py, spo.py) builds a Session, makes its optimizer, calls `restore`, then for
each step in `steps()` does its own rollout / reward / update and hands its metrics to `end_step`,
which adds held-out evaluation, peak memory and checkpoints. `finish` evaluates, plots and summarises.

Under torchrun the session is one rank of a data-parallel run (engine/distributed.py): `prepare`
shards the policy, the reference and the critic with FSDP2; each step's prompts are drawn in the same
order on every rank and each rank samples its contiguous share of them (a group's responses stay on
one rank), every prompt with its own sampling seed, so that the responses do not depend on the number
of ranks; evaluation is shared out the same way; the main rank logs, the checkpoints are sharded.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from omegaconf import OmegaConf
from transformers.utils import logging as hf_logging

from fusedrl.engine import checkpoint, distributed, rollout
from fusedrl.engine.config import RESUME_SAFE_KEYS, Config, config_changes, to_dict
from fusedrl.engine.errors import UsageError
from fusedrl.engine.data import PromptSampler, load_splits, load_task
from fusedrl.engine.metrics_log import MetricLogger, peak_memory_bytes
from fusedrl.engine.model import DTYPES, load_policy, load_reference
from fusedrl.engine.optim import StepGuard, decay
from fusedrl.engine.packing import use_packing
from fusedrl.engine.plots import describe_fit, write_plots
from fusedrl.engine.rewards import load_reward, score
from fusedrl.engine.samplers import make_sampler
from fusedrl.engine.warm_start import warm_start


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("run.device 'cuda': no CUDA device is available")
    return torch.device(name)


def make_scheduler(optimizer, cfg: Config, total_updates: int):
    """Linear warmup over optim.warmup_steps, then constant, linear or cosine decay to 0."""
    warmup, kind = cfg.optim.warmup_steps, cfg.optim.schedule

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        return decay(min(1.0, (update - warmup) / max(1, total_updates - warmup)), kind)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Session:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        # The console shows one progress bar, the run's; save_pretrained's per-shard bars would interleave.
        hf_logging.disable_progress_bar()
        # Wall time from the process's start (interpreter and imports included); CPU time likewise.
        self._started = psutil.Process().create_time()
        run = cfg.run
        if run.num_threads:
            torch.set_num_threads(run.num_threads)
        self.world = distributed.init(resolve_device(run.device))
        self.device = self.world.device
        if cfg.rollout.prompts_per_step < self.world.size:
            raise UsageError(f"rollout.prompts_per_step {cfg.rollout.prompts_per_step} is smaller than the number "
                             f"of ranks ({self.world.size}): every rank samples at least one prompt")
        self.output_dir = Path(run.output_dir)
        held = _held_run(self.output_dir)
        if held and not run.resume and not run.overwrite:
            raise UsageError(f"run.output_dir {str(self.output_dir)!r} holds a run ({held}): continue it with "
                             f"run.resume=latest, start a new one with another run.output_dir, or replace it "
                             f"with run.overwrite=true")
        self.resume_from = checkpoint.find_checkpoint(run.resume, self.output_dir) if run.resume else None
        self.state = checkpoint.load_state(self.resume_from, self.world) if self.resume_from else None
        if self.state is not None:
            self._check_resumed_config()
        _seed_everything(run.seed)

        # A sharded checkpoint holds no transformers directory: the model is built from model.path and
        # its shards are loaded in `restore`.
        sharded_resume = self.resume_from is not None and self.world.sharded
        path = str(self.resume_from) if self.resume_from and not sharded_resume else cfg.model.path
        with checkpoint.reading(self.resume_from):
            self.model, self.tokenizer = load_policy(cfg.model, path, self.device)
        self.packed = use_packing(self.model, cfg.optim.micro_batch_layout, path)  # packed or padded micro-batches
        context = getattr(self.model.config, "max_position_embeddings", None)
        needed = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        if context is not None and needed > context:
            raise UsageError(f"data.max_prompt_length + rollout.max_new_tokens = {needed} tokens exceeds the "
                             f"model's context of {context} (max_position_embeddings)")
        self.train_split, self.eval_split = load_splits(cfg.data, self.tokenizer, run.seed)
        self.task = load_task(cfg.data.task) if cfg.data.task else None
        self.reward_fn = self._reward_fn()
        self.prompt_order = PromptSampler(len(self.train_split), run.seed)
        reference_path = None
        if self.resume_from is not None and cfg.model.reference == "policy" and not sharded_resume:
            reference_path = str(self.resume_from / "reference")
        with checkpoint.reading(self.resume_from):
            self.reference = load_reference(cfg.model, self.model, self.device, reference_path)
        if self.packed and self.reference is not None:
            use_packing(self.reference, "packed", reference_path or cfg.model.reference)
        # The sampler (rollout.engine) starts from the loaded policy: a resumed run's checkpoint.
        self.sampler = make_sampler(cfg, self.model, self.tokenizer)
        self.sampler.sync_weights(self.model)
        self.start_step = self.state["step"] if self.state else 0
        self.extra = dict(self.state["extra"]) if self.state else {}
        # The run's wall time in the processes before this one, up to the checkpoint it resumes from.
        self._wall_before = self.extra.get("wall_seconds", 0.0)
        self.step_guard = StepGuard(cfg.optim.max_skipped_steps)
        self.critic = self.critic_optimizer = None  # PPO's, given to `prepare` and set by the loop
        self.logger = None
        if self.world.main:
            # Created only now, once the model and data have loaded: a usage error leaves no empty directory.
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if held and not run.resume:  # run.overwrite: the old run's checkpoints must not outlive it
                checkpoint.remove_checkpoints(self.output_dir)
            (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            self.logger = MetricLogger(run, self.output_dir, self.start_step, OmegaConf.to_container(
                OmegaConf.structured(cfg)))
        self.world.barrier()  # the output directory exists before any rank writes a checkpoint
        self._last_saved = None

    def _check_resumed_config(self) -> None:
        """Says which settings differ from the checkpoint's; refuses the ones that break exact resume
        unless run.allow_config_changes is set."""
        saved = self.state["extra"].get("config")
        if saved is None:  # a checkpoint written before checkpoints kept their config
            return
        changes = config_changes(saved, self.cfg)
        if not changes:
            return
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
        breaking = [k for k, *_ in changes if k not in RESUME_SAFE_KEYS]
        if breaking and not self.cfg.run.allow_config_changes:
            raise UsageError(f"run.resume: settings differ from the checkpoint's ({listed}); {', '.join(breaking)} "
                             "would make the resumed run differ from an uninterrupted one: set them back, or set "
                             "run.allow_config_changes=true to accept that")
        print(f"fusedrl: resuming with changed settings: {listed}", file=sys.stderr)

    def _reward_fn(self):
        spec = self.cfg.reward.function
        if spec == "task":
            return self.task.reward
        if spec == "math":
            from fusedrl.engine.rewards.math_answer import reward

            return reward
        return load_reward(spec)

    def print(self, message: str) -> None:
        if self.logger is not None:
            self.logger.print(message)

    def prepare(self, make_critic=None) -> None:
        """On a fresh run the supervised warm start; then the critic (`make_critic(session)`, PPO), FSDP2
        on every model under torchrun, and on a fresh run the held-out accuracy before RL."""
        fresh = self.state is None
        if fresh and self.cfg.warm_start.steps:
            # Before sharding: every rank trains its full copy on the same batches (the same seed).
            rows = [{"prompt": p, **{k: v[i] for k, v in self.train_split.columns.items()}}
                    for i, p in enumerate(self.train_split.prompts)]
            steps = self.cfg.warm_start.steps
            seconds, loss = warm_start(
                self.model, self.tokenizer, self.task, rows, self.cfg.warm_start,
                report=lambda step, loss, s: self.print(f"warm start: step {step}/{steps}, loss {loss:.3f}, {s:.0f} s"))
            self.sampler.sync_weights(self.model)
            self.print(f"warm start: {self.cfg.warm_start.steps} supervised steps in {seconds:.0f} s, "
                              f"final loss {loss:.3f}")
            if self.reference is not None and self.cfg.model.reference == "policy":
                # The reference is the policy RL starts from, the warm-started one: a copy of the
                # untrained model would put a KL of several nats on every token from step 1.
                self.reference.load_state_dict(self.model.state_dict())
        if make_critic is not None:
            self.critic = make_critic(self)  # a copy of the policy's backbone is taken unsharded
        if self.world.sharded:
            dtype, offload = DTYPES[self.cfg.model.dtype], self.cfg.run.cpu_offload
            for model in (self.model, self.reference, self.critic):
                if model is not None:
                    distributed.shard(model, self.world, dtype, offload)
        if not fresh:
            self.print(f"resumed from {self.resume_from} at step {self.start_step}")
            return
        self.extra["eval_before"] = self.evaluate()
        if self.logger is not None:
            self.logger.log(0, dict(self.extra["eval_before"]))  # step 0: the held-out metrics before RL
        self.print(f"held-out accuracy before RL: {self.extra['eval_before']['eval/accuracy']:.3f} "
                          f"({self._decoding()})")

    def restore(self, optimizer, scheduler) -> None:
        """Optimizer, scheduler, prompt order and RNG states from the checkpoint being resumed (if any); under
        torchrun also the models' shards (the critic's with `critic_optimizer`, set before)."""
        if self.state is None:
            return
        if self.world.sharded:
            distributed.load_sharded(self.resume_from / checkpoint.SHARDS_DIR, self._sharded_parts(optimizer))
        else:
            optimizer.load_state_dict(self.state["optimizer"])
        scheduler.load_state_dict(self.state["scheduler"])
        self.prompt_order.load_state_dict(self.state["sampler"])
        checkpoint.set_rng_state(self.state["rng"])

    def steps(self):
        if self.device.type == "cuda":
            # Each step's memory/peak_bytes is its own: the first one's would include the warm start.
            torch.cuda.reset_peak_memory_stats(self.device)
        return range(self.start_step + 1, self.cfg.run.steps + 1)

    def score(self, prompts, completions, columns) -> tuple[torch.Tensor, int]:
        rewards, failures = score(self.reward_fn, prompts, completions, columns, self.cfg.reward.timeout_s)
        return torch.tensor(rewards, dtype=torch.float32), failures

    def next_prompts(self, count: int):
        """This rank's share of the next `count` training prompts (a Split) and each one's sampling seed,
        derived from the run's seed and the prompt's draw number: the same on any number of ranks."""
        first = self.prompt_order.position
        indices = self.prompt_order.next_indices(count)
        mine = self.world.share(count)
        seeds = [rollout.derive_seed(self.cfg.run.seed, _TRAIN, first + i) for i in mine]
        return self.train_split.select([indices[i] for i in mine]), seeds

    def generate(self, prompts, seeds: list[int]) -> rollout.Batch:
        """rollout.group_size responses to each of `prompts` (a Split) with the configured sampling, each
        prompt's from its seed; the responses of one prompt are adjacent rows."""
        r = self.cfg.rollout
        with self.sampler.generating():
            return self.sampler.generate(prompts.prompt_ids, r.group_size, temperature=r.temperature,
                                         max_new_tokens=r.max_new_tokens, seeds=seeds)

    def score_groups(self, prompts, completions: list[str]) -> tuple[torch.Tensor, int]:
        """Rewards of the responses `generate(prompts)` made, each scored against its own prompt's row."""
        repeat = [i for i in range(len(prompts)) for _ in range(self.cfg.rollout.group_size)]
        columns = {k: [v[i] for i in repeat] for k, v in prompts.columns.items()}
        return self.score([prompts.prompts[i] for i in repeat], completions, columns)

    def evaluate(self) -> dict:
        """Held-out accuracy (responses with reward >= 1), mean reward and length, each rank answering its
        share of the prompts (seeded per prompt); leaves the RNGs untouched."""
        cfg = self.cfg
        mine = self.world.share(len(self.eval_split))
        split = self.eval_split.select(list(mine))
        parts = ([], [], 0)  # a rank with no held-out prompt (fewer than ranks) still joins the collectives
        with self.sampler.generating():
            if len(split):
                batch = self.sampler.generate(split.prompt_ids, 1, temperature=cfg.eval.temperature,
                                              max_new_tokens=cfg.rollout.max_new_tokens,
                                              seeds=[rollout.derive_seed(cfg.run.seed, _EVAL, i) for i in mine])
                rewards, failures = self.score(split.prompts, rollout.decode(self.tokenizer, batch), split.columns)
                parts = (rewards.tolist(), batch.lengths().tolist(), failures)
        parts = self.world.gather(parts)
        rewards = torch.tensor([r for p in parts for r in p[0]])
        lengths = torch.tensor([n for p in parts for n in p[1]], dtype=torch.float32)
        return {"eval/accuracy": float((rewards >= 1).float().mean()), "eval/reward_mean": float(rewards.mean()),
                "eval/mean_length": float(lengths.mean()), "eval/reward_failures": sum(p[2] for p in parts)}

    def _decoding(self) -> str:
        t = self.cfg.eval.temperature
        return f"{len(self.eval_split)} prompts, " + ("greedy" if t == 0 else f"sampled at temperature {t}")

    def end_step(self, step: int, metrics: dict, optimizer, scheduler, parts=None) -> Path | None:
        """Syncs the sampler with the updated policy, adds evaluation and peak memory to the step's
        metrics, logs them, checkpoints when due.

        `parts(directory)` writes a loop's own parts of a checkpoint (PPO: the critic) into it before it
        is marked complete. Returns the checkpoint directory written at this step (None if none)."""
        cfg = self.cfg.run
        sync_seconds = self.sampler.sync_weights(self.model)
        if sync_seconds is not None:
            metrics["time/weight_sync_s"] = sync_seconds
        if self.cfg.eval.every and step % self.cfg.eval.every == 0 or step == cfg.steps:
            metrics.update(self.evaluate())
        # The largest rank's peak: the one that decides whether a run fits.
        metrics["memory/peak_bytes"] = self.world.max([peak_memory_bytes(self.device)])[0]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.logger is not None:
            self.logger.log(step, metrics)
        if cfg.save_every and step % cfg.save_every == 0 or step == cfg.steps:
            return self.save(step, optimizer, scheduler, parts)
        return None

    def _run_wall_seconds(self) -> float:
        return self._wall_before + time.time() - self._started

    def save(self, step: int, optimizer, scheduler, parts=None) -> Path:
        self.extra["wall_seconds"] = self._run_wall_seconds()
        self.extra["config"] = to_dict(self.cfg)
        directory = self.output_dir / f"checkpoint-{step}"
        if self.world.sharded:
            # The final policy is also exported as a transformers directory, gathered once.
            self._last_saved = checkpoint.save_sharded_checkpoint(
                directory, self.world, self._sharded_parts(optimizer), tokenizer=self.tokenizer,
                scheduler=scheduler, sampler=self.prompt_order, step=step, extra=self.extra,
                export=self.model if step == self.cfg.run.steps else None, export_dtype=DTYPES[self.cfg.model.dtype])
            return self._last_saved
        self._last_saved = checkpoint.save_checkpoint(
            directory, model=self.model, tokenizer=self.tokenizer,
            reference=self.reference if self.cfg.model.reference == "policy" else None,
            optimizer=optimizer, scheduler=scheduler, sampler=self.prompt_order, step=step, extra=self.extra,
            parts=parts)
        checkpoint.remove_old_checkpoints(self.output_dir, self.cfg.run.keep_checkpoints)
        return self._last_saved

    def _sharded_parts(self, optimizer) -> dict:
        parts = {"policy": (self.model, optimizer)}
        if self.reference is not None and self.cfg.model.reference == "policy":
            parts["reference"] = (self.reference, None)
        if self.critic is not None:
            parts["critic"] = (self.critic, self.critic_optimizer)
        return parts

    def finish(self) -> dict:
        """Plots, the entropy-law fit and summary.json; prints accuracy before / after RL (the main rank;
        the others return {})."""
        self.sampler.close()  # on every rank, before the process group it may share goes
        distributed.close(self.world)
        if self.logger is None:
            return {}
        history = self.logger.history()
        self.logger.close()
        plots, fit = write_plots(history, self.output_dir) if self.cfg.run.plots else ([], None)
        final = next((h for h in reversed(history) if "eval/accuracy" in h), {})
        before = self.extra.get("eval_before", {}).get("eval/accuracy")
        summary = {"steps": self.cfg.run.steps, "accuracy_before_rl": before,
                   "accuracy_after_rl": final.get("eval/accuracy"), "entropy_law_fit": fit,
                   "plots": [str(p) for p in plots], "checkpoint": str(self._last_saved),
                   "metrics": str(self.logger.path),
                   "wall_seconds": time.time() - self._started, "run_wall_seconds": self._run_wall_seconds(),
                   "cpu_seconds": time.process_time()}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if before is not None and summary["accuracy_after_rl"] is not None:
            self.logger.print(f"held-out accuracy ({self._decoding()}): {before:.3f} before RL -> "
                              f"{summary['accuracy_after_rl']:.3f} after RL "
                              f"({100 * (summary['accuracy_after_rl'] - before):+.1f} points)")
        if fit is not None:
            self.logger.print(describe_fit(fit))
        for p in plots:
            self.logger.print(f"plot: {p}")
        self.logger.print(f"metrics: {self.logger.path}  checkpoint: {self._last_saved}")
        wall = f"wall time {summary['wall_seconds']:.0f} s (start-up included)"
        if self.resume_from is not None:
            wall += f", {summary['run_wall_seconds']:.0f} s for the whole run since its first start"
        self.logger.print(f"{wall}, process CPU time {summary['cpu_seconds']:.0f} s")
        return summary


def _held_run(output_dir: Path) -> str:
    """What of a run `output_dir` holds (checkpoints, metrics), "" for none; a file there is an error."""
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == output_dir else f": {str(existing)!r}"
        raise UsageError(f"run.output_dir {str(output_dir)!r}{where} is a file, not a directory")
    if not output_dir.is_dir():
        return ""
    held = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        held.append(metrics.name)
    return ", ".join(held[:3] + (["..."] if len(held) > 3 else []))


_TRAIN, _EVAL = 0, 1  # derive_seed's stream tags: training prompts, held-out prompts


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
