"""Padding-free micro-batches: whole sequences packed end to end, attention kept inside each sequence.

A packed micro-batch is one row of the batch's sequences (prompt + response, no padding) laid end to
end, up to `optim.micro_batch_tokens` tokens. Position ids restart at 0 at every sequence and the
attention never crosses a sequence boundary, so every token sees exactly what it would see alone.

Which sequences share a row: balanced bin packing by LPT (longest processing time first): the
sequences in decreasing length, each into the least-filled of k rows, k the fewest rows LPT fits the
batch into (starting from ceil(tokens / budget)). First-fit-decreasing would fill rows just as few, but
leaves a last row nearly empty and the others full; LPT keeps the rows within 4/3 of the best possible
longest row (Graham 1969), and the longest row sets a micro-batch's peak memory and its share of the
step's time. A sequence longer than the budget gets a row of its own.

The attention. transformers (5.25 checked) detects packed rows itself: with no attention mask, a
position id that does not follow its predecessor starts a new sequence (`find_packed_sequence_indices`),
but for SDPA it then builds a [1, 1, N, N] block-causal mask, an [tokens x tokens] tensor. Instead the
packed row runs through `packed_sdpa_attention`, registered with transformers' AttentionInterface: it
gets the boundaries as `cu_seq_lens_q` (flash-attention's variable-length convention, which
transformers passes from the model's keyword arguments to every attention call) and runs SDPA causally
on each sequence, so no mask is ever built; every call without boundaries (generate, padded
micro-batches) goes to transformers' own SDPA unchanged. With `flash-attn` installed (CUDA, 16-bit
weights) the model uses transformers' flash_attention_2 instead, which reads the same boundaries.
"""

from __future__ import annotations

import heapq
import importlib.util
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from fusedrl.engine.errors import UsageError

ATTENTION = "fusedrl_packed_sdpa"
LAYOUTS = ("auto", "packed", "padded")


def balanced_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `budget` tokens by LPT (module docstring); an
    item longer than the budget is a row of its own. Rows list their indices in increasing order;
    ties break by index, so the same lengths always give the same rows."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    alone = [[i] for i in order if lengths[i] > budget]
    rest = [i for i in order if lengths[i] <= budget]
    count = max(1, math.ceil(sum(lengths[i] for i in rest) / budget))
    while rest:
        rows: list[list[int]] = [[] for _ in range(count)]
        loads = [(0, b) for b in range(count)]  # a heap of (tokens, row): the least filled row on top
        for i in rest:
            load, b = heapq.heappop(loads)
            if load + lengths[i] > budget:  # it fits no row, the least filled included
                break
            rows[b].append(i)
            heapq.heappush(loads, (load + lengths[i], b))
        else:
            return alone + [sorted(r) for r in rows if r]
        count += 1
    return alone


@dataclass
class PackedRows:
    """One packed micro-batch: the sequences of batch rows `rows`, end to end in one row of N tokens.

    The loss and the critic read it in a [k, width] layout (one line per sequence, response token t in
    column t), the padded layout's, so that both layouts feed them the same tensors.
    """

    rows: torch.Tensor  # [k] batch rows, on the CPU
    input_ids: torch.Tensor  # [1, N] on the batch's device
    position_ids: torch.Tensor  # [1, N], restarting at 0 at each sequence
    cu_seq_lens: torch.Tensor  # [k + 1] int32 on the CPU: the sequence boundaries
    prompt_ends: list[int]  # packed position of each sequence's last prompt token
    response_lengths: list[int]
    width: int  # longest response among the rows (at least 1)

    @property
    def max_length(self) -> int:
        return int((self.cu_seq_lens[1:] - self.cu_seq_lens[:-1]).max())

    def attention_kwargs(self, on_device: bool) -> dict:
        """The boundaries as transformers' FlashAttentionKwargs; on the device for flash-attention, on the
        CPU for packed_sdpa_attention, which reads them on the host (no device sync per layer)."""
        cu = self.cu_seq_lens.to(self.input_ids.device) if on_device else self.cu_seq_lens
        return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=self.max_length, max_length_k=self.max_length)

    def token_index(self, columns: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed positions [R], flat [k * width] positions [R]) of response tokens, sequence by sequence:
        the hidden state at a packed position predicts the token at its flat position. columns[i]: the
        response columns of sequence i to take (increasing); default every response token."""
        packed, flat = [], []
        for i, (end, length) in enumerate(zip(self.prompt_ends, self.response_lengths)):
            cols = range(length) if columns is None else columns[i]
            packed.extend(end + t for t in cols)
            flat.extend(i * self.width + t for t in cols)
        device = self.input_ids.device
        return torch.tensor(packed, device=device), torch.tensor(flat, device=device)


@dataclass(frozen=True)
class SequenceLengths:
    """Each batch row's prompt and response token counts, read from the device once per batch."""

    prompt: list[int]
    response: list[int]

    @classmethod
    def of(cls, batch) -> SequenceLengths:
        lengths = torch.stack([batch.attention_mask[:, : batch.prompt_length].sum(1),
                               batch.completion_mask.sum(1)]).tolist()
        return cls(*lengths)

    def total(self, row: int) -> int:
        return self.prompt[row] + self.response[row]


