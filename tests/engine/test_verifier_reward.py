"""The verifier's soft reward against probabilities computed by hand from a tiny model's logits."""

import re
import statistics
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fusedrl.engine.rewards.verifier import DEFAULT_TEMPLATE, VerifierReward, final_line

YES, NO = 1, 2
QUESTIONS = ["What is 2 + 2 ?", "Name the capital of France .", "What is 7 * 6 ?"]
ANSWERS = ["4", "Paris", "42"]
RESPONSES = [
    "Let me think .\nTwo and two make 4 .\n\n",
    "Paris",
    "Seven sixes are 42 , so the answer is 41 .\n",
]


def make_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary holds YES, NO and every word of `texts`."""
    vocab = {"[UNK]": 0, "YES": YES, "NO": NO}
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]+", text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def tiny():
    tokenizer = make_tokenizer([DEFAULT_TEMPLATE, *QUESTIONS, *ANSWERS, *RESPONSES])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attention_dropout=0.5,  # only active in train mode: a reward that ignored eval() would differ
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Point the YES and NO rows of the head so that the first two prompts get opposite judgements
        # (logit gap +-3): both branches of the reward are exercised, with mass left on other tokens.
        last = [
            model.model(input_ids=torch.tensor([tokenizer.encode(prompt_for(q, a, r))])).last_hidden_state[0, -1]
            for q, a, r in zip(QUESTIONS[:2], ANSWERS[:2], RESPONSES[:2])
        ]
        direction = torch.linalg.lstsq(torch.stack(last), torch.tensor([[1.5], [-1.5]])).solution[:, 0]
        model.lm_head.weight[YES] = direction
        model.lm_head.weight[NO] = -direction
    return model.train(), tokenizer


def prompt_for(question: str, answer: str, response: str) -> str:
    return DEFAULT_TEMPLATE.format(question=question, reference=answer, response=final_line(response))


def assert_close(actual: list[float], expected: list[float], rtol: float, atol: float) -> None:
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol
    )


def hand_probabilities(model, tokenizer, text: str) -> tuple[float, float]:
    """pi(YES), pi(NO) of the first output token: one unpadded forward pass, softmax in float64."""
    ids = torch.tensor([tokenizer.encode(text)])
    model.eval()
    with torch.no_grad():
        probs = model(input_ids=ids).logits[0, -1].double().softmax(-1)
    return probs[YES].item(), probs[NO].item()


def test_final_line_and_prompt():
    assert final_line("a\n b  \n\n") == "b" and final_line("\n \n") == ""
    tokenizer = make_tokenizer(["q"])
    reward = VerifierReward(FixedLogits(torch.zeros(len(tokenizer), len(tokenizer))), tokenizer)
    assert reward.build_prompt("Q?", "4", "work\nThe answer is 4.\n") == (
        "Judge whether the response reaches the reference answer.\nQuestion: Q?\nReference answer: 4\n"
        "Response (final line): The answer is 4.\nIs the response correct? Answer YES or NO.\n"
    )


def test_soft_reward_equals_hand_probabilities_of_a_tiny_llama(tiny):
    model, tokenizer = tiny
    questions, answers, responses = QUESTIONS * 2, ANSWERS * 2, RESPONSES + RESPONSES[::-1]
    reward = VerifierReward(model, tokenizer, batch_size=4)  # two batches, each left-padded
    got = reward(questions, responses, answer=answers)
    assert not model.training
    expected, judged = [], []
    for q, a, r in zip(questions, answers, responses):
        p_yes, p_no = hand_probabilities(model, tokenizer, prompt_for(q, a, r))
        judged.append(p_yes >= p_no)
        expected.append(p_yes if p_yes >= p_no else 1 - p_no)
    assert set(judged) == {True, False}, "the fixture should produce both judgements"
    assert_close(got, expected, rtol=1e-5, atol=1e-7)
    binary = VerifierReward(model, tokenizer, mode="binary")(questions, responses, answer=answers)
    assert binary == [float(j) for j in judged]
    z = VerifierReward(model, tokenizer, zscore=True)(questions, responses, answer=answers)
    mean, std = statistics.fmean(expected), statistics.pstdev(expected)
    assert_close(z, [(e - mean) / std for e in expected], rtol=1e-4, atol=1e-5)


def test_only_the_last_positions_logits_are_computed(tiny):
    """A transformers verifier is asked for the last position's logits alone (logits_to_keep), not [B, L, V]."""
    model, tokenizer = tiny
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        VerifierReward(model, tokenizer, batch_size=4)(QUESTIONS, RESPONSES, answer=ANSWERS)
    finally:
        hook.remove()
    assert shapes and all(shape[1] == 1 for shape in shapes), shapes


