"""The longest trainable response: peak RSS of one GRPO update against the response length L.

One GRPO update (a group of 4 responses of L tokens to one 64-token prompt: forward, backward and an
AdamW step) of a model with Qwen2.5-0.5B's configuration (24 layers, hidden 896, 14 query and 2
key-value heads, MLP 4864, vocabulary 151,936, tied embeddings; random fp32 weights from the config,
nothing downloaded), for L = 1k to 32k, three ways, each with gradient checkpointing and one sequence
per forward/backward (gradients accumulate over the 4), so that they differ only in the loss path:

- fusedrl: the engine's update (engine/update.py): packed micro-batches, the fused linear log-prob op.
- trl: TRL's GRPOTrainer.compute_loss on a prepared batch (its own loss path, which in TRL 1.16 goes
  through its chunked fused LM head, `add_fused_lm_head`), loss_type grpo.
- plain: full logits, log_softmax, gather and entropy in PyTorch, the GRPO loss.

Every (method, L) runs in its own subprocess under an address-space limit (RLIMIT_AS) and an RSS
watch that kills it past --rss-cap-gib, so the shared machine never runs out of memory; the lengths
run in order and a method stops at its first failure.

A 2-core CPU cannot do the arithmetic (one update at L = 32k is about 0.5 PFLOP), so by default it is
skipped (`--arithmetic skip`, SkipArithmetic below): every op on a big tensor allocates its output
(shape, dtype and strides from the op's meta implementation) and writes each of its memory pages once,
without computing it; ops on small tensors (lengths, masks, counts) run for real. Every tensor the
update allocates is still allocated, made resident and freed when it would be, so the peak RSS is the
update's own, less the kernels' internal scratch (MKL packing buffers, the flash kernel's per-thread
blocks). glibc is told to keep freed memory for reuse (MALLOC_ENV), so the peak RSS reported is the
allocator's high-water mark, as a caching allocator's would be. `--validate` compares
both modes at a size the CPU can compute (1 layer, L = 128).

Usage: python bench/longest_response.py [--lengths 1024 ... 32768] [--methods fusedrl trl plain]
       [--rss-cap-gib 16] [--layers 24] [--output docs/images/longest_response.png]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

PROMPT, GROUP = 64, 4
BIG = 1 << 18  # elements: ops on smaller tensors (lengths, masks, per-token values) run for real
# glibc keeps freed memory for reuse instead of returning it (no mmap, no trim), as PyTorch's CUDA
# caching allocator does: the chunk temporaries then fault their pages in once, not once per chunk
# (hours at L = 32k on this CPU). Peak RSS is then the allocator's high-water mark.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def _tensors(tree) -> list[torch.Tensor]:
    found = []
    tree_map(lambda t: found.append(t) if isinstance(t, torch.Tensor) else None, tree)
    return found


class SkipArithmetic(TorchDispatchMode):
    """Ops on big tensors allocate their outputs without computing them.

    An op that creates a tensor of at least BIG elements returns a tensor of the shape, dtype and strides
    its meta implementation gives, resident but not computed (`_resident`); an in-place or out= op on
    such tensors returns its destination untouched. Every smaller op runs for real, so the lengths,
    masks and counts the update reads on the host stay exact (values computed from skipped ones are
    garbage, which changes no allocation).
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            if sum(t.numel() for t in _tensors((args, kwargs))) < BIG:
                return func(*args, **kwargs)
            if "out" in kwargs:
                return kwargs["out"]
            return args[0] if func._schema.returns else None
        meta_args = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs))
        try:
            meta = func(*meta_args[0], **meta_args[1])
        except (NotImplementedError, RuntimeError):  # no meta kernel, or a data-dependent shape
            return func(*args, **kwargs)
        if sum(t.numel() for t in _tensors(meta)) < BIG:
            return func(*args, **kwargs)
        return tree_map(lambda m: _resident(m) if isinstance(m, torch.Tensor) else m, meta)


