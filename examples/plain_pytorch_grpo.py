"""GRPO in plain PyTorch with fusedrl's fused policy loss.

A training loop you can read top to bottom: sample a group of completions per prompt, score them,
turn rewards into group-relative advantages, and take a few clipped policy-gradient steps. The loss is
`fusedrl.FusedPolicyLoss` fed with the model's final hidden states and its output embedding, so the
per-token log-probabilities and entropies come from one fused pass over the vocabulary and the
[tokens x vocab] logits are never built, neither for the loss nor for the rollout-time log-probs
(`fusedrl.kernels.linear_logprobs_and_entropy`).

By default the policy is a tiny Qwen2 built from a config with a character tokenizer built in memory,
so the script runs in seconds on a CPU and downloads nothing; `--model PATH` points it at a local
Hugging Face causal LM instead. The toy task rewards completions made of digits.

    python examples/plain_pytorch_grpo.py --steps 20
    python examples/plain_pytorch_grpo.py --model /path/to/Qwen2.5-0.5B-Instruct --device cuda
"""

from __future__ import annotations

import argparse

import torch
from fusedrl.kernels import linear_logprobs_and_entropy
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from fusedrl import FusedPolicyLoss

PROMPTS = ["1+2=", "7+5=", "3+3=", "9+4=", "2+8=", "6+1="]
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="local model directory; default: a tiny model from a config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="rollout + update rounds")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4, help="completions sampled per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--updates-per-rollout", type=int, default=2, help="optimizer steps on each rollout batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss-type", default="dapo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    parser.add_argument("--top-entropy-fraction", type=float, default=1.0, help="train on the top-rho entropy tokens")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_policy(path: str | None, device: str):
    """A local causal LM and its tokenizer, or a tiny random Qwen2 with a character tokenizer."""
    if path is not None:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model.to(device), tokenizer
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARACTERS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).to(device), tokenizer


def reward_digits(completions: list[str]) -> list[float]:
    """Toy reward: the fraction of non-space characters that are digits."""
    rewards = []
    for text in completions:
        chars = [c for c in text if not c.isspace()]
        rewards.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return rewards


@torch.no_grad()
def rollout(model, tokenizer, prompts, args):
    """Sample `group_size` completions per prompt; return ids, masks and decoded texts."""
    batch = tokenizer([p for p in prompts for _ in range(args.group_size)], return_tensors="pt", padding=True)
    batch = batch.to(args.device)
    sequences = model.generate(
        **batch, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
        max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    prompt_len = batch["input_ids"].size(1)
    completion_ids = sequences[:, prompt_len:]
    # A completion is valid up to and including its first end-of-sequence token.
    is_eos = completion_ids == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    completion_ids = completion_ids.masked_fill(after_eos, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return batch["input_ids"], batch["attention_mask"], completion_ids, completion_mask, texts


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, divided by the group's std (+ eps)."""
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.view(-1)


def completion_hidden_states(model, input_ids, attention_mask, completion_len: int) -> torch.Tensor:
    """Final hidden states at the positions that predict the completion tokens: [B, C, H]."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden[:, -completion_len - 1 : -1]


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy(args.model, args.device)
    head = model.get_output_embeddings()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = FusedPolicyLoss(
        loss_type=args.loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        top_entropy_fraction=args.top_entropy_fraction,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
    )

    log: dict[str, float] = {}
    for step in range(args.steps):
        # 1. Rollout: a group of completions for each prompt.
        prompts = [PROMPTS[(step * args.prompts_per_step + i) % len(PROMPTS)] for i in range(args.prompts_per_step)]
        model.eval()
        prompt_ids, prompt_mask, completion_ids, completion_mask, texts = rollout(model, tokenizer, prompts, args)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        completion_len = completion_ids.size(1)

        # 2. Reward and 3. advantage.
        rewards = torch.tensor(reward_digits(texts), device=args.device)
        advantages = group_advantages(rewards, args.group_size)

        # Rollout-time log-probs for the ratio, from the fused linear op as well.
        model.train()
        with torch.no_grad():
            hidden = completion_hidden_states(model, input_ids, attention_mask, completion_len)
            targets = completion_ids.masked_fill(completion_mask == 0, -100)
            old_logprobs, _ = linear_logprobs_and_entropy(
                hidden, head.weight, targets, bias=head.bias, temperature=args.temperature
            )

        # 4. Loss and 5. optimizer steps on this rollout batch.
        for _ in range(args.updates_per_rollout):
            hidden = completion_hidden_states(model, input_ids, attention_mask, completion_len)
            loss, metrics = loss_fn(
                completion_ids,
                completion_mask,
                advantages,
                hidden=hidden,
                weight=head.weight,
                bias=head.bias,
                old_logprobs=old_logprobs,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        # 6. Log.
        log = {
            "loss/pg": loss.item(),
            "reward/mean": rewards.mean().item(),
            "completions/mean_length": completion_mask.sum(dim=1).float().mean().item(),
            **{name: float(value) for name, value in metrics.items()},
        }
        print(f"step {step:3d}  " + "  ".join(f"{k} {v:.4f}" for k, v in log.items()))
    return log


if __name__ == "__main__":
    main()