def test_loading_from_a_local_directory_matches_the_object(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from_path = VerifierReward(str(tmp_path), device="cpu")(QUESTIONS, RESPONSES, answer=ANSWERS)
    from_object = VerifierReward(model, tokenizer)(QUESTIONS, RESPONSES, answer=ANSWERS)
    assert_close(from_path, from_object, rtol=1e-6, atol=1e-7)


class FixedLogits(torch.nn.Module):
    """A verifier whose next-token logits are row k of `table` when the last input token is k."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask, position_ids):
        return SimpleNamespace(logits=self.table[input_ids])


# pi(YES), pi(NO) after a response whose final line is the key; the rest of the mass is spread evenly.
HAND = {"a": (0.6, 0.3), "b": (0.2, 0.5), "c": (0.3, 0.3), "d": (0.1, 0.85)}


def hand_verifier(**kwargs) -> VerifierReward:
    tokenizer = make_tokenizer(["q ref", *HAND])
    vocab = len(tokenizer)
    table = torch.full((vocab, vocab), 1.0 / vocab)
    for word, (p_yes, p_no) in HAND.items():
        row = torch.full((vocab,), (1 - p_yes - p_no) / (vocab - 2), dtype=torch.float64)
        row[YES], row[NO] = p_yes, p_no
        table[tokenizer.convert_tokens_to_ids(word)] = row.log().float()
    return VerifierReward(FixedLogits(table), tokenizer, template="{question} {reference} {response}", **kwargs)


def test_hand_worked_branches_binary_and_zscore():
    prompts, responses = ["q"] * 4, ["x\na", "b", "c", "d"]
    soft = hand_verifier()(prompts, responses, answer=["ref"] * 4)
    # a: YES 0.6; b: NO, 1 - 0.5; c: tie judged YES, 0.3; d: NO, 1 - 0.85
    assert_close(soft, [0.6, 0.5, 0.3, 0.15], rtol=1e-6, atol=1e-7)
    assert hand_verifier(mode="binary")(prompts, responses, answer=["ref"] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert hand_verifier(mode="binary", zscore=True)(prompts, responses, answer=["ref"] * 4) == [1.0, -1.0, 1.0, -1.0]
    z = hand_verifier(zscore=True)(prompts, responses, answer=["ref"] * 4)
    mean, std = 0.3875, statistics.pstdev([0.6, 0.5, 0.3, 0.15])
    assert_close(z, [(v - mean) / std for v in (0.6, 0.5, 0.3, 0.15)], rtol=1e-5, atol=1e-6)
    assert hand_verifier(zscore=True)(["q"] * 3, ["a"] * 3, answer=["ref"] * 3) == [0.0, 0.0, 0.0]
    assert hand_verifier(zscore=True)(["q"], ["d"], answer=["ref"]) == [0.0]


def test_bad_arguments_name_themselves():
    tokenizer = make_tokenizer(["two words"])
    model = FixedLogits(torch.zeros(len(tokenizer), len(tokenizer)))
    with pytest.raises(ValueError, match="yes_token"):
        VerifierReward(model, tokenizer, yes_token="two words")
    with pytest.raises(ValueError, match="no_token"):
        VerifierReward(model, tokenizer, no_token=10_000)
    with pytest.raises(ValueError, match="template"):
        VerifierReward(model, tokenizer, template="{question} {response}")
    with pytest.raises(ValueError, match="tokenizer"):
        VerifierReward(model)
    with pytest.raises(ValueError, match="mode"):
        VerifierReward(model, tokenizer, mode="hard")
    with pytest.raises(ValueError, match="'answer'"):
        VerifierReward(model, tokenizer)(["q"], ["r"], solution=["s"])
