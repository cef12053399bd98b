"""MasterWeightAdamW against torch's own AdamW stepping fp32 copies by hand."""

import io

import pytest
import torch

from fusedrl.engine.errors import RunError
from fusedrl.engine.optim import MasterWeightAdamW, StepGuard, accumulate_gradients, clip_gradients

OPTIONS = dict(lr=1e-6, weight_decay=0.01, betas=(0.9, 0.95))


def _model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.to(dtype)


def _backward(model, seed):
    model.zero_grad(set_to_none=True)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed)).to(model[0].weight.dtype)
    model(x).float().square().sum().backward()


def test_bf16_parameters_follow_fp32_adamw_on_their_gradients():
    """The masters step exactly as torch.optim.AdamW on fp32 parameters given the same (bf16) gradients,
    and the model holds their rounding; stepped in place, bf16 weights would not move at lr 1e-6."""
    model = _model(torch.bfloat16)
    start = [p.detach().clone() for p in model.parameters()]
    reference = [p.detach().float().requires_grad_() for p in model.parameters()]
    ours, theirs = MasterWeightAdamW(model.parameters(), **OPTIONS), torch.optim.AdamW(reference, **OPTIONS)
    for step in range(20):
        _backward(model, step)
        for p, r in zip(model.parameters(), reference):
            r.grad = p.grad.float()
        ours.step()
        theirs.step()
    for p, r in zip(model.parameters(), reference):
        assert torch.equal(p, r.detach().to(torch.bfloat16))
    masters = ours.state_dict()["master_weights"]
    assert all(torch.equal(m, r.detach()) for m, r in zip(masters, reference))
    assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), start)), "20 steps moved nothing"
    # The failure this prevents: torch's AdamW on the bf16 weights themselves rounds nearly every step
    # away (3 of 212 weights move, the tiniest); their total movement is under 2% of the fp32 run's.
    in_place = _model(torch.bfloat16)
    plain = torch.optim.AdamW(in_place.parameters(), **OPTIONS)
    for step in range(20):
        _backward(in_place, step)
        plain.step()
    moved = sum((p.float() - s.float()).abs().sum() for p, s in zip(in_place.parameters(), start))
    assert moved < 0.02 * sum((r.detach() - s.float()).abs().sum() for r, s in zip(reference, start))


def test_fp32_and_mixed_parameters():
    """fp32 parameters are stepped as torch's AdamW steps them (bit for bit); a model with fp32 and bf16
    parameters gets masters for the bf16 ones only."""
    model, reference = _model(torch.float32), _model(torch.float32)
    ours, theirs = MasterWeightAdamW(model.parameters(), **OPTIONS), torch.optim.AdamW(reference.parameters(), **OPTIONS)
    for step in range(3):
        for m in (model, reference):
            _backward(m, step)
        ours.step()
        theirs.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert ours.state_dict()["master_weights"] == []
    mixed = _model(torch.bfloat16)
    mixed[2].float()
    optimizer = MasterWeightAdamW(mixed.parameters(), **OPTIONS)
    assert len(optimizer.state_dict()["master_weights"]) == 2  # the first layer's weight and bias
    assert optimizer.param_groups[0]["params"][2] is mixed[2].weight


def test_resume_continues_from_the_masters_not_the_rounded_weights():
    model = _model(torch.bfloat16)
    optimizer = MasterWeightAdamW(model.parameters(), **OPTIONS)
    for step in range(5):
        _backward(model, step)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)
    resumed = _model(torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = MasterWeightAdamW(resumed.parameters(), **OPTIONS)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for step in range(5, 9):
        for m, o in ((model, optimizer), (resumed, resumed_optimizer)):
            _backward(m, step)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(optimizer.state_dict()["master_weights"],
                                                resumed_optimizer.state_dict()["master_weights"]))


