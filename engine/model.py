"""Policy and reference models, the built-in demo model, and the fused-path forward.

The engine never asks a model for logits during training: it runs the backbone to its final hidden
states and hands them, with the output embedding's weight (and bias), to the fused log-prob ops.
`token_logprobs` does that for a no-grad pass (old policy, reference), the loop does it with grad.
A micro-batch is either padded ([left-padded prompt | right-padded response] rows: `completion_hidden`)
or packed (engine/packing.py: `packed_hidden`, `packed_token_logprobs`).
"""

from __future__ import annotations

import copy
import string
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from fusedrl.engine.config import ModelConfig
from fusedrl.engine.distributed import backbone_hidden
from fusedrl.engine.errors import UsageError
from fusedrl.engine.packing import ATTENTION, PackedRows
from fusedrl.kernels import linear_logprobs_and_entropy

BUILTIN_DEMO = "builtin:demo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# Config attributes that change the logits after the output projection; the fused path would
# silently compute the wrong distribution for such models.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


class ModelError(UsageError):
    """A model path that does not hold a usable causal LM."""


def demo_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built with the tokenizers library."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def demo_model(cfg: ModelConfig, tokenizer) -> LlamaForCausalLM:
    """A tiny Llama (about a million parameters at the defaults) initialised from the torch RNG."""
    d = cfg.demo
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d.hidden_size,
                         intermediate_size=d.intermediate_size, num_hidden_layers=d.num_layers,
                         num_attention_heads=d.num_heads, num_key_value_heads=d.num_heads,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def load_policy(cfg: ModelConfig, path: str, device: torch.device):
    """(model, tokenizer) from a local directory, or the demo model when path is builtin:demo."""
    if path == BUILTIN_DEMO:
        tokenizer = demo_tokenizer()
        model = demo_model(cfg, tokenizer)
    else:
        model, tokenizer = _load_local(path, cfg.dtype, key="model.path")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device=device, dtype=DTYPES[cfg.dtype])
    _check_fused_compatible(model, path)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def load_reference(cfg: ModelConfig, policy, device: torch.device, path: str | None = None):
    """The frozen reference: None, a copy of the initial policy, or a local model."""
    source = path or cfg.reference
    if source is None:
        return None
    if source == "policy":
        reference = copy.deepcopy(policy)
    else:
        reference, _ = _load_local(source, cfg.dtype, key="model.reference")
        reference.to(device=device, dtype=DTYPES[cfg.dtype])
        _check_fused_compatible(reference, source)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def _load_local(path: str, dtype: str, key: str):
    directory = Path(path)
    if not directory.is_dir():
        raise ModelError(f"{key} {path!r}: no such directory (a local transformers model directory or "
                         f"{BUILTIN_DEMO} is expected; nothing is downloaded)")
    if not (directory / "config.json").is_file():
        raise ModelError(f"{key} {path!r}: not a transformers model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{key} {path!r}: cannot load a causal LM and its tokenizer: {e}") from None
    return model, tokenizer


def _check_fused_compatible(model, path: str) -> None:
    for name in _LOGIT_TRANSFORMS:
        if getattr(model.config, name, None) not in (None, 1, 1.0):
            raise ModelError(f"model {path!r} transforms its logits ({name}); the fused linear path "
                             f"computes plain h @ W.T + b and would train the wrong distribution")
    if model.get_output_embeddings() is None:
        raise ModelError(f"model {path!r} has no output embedding (get_output_embeddings() is None)")


def output_projection(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's weight [V, H] and bias [V] (or None): the fused ops' inputs. Under FSDP2,
    called after the root's forward, while the root unit (which holds them) is unsharded."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, L, H] after the last norm, with left-padding-aware positions."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    # Under FSDP2 the backbone runs as the sharded root's registered forward, which gathers the
    # embedding, final norm and output embedding (engine/distributed.py).
    forward = getattr(model, "fusedrl_hidden", None)
    if forward is None:
        return backbone_hidden(model, input_ids, attention_mask, position_ids)
    return forward(input_ids, attention_mask, position_ids)


def completion_hidden(model, input_ids, attention_mask, prompt_length: int, completion_length: int):
    """Hidden states that predict the completion tokens: positions prompt_length - 1 onwards."""
    hidden = final_hidden(model, input_ids, attention_mask)
    return hidden[:, prompt_length - 1: prompt_length - 1 + completion_length]


@torch.no_grad()
def token_logprobs(model, batch, temperature: float, backend: str = "auto", *, top_k: int | None = None,
                   top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (lp, H) [B, T] of `batch`'s completion tokens under `model`, without building logits; with
    top_k / top_p, of the sampler's kept set (the fused op's)."""
    hidden = completion_hidden(model, batch.input_ids, batch.attention_mask, batch.prompt_length,
                               batch.completion_ids.shape[1])
    weight, bias = output_projection(model)
    return linear_logprobs_and_entropy(hidden, weight, batch.completion_ids, bias=bias, temperature=temperature,
                                       backend=backend, top_k=top_k, top_p=top_p)


def packed_hidden(model, micro: PackedRows) -> torch.Tensor:
    """Final hidden states [1, N, H] of a packed row; `model` is a causal LM or a bare backbone (the
    critic's). Positions restart at each sequence and the attention stays inside it (engine/packing.py)."""
    backbone = getattr(model, model.base_model_prefix, model)
    implementation = model.config._attn_implementation
    flash = implementation.startswith("flash_attention")
    if not flash and implementation != ATTENTION:
        # transformers' own SDPA would build an [N x N] block mask for the packed row.
        raise ValueError(f"a packed forward needs the packing attention (engine.packing.use_packing), "
                         f"the model has {implementation!r}")
    inputs = dict(input_ids=micro.input_ids, position_ids=micro.position_ids, use_cache=False,
                  **micro.attention_kwargs(on_device=flash))
    # Under FSDP2 through the sharded root's registered forward, which gathers the embedding and the
    # final norm (engine/distributed.py); calling the backbone directly would skip the root's hooks.
    forward = getattr(model, "fusedrl_backbone", None)
    return backbone(**inputs).last_hidden_state if forward is None else forward(**inputs)


@torch.no_grad()
def packed_token_logprobs(model, micro: PackedRows, temperature: float, backend: str = "auto", *,
                          top_k: int | None = None,
                          top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (lp, H, flat index), each [R], of every response token of a packed row: the fused op sees the
    response tokens' hidden states only. The flat index places them in the [k, micro.width] layout."""
    packed, flat = micro.token_index()
    hidden = packed_hidden(model, micro)[0, packed]
    weight, bias = output_projection(model)
    targets = micro.input_ids[0, packed + 1]  # the token each hidden state predicts: the next one in its sequence
    lp, entropy = linear_logprobs_and_entropy(hidden, weight, targets, bias=bias, temperature=temperature,
                                              backend=backend, top_k=top_k, top_p=top_p)
    return lp, entropy, flat
