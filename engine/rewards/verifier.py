"""Soft rewards from a generative verifier (Su et al. 2025; docs/algorithms.md section 6).

A causal LM reads a prompt built from the question, the reference answer and the final line of the
response, and its first output token answers YES or NO. With pi the verifier's softmax over the
whole vocabulary at that first output position:

    judged YES  if pi(YES) >= pi(NO)   (greedy decoding restricted to the two answers; a tie is YES)
    soft reward r = pi(YES)      if judged YES
                  = 1 - pi(NO)   if judged NO
    binary      r = 1 if judged YES else 0

When pi(YES) + pi(NO) = 1 both branches equal pi(YES); they differ exactly by the probability the
verifier puts on other tokens, which the soft reward counts as partial credit on the side it judged.
Optionally the rewards are z-scored over the batch, (r - mean) / std with the population std, and
all set to 0 when the std is 0 (below 1e-9: equal rewards whose mean is off by a rounding error).
The paper z-scores (it trains with RLOO); that is off by default here because GRPO-style
advantages already normalise per group and logged reward means stay readable.

The verifier runs in eval mode under torch.inference_mode, in batches, left-padded with position
ids that skip the padding, so a padded row gives the same probabilities as the row alone.
"""

import inspect
import string

import torch

DEFAULT_TEMPLATE = (
    "Judge whether the response reaches the reference answer.\n"
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Response (final line): {response}\n"
    "Is the response correct? Answer YES or NO.\n"
)
_FIELDS = {"question", "reference", "response"}


def final_line(response: str) -> str:
    """The last non-blank line of a response, stripped; empty when there is none."""
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def soft_rewards(probs: torch.Tensor, mode: str = "soft", zscore: bool = False) -> torch.Tensor:
    """Rewards from first-token probabilities `probs` [B, 2] = (pi(YES), pi(NO)); see the module doc."""
    p_yes, p_no = probs[:, 0], probs[:, 1]
    judged_yes = p_yes >= p_no
    if mode == "soft":
        rewards = torch.where(judged_yes, p_yes, 1 - p_no)
    elif mode == "binary":
        rewards = judged_yes.to(probs.dtype)
    else:
        raise ValueError(f'mode must be "soft" or "binary", got {mode!r}')
    if zscore:
        std = rewards.std(unbiased=False)
        rewards = torch.zeros_like(rewards) if std < 1e-9 else (rewards - rewards.mean()) / std
    return rewards


class VerifierReward:
    """Reward function (fusedrl.engine.rewards interface) scored by a generative verifier.

    Args:
        model: a local directory holding a causal LM (loaded with local_files_only, never
            downloaded) or a loaded model whose forward takes input_ids, attention_mask and
            position_ids and returns `.logits`.
        tokenizer: required with a model object; loaded from the directory otherwise.
        template: str.format template with {question}, {reference} and {response} (the final line).
        yes_token, no_token: the answers, each one token as the verifier's first output token, given
            as text or as a token id.
        mode: "soft" (the paper's reward) or "binary" (1 if judged YES).
        zscore: z-score the rewards over the batch.
        answer_column: the dataset column with the reference answers; questions are the prompts.
        batch_size: rows per verifier forward pass.
        chat_template: wrap the prompt as a user turn with the tokenizer's chat template.
        device, dtype: where and in which precision to load a model given by path.
    """

    __name__ = "verifier"

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        template: str = DEFAULT_TEMPLATE,
        yes_token: str | int = "YES",
        no_token: str | int = "NO",
        mode: str = "soft",
        zscore: bool = False,
        answer_column: str = "answer",
        batch_size: int = 16,
        chat_template: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        if fields != _FIELDS:
            raise ValueError(f"template must use exactly the fields {sorted(_FIELDS)}, got {sorted(fields)}")
        if mode not in ("soft", "binary"):
            raise ValueError(f'mode must be "soft" or "binary", got {mode!r}')
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=dtype).to(device)
        elif tokenizer is None:
            raise ValueError("tokenizer is required when model is a model object rather than a path")
        self.model = model.eval()
        self.tokenizer = tokenizer
        # Only the last position's logits are read. transformers' causal LMs can skip the others
        # (logits_to_keep=1): [B, L, V] logits are gigabytes for a 7B verifier's vocabulary on a GPU.
        self._last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.token_ids = [self._token_id(yes_token, "yes_token"), self._token_id(no_token, "no_token")]
        if self.token_ids[0] == self.token_ids[1]:
            raise ValueError(f"yes_token and no_token map to the same token id {self.token_ids[0]}")
        self.template, self.mode, self.zscore = template, mode, zscore
        self.answer_column, self.batch_size, self.chat_template = answer_column, batch_size, chat_template
        self.last_probabilities = torch.empty(0, 2, dtype=torch.float64)

    def _token_id(self, token: str | int, name: str) -> int:
        if isinstance(token, int):
            ids = [token]
        else:
            ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or not 0 <= ids[0] < len(self.tokenizer):
            raise ValueError(f"{name} must be one token of the verifier's vocabulary, got {token!r} -> ids {ids}")
        return ids[0]

    def build_prompt(self, question: str, reference: str, response: str) -> str:
        """The verifier's input text for one sample (before any chat template)."""
        return self.template.format(question=question, reference=reference, response=final_line(response))

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        if self.answer_column not in columns:
            raise ValueError(f"column {self.answer_column!r} (reference answers) is missing; got {sorted(columns)}")
        references = columns[self.answer_column]
        if not len(prompts) == len(completions) == len(references):
            raise ValueError(
                f"prompts, completions and {self.answer_column} differ in length: "
                f"{len(prompts)}, {len(completions)}, {len(references)}"
            )
        texts = [self.build_prompt(q, str(ref), c) for q, ref, c in zip(prompts, references, completions)]
        batches = [self.probabilities(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        probs = torch.cat(batches) if batches else torch.empty(0, 2, dtype=torch.float64)
        self.last_probabilities = probs
        return soft_rewards(probs, self.mode, self.zscore).tolist()

    @torch.inference_mode()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """(pi(YES), pi(NO)) of the first output token after each text, float64 [len(texts), 2]."""
        self.model.eval()
        if self.chat_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
                )
                for t in texts
            ]
        rows = [self.tokenizer.encode(t, add_special_tokens=not self.chat_template) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last token sits in the last column
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=positions.to(self.device),
            **({"logits_to_keep": 1} if self._last_logits_only else {}),
        )
        probs = out.logits[:, -1, :].double().softmax(-1)
        return probs[:, self.token_ids].cpu()

    def stats(self) -> dict[str, float]:
        """Means over the last call: pi(YES), pi(NO) and the share judged YES."""
        probs = self.last_probabilities
        if probs.numel() == 0:
            return {}
        return {
            "verifier/p_yes": probs[:, 0].mean().item(),
            "verifier/p_no": probs[:, 1].mean().item(),
            "verifier/judged_yes": (probs[:, 0] >= probs[:, 1]).double().mean().item(),
        }