def test_zero_grad_and_bad_state():
    model = _model(torch.bfloat16)
    optimizer = MasterWeightAdamW(model.parameters(), **OPTIONS)
    _backward(model, 0)
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    state = optimizer.state_dict()
    state["master_weights"] = state["master_weights"][:1]
    with pytest.raises(ValueError, match="master weights"):
        MasterWeightAdamW(_model(torch.bfloat16).parameters(), **OPTIONS).load_state_dict(state)


def test_micro_batch_gradients_accumulate_in_fp32_and_clip_there():
    """Four micro-batches' bf16 gradients summed by accumulate_gradients equal their fp32 sum exactly
    (bf16 .grad accumulation rounds each partial sum to 8 bits); clip_gradients clips and reports the
    norm of that fp32 sum, as torch's clip_grad_norm_ on fp32 copies does."""
    model = _model(torch.bfloat16)
    optimizer = MasterWeightAdamW(model.parameters(), **OPTIONS)
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
    for seed in range(4):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        (model(x).float().square().sum() * (1 + 100 * seed)).backward()  # addends of growing size
        for e, p in zip(expected, model.parameters()):
            e += p.grad.float()
        accumulate_gradients(optimizer)
        assert all(p.grad is None for p in model.parameters())
    masters = optimizer.param_groups[0]["params"]
    assert all(torch.equal(m.grad, e) for m, e in zip(masters, expected))
    reference = [e.clone().requires_grad_() for e in expected]
    for r, e in zip(reference, expected):
        r.grad = e.clone()
    want = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert torch.equal(clip_gradients(optimizer, 1.0), want)
    assert all(torch.equal(m.grad, r.grad) for m, r in zip(masters, reference))
    # What bf16 accumulation in .grad would have given differs from the fp32 sum.
    in_place = _model(torch.bfloat16)
    for seed in range(4):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        (in_place(x).float().square().sum() * (1 + 100 * seed)).backward()
    assert any(not torch.equal(p.grad.float(), e) for p, e in zip(in_place.parameters(), expected))
    optimizer.step()
    assert all(m.grad is None for m in masters)  # used up by the step


def test_plain_optimizers_pass_through():
    """accumulate_gradients leaves another optimizer's fp32 gradients in .grad; clip_gradients clips them."""
    model = _model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    _backward(model, 0)
    grads = [p.grad.clone() for p in model.parameters()]
    accumulate_gradients(optimizer)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    torch.testing.assert_close(clip_gradients(optimizer, 1e9), norm)


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_finite_gradient_skips_the_step_and_a_streak_stops_the_run(dtype, max_norm):
    """A NaN or inf gradient leaves weights and AdamW's moments untouched (one such step would turn every
    weight NaN); a finite one steps as usual and resets the count; max_skipped_steps in a row raise."""
    model = _model(dtype)
    optimizer = MasterWeightAdamW(model.parameters(), **OPTIONS)
    guard = StepGuard(limit=2)
    _backward(model, 0)
    norm, stepped = guard.step(optimizer, max_norm)
    assert stepped and torch.isfinite(norm)
    optimizer.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = io.BytesIO()
    torch.save(optimizer.state_dict(), moments)
    for first, poison in ((True, float("nan")), (False, float("inf"))):
        _backward(model, 1)
        model[0].weight.grad[0, 0] = poison
        norm, stepped = guard.step(optimizer, max_norm)
        assert not stepped and not torch.isfinite(norm)
        optimizer.zero_grad()
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        moments.seek(0)
        saved = torch.load(moments)
        for a, b in zip(saved["state"].values(), optimizer.state_dict()["state"].values()):
            assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        if first:  # one skip, then a good step: the streak starts again
            _backward(model, 2)
            assert guard.step(optimizer, max_norm)[1]
            optimizer.zero_grad()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            moments = io.BytesIO()
            torch.save(optimizer.state_dict(), moments)
    _backward(model, 3)
    model[2].bias.grad[0] = float("nan")
    with pytest.raises(RunError, match=r"2 optimizer steps in a row had a non-finite gradient .*\(optim.max_skipped_steps=2\)"):
        guard.step(optimizer, max_norm)