def _resident(meta: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like `meta` whose every memory page has been written once, so that it is
    resident as a computed result would be (a write per 4 KiB page: the page faults of a real result,
    not its bandwidth)."""
    t = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype)
    pages = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
    pages[::4096] = 0
    return t


def qwen25_05b(layers: int, length: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                         tie_word_embeddings=True, max_position_embeddings=PROMPT + length)
    return Qwen2ForCausalLM(config)


def _batch(length: int):
    from fusedrl.engine import rollout

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 151936, (GROUP, PROMPT + length), generator=gen)
    return rollout.make_batch([ids[0, :PROMPT].tolist()] * GROUP, ids[:, PROMPT:].tolist(), [False] * GROUP, 0, "cpu")


def run_fusedrl(model, length, optimizer):
    from fusedrl.engine.config import load_config
    from fusedrl.engine.distributed import World
    from fusedrl.engine.packing import use_packing
    from fusedrl.engine.update import make_loss, update

    _AlwaysSteps = _always_steps_guard()
    use_packing(model, "packed", "qwen2.5-0.5b config")
    cfg = load_config(None, ["loss.loss_type=grpo", f"data.max_prompt_length={PROMPT}",
                             f"rollout.max_new_tokens={length}", f"optim.micro_batch_tokens={PROMPT + length}"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    session = SimpleNamespace(cfg=cfg, model=model, reference=None, packed=True, step_guard=_AlwaysSteps(1),
                              world=World())
    update(session, make_loss(cfg), optimizer, scheduler, _batch(length), torch.tensor([1.0, -1.0, 0.5, -0.5]))


def _always_steps_guard():
    from fusedrl.engine.optim import StepGuard, clip_gradients

    class AlwaysSteps(StepGuard):
        """Steps whatever the gradient norm: with the arithmetic skipped the gradients are arbitrary bits
        (often NaN), and the engine's guard would skip the AdamW step whose state the peak must include."""

        def step(self, optimizer, max_norm):
            norm = clip_gradients(optimizer, max_norm)
            optimizer.step()
            return norm, True

    return AlwaysSteps


def run_trl(model, length, optimizer):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fusedrl.engine.model import demo_tokenizer

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=GROUP, num_generations=GROUP,
                          max_completion_length=length, report_to="none", use_cpu=True, save_strategy="no",
                          loss_type="grpo", beta=0.0, bf16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                              train_dataset=Dataset.from_dict({"prompt": ["x"] * GROUP}),
                              processing_class=demo_tokenizer())
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loop below accumulates
        batch = _batch(length)
        for row in range(GROUP):  # one sequence per forward, as the others
            inputs = dict(prompt_ids=batch.input_ids[row: row + 1, :PROMPT], prompt_mask=batch.attention_mask[row: row + 1, :PROMPT],
                          completion_ids=batch.completion_ids[row: row + 1],
                          completion_mask=batch.completion_mask[row: row + 1].long(),
                          advantages=torch.tensor([1.0, -1.0, 0.5, -0.5][row: row + 1]))
            (trainer.compute_loss(model, inputs) / GROUP).backward()
    optimizer.step()