def pack(batch, rows: torch.Tensor, lengths: SequenceLengths) -> PackedRows:
    """The packed row of batch rows `rows` ([left-padded prompt | right-padded response] layout)."""
    rows = torch.as_tensor(rows).cpu()
    p_width = batch.prompt_length
    row_index, col_index, positions, bounds, prompt_ends, responses = [], [], [], [0], [], []
    for r in rows.tolist():
        p, t = lengths.prompt[r], lengths.response[r]
        row_index.extend([r] * (p + t))
        col_index.extend(range(p_width - p, p_width + t))
        positions.extend(range(p + t))
        prompt_ends.append(bounds[-1] + p - 1)
        bounds.append(bounds[-1] + p + t)
        responses.append(t)
    device = batch.input_ids.device
    ids = batch.input_ids[torch.tensor(row_index, device=device), torch.tensor(col_index, device=device)]
    return PackedRows(rows, ids[None], torch.tensor(positions, device=device)[None],
                      torch.tensor(bounds, dtype=torch.int32), prompt_ends, responses, max(1, max(responses)))


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          sliding_window=None, cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """transformers' SDPA attention, run causally on each sequence of a packed row (cu_seq_lens_q),
    or unchanged when the call has no boundaries. query [1, heads, N, d], key / value [1, kv_heads, N, d]."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    if attention_mask is not None or query.shape[0] != 1 or bounds[-1] != query.shape[2]:
        raise ValueError(f"a packed row is one unmasked row of cu_seq_lens_q[-1] = {bounds[-1]} tokens, got query "
                         f"{tuple(query.shape)} with attention_mask {'set' if attention_mask is not None else 'None'}")
    if sliding_window is not None and max(b - a for a, b in zip(bounds, bounds[1:])) > sliding_window:
        raise ValueError(f"a packed sequence is longer than the sliding window ({sliding_window}); "
                         f"use padded micro-batches")
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                    dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
             for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts, dim=1), None


def _packed_sdpa_mask(*args, attention_mask=None, q_length=None, kv_length=None, **kwargs):
    """SDPA's mask, except for a full-length call without a 2D mask (a packed row, or a plain causal one):
    none, where transformers would build the packed row's [N x N] block mask."""
    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


AttentionInterface.register(ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(ATTENTION, _packed_sdpa_mask)


def packing_refusal(model) -> str | None:
    """Why `model`'s attention cannot run packed rows, or None when it can."""
    config = model.config
    if not model._can_set_attn_implementation():
        return "its attention does not go through transformers' AttentionInterface"
    if not model._supports_sdpa:
        return "it does not support SDPA attention"
    layer_types = set(getattr(config, "layer_types", None) or [])
    if layer_types - {"full_attention"}:
        return f"it has {', '.join(sorted(layer_types - {'full_attention'}))} layers, not only full attention"
    if not layer_types and getattr(config, "sliding_window", None) is not None:
        return f"it uses a sliding window of {config.sliding_window} tokens"
    return None


def _flash_attention(model) -> bool:
    """flash-attn's variable-length kernels are installed and fit the model (CUDA, 16-bit weights)."""
    weight = next(model.parameters())
    return (importlib.util.find_spec("flash_attn") is not None and weight.is_cuda
            and weight.dtype in (torch.float16, torch.bfloat16) and model._supports_flash_attn)


def use_packing(model, layout: str, name: str) -> bool:
    """Resolves optim.micro_batch_layout for `model` (called `name` in messages): True for packed
    micro-batches, after switching the model to an attention that runs them. "packed" refuses a model
    that cannot pack; "auto" packs where it can."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "padded":
        return False
    refusal = packing_refusal(model)
    if refusal is not None:
        if layout == "packed":
            raise UsageError(f"optim.micro_batch_layout=packed: model {name!r} ({type(model).__name__}) cannot run "
                             f"packed micro-batches: {refusal}; use optim.micro_batch_layout=padded")
        return False
    model.set_attn_implementation("flash_attention_2" if _flash_attention(model) else ATTENTION)
    return True
