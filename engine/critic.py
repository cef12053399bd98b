"""The PPO critic: a transformer backbone and a scalar value head, never the LM head.

The backbone is either a deep copy of the policy's own backbone (`ValueModel.from_policy`) or a separate
model read from a local path (`ValueModel.from_pretrained`, any transformers model that `AutoModel` loads).
Only the final hidden states feed the head Linear(H, 1): no vocabulary-sized tensor is ever built, so the
critic's memory is that of the backbone alone.
"""

import copy
from pathlib import Path

import torch
from torch import nn

from fusedrl.engine.model import packed_hidden
from fusedrl.engine.packing import PackedRows

HEAD_FILE = "value_head.pt"


class ValueModel(nn.Module):
    """V(s_t) for every response token t: the state is the prompt and the response before token t."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        # A zero head starts every value at 0, the natural baseline for rewards in [0, 1] with gamma = 1,
        # and keeps the first updates from pushing noise into the backbone.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> "ValueModel":
        """A critic on its own copy of a causal LM's backbone (`policy.base_model`, without lm_head)."""
        backbone = getattr(policy, "base_model", None)
        if backbone is None or backbone is policy:
            raise ValueError("policy must be a transformers causal LM whose base_model is its backbone")
        backbone = copy.deepcopy(backbone)
        backbone.requires_grad_(True)
        return cls(backbone, policy.config.hidden_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "ValueModel":
        """A critic on a separate model: the backbone of the local checkpoint at `path`.

        A directory written by `save_pretrained` of this class also holds the value head, which is loaded.
        """
        from transformers import AutoModel

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"critic model path {str(path)!r} is not a directory")
        backbone = AutoModel.from_pretrained(path, **kwargs)
        model = cls(backbone, backbone.config.hidden_size)
        head = path / HEAD_FILE
        if head.exists():
            model.head.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
        return model

    def save_pretrained(self, path: str | Path) -> None:
        """Backbone with `save_pretrained` (safetensors) and the head beside it."""
        path = Path(path)
        self.backbone.save_pretrained(path)
        torch.save(self.head.state_dict(), path / HEAD_FILE)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                completion_length: int) -> torch.Tensor:
        """Values [B, T] (float32) of the T completion tokens of [left-padded prompt | response] rows.

        The value of response token t is read at column prompt_length - 1 + t, the state it is chosen
        in (the same shift as its log-prob). Positions count only attended tokens, as in generation.
        """
        if not 0 < prompt_length or prompt_length + completion_length > input_ids.shape[1] + 1:
            raise ValueError(f"prompt_length {prompt_length} and completion_length {completion_length} do "
                             f"not fit input_ids of length {input_ids.shape[1]}")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        hidden = out.last_hidden_state[:, prompt_length - 1: prompt_length - 1 + completion_length]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def packed_forward(self, micro: PackedRows) -> torch.Tensor:
        """Values [k, micro.width] (float32, 0 past each response) of a packed micro-batch's response
        tokens, read where `forward` reads them: at the hidden state that predicts each token."""
        packed, flat = micro.token_index()
        hidden = packed_hidden(self.backbone, micro)[0, packed]
        values = self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()
        out = values.new_zeros(len(micro.rows) * micro.width).index_put((flat,), values)
        return out.view(len(micro.rows), micro.width)