def run_plain(model, length, optimizer):
    batch = _batch(length)
    for row in range(GROUP):
        logits = model(input_ids=batch.input_ids[row: row + 1], use_cache=False).logits[:, PROMPT - 1: -1]
        logp = logits.float().log_softmax(-1)
        lp = logp.gather(-1, batch.completion_ids[row: row + 1, :, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        ratio = torch.exp(lp - lp.detach())
        advantage = [1.0, -1.0, 0.5, -0.5][row]
        loss = (-advantage * ratio).mean() / GROUP
        (loss - 0.0 * entropy.mean()).backward()
    optimizer.step()


METHODS = {"fusedrl": run_fusedrl, "trl": run_trl, "plain": run_plain}


def child(method: str, length: int, layers: int, arithmetic: str, as_limit_gib: float) -> None:
    limit = int(as_limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(2)
    if arithmetic == "skip":  # random values are not needed: the weights' pages are made resident instead
        with SkipArithmetic():
            model = qwen25_05b(layers, length)
        for p in model.parameters():
            torch.empty(0, dtype=torch.uint8).set_(p.untyped_storage())[::4096] = 0
    else:
        model = qwen25_05b(layers, length)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    start = time.perf_counter()
    if arithmetic == "skip":
        with SkipArithmetic():
            METHODS[method](model, length, optimizer)
    else:
        METHODS[method](model, length, optimizer)
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def measure(method, length, layers, arithmetic, rss_cap_gib, as_limit_gib, timeout_s) -> dict:
    """Runs one (method, L) in a subprocess; kills it past rss_cap_gib of resident memory or timeout_s."""
    cmd = [sys.executable, __file__, "--child", method, str(length), str(layers), arithmetic, str(as_limit_gib)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONSAFEPATH": "1", **MALLOC_ENV})
    killed = []

    def watch():
        while proc.poll() is None:
            try:
                rss = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 2**20
            except (FileNotFoundError, IndexError):
                return
            if rss > rss_cap_gib:
                killed.append(f"RSS above {rss_cap_gib} GiB")
                proc.kill()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        killed.append(f"over {timeout_s} s")
    row = {"method": method, "length": length, "layers": layers, "arithmetic": arithmetic}
    if proc.returncode == 0:
        return row | {"status": "ok"} | json.loads(out.strip().splitlines()[-1])
    memory = killed or any(s in err for s in ("MemoryError", "DefaultCPUAllocator", "can't allocate", "std::bad_alloc"))
    last = [line for line in err.splitlines() if line and not line.startswith(" ")][-1:] or [""]
    reason = killed[0] if killed else ("out of memory (address-space limit)" if memory
                                       else f"exit status {proc.returncode}: {last[0]}")
    return row | {"status": "failed", "reason": reason}


def plot(rows: list[dict], cap_gib: float, path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, style in zip(METHODS, ("o-", "s-", "^-")):
        ok = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        failed = [r for r in rows if r["method"] == method and r["status"] != "ok"]
        line, = ax.plot([r["length"] for r in ok], [r["peak_rss_gib"] for r in ok], style, label=method)
        for r in failed:
            ax.plot([r["length"]], [cap_gib], "x", color=line.get_color(), markersize=10, mew=2)
    ax.axhline(cap_gib, color="grey", ls="--", lw=1)
    ax.text(ax.get_xlim()[0] if rows else 1, cap_gib, f" cap {cap_gib:g} GiB (x: out of memory)", va="bottom",
            color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("response length L (tokens; group of 4, prompt 64)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title(f"One GRPO update, Qwen2.5-0.5B config ({machine})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--arithmetic", choices=["skip", "real"], default="skip")
    parser.add_argument("--rss-cap-gib", type=float, default=16.0)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--validate", action="store_true",
                        help="compare peak RSS with and without the arithmetic, 1 layer, L = 128")
    parser.add_argument("--machine", default="2-core CPU sandbox, 24 GiB")
    parser.add_argument("--output", type=Path, default=Path("bench/results/longest_response-cpu.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/images/longest_response.png"))
    args = parser.parse_args(argv)
    as_limit = args.rss_cap_gib + 6  # address space above the resident cap: libraries, allocator reserves
    if args.validate:
        rows = [measure(m, 128, 1, a, args.rss_cap_gib, as_limit, args.timeout_s)
                for m in args.methods for a in ("real", "skip")]
        for r in rows:
            print(json.dumps(r), flush=True)
        args.output.with_name(args.output.stem + "-validation.json").write_text(json.dumps(rows, indent=1))
        return 0
    # Rows of earlier invocations (other methods or lengths) are kept, those measured now replaced.
    rows = json.loads(args.output.read_text())["rows"] if args.output.is_file() else []
    for method in args.methods:
        for length in args.lengths:
            row = measure(method, length, args.layers, args.arithmetic, args.rss_cap_gib, as_limit, args.timeout_s)
            rows = [r for r in rows if (r["method"], r["length"]) != (method, length)] + [row]
            print(json.dumps(row), flush=True)
            if row["status"] != "ok":
                break
    rows.sort(key=lambda r: (list(METHODS).index(r["method"]), r["length"]))
    args.output.write_text(json.dumps({"machine": args.machine, "rss_cap_gib": args.rss_cap_gib, "rows": rows},
                                      indent=1))
    plot(rows, args.rss_cap_gib, args.plot, args.machine)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, length, layers, arithmetic, as_limit = sys.argv[2:7]
        child(method, int(length), int(layers), arithmetic, float(as_limit))
    else:
        sys.exit(main())
