"""Losses and the reference update against numbers worked out by hand (the arithmetic is in the comments)."""
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import common
from common import InputError, update_alpha, update_reference
from engineering.cli import ArgumentParser, add_common_args
from tr_dpo import dpo_loss
from tr_ipo import ipo_loss, logps_for_loss
from tr_kto import kto_loss

T = lambda *xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731

# -----------------------------------------------------------------------------
# DPO


def test_dpo_loss_by_hand():
    beta = 0.1
    # pair 0: h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2;  beta*h = 0.2
    #         loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693
    #         rewards: 0.1 * 1 = 0.1 (chosen), 0.1 * -1 = -0.1 (rejected)
    # pair 1: h = (-5 - -2) - (-1 - -3) = -3 - 2 = -5;  beta*h = -0.5
    #         loss = log(1 + e^0.5) = log(2.6487212707) = 0.9740769842;  rewards -0.3, 0.2
    # pair 2: policy == reference, h = 0, loss = log 2 = 0.6931471806, rewards 0, 0
    pc = T(-1.0, -5.0, -4.0).requires_grad_()
    pr = T(-3.0, -1.0, -6.0).requires_grad_()
    losses, rc, rr = dpo_loss(pc, pr, T(-2.0, -2.0, -4.0), T(-2.0, -3.0, -6.0), beta)
    assert losses.tolist() == pytest.approx([0.5981388693, 0.9740769842, 0.6931471806], abs=1e-9)
    assert rc.tolist() == pytest.approx([0.1, -0.3, 0.0], abs=1e-12)
    assert rr.tolist() == pytest.approx([-0.1, 0.2, 0.0], abs=1e-12)
    assert not rc.requires_grad and not rr.requires_grad
    # gradient: d loss / d pi_c = -beta * sigmoid(-beta*h); pair 0: -0.1 * sigmoid(-0.2) = -0.1 * 0.4501660027
    # negative: raising the chosen log-prob lowers the loss; the rejected gradient is its mirror image.
    losses.sum().backward()
    assert pc.grad[0].item() == pytest.approx(-0.04501660027, abs=1e-10)
    assert pr.grad[0].item() == pytest.approx(+0.04501660027, abs=1e-10)
    # pair 1: -0.1 * sigmoid(0.5) = -0.1 * 0.6224593312
    assert pc.grad[1].item() == pytest.approx(-0.06224593312, abs=1e-10)


def test_dpo_loss_large_margin_is_stable():
    # beta*h = 0.1 * 2000 = 200: -log sigmoid(200) = log(1 + e^-200) ~ 1.4e-87, not nan; and -200 gives 200.
    losses, _, _ = dpo_loss(T(0.0, -2000.0), T(-2000.0, 0.0), T(0.0, 0.0), T(0.0, 0.0), 0.1)
    assert losses[0].item() == pytest.approx(0.0, abs=1e-80)
    assert losses[1].item() == pytest.approx(200.0, abs=1e-9)

# -----------------------------------------------------------------------------
# the trust-region reference update


def two_param_models(ref_vals, pol_vals, ref_dtype=torch.float32):
    ref, pol = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([ref_vals]))
        pol.weight.copy_(torch.tensor([pol_vals]))
    return ref.to(ref_dtype), pol


def test_soft_update_by_hand():
    # alpha 0.6: 0.6*3 + 0.4*1 = 2.2 ; 0.6*(-2) + 0.4*2 = -0.4
    ref, pol = two_param_models([1.0, 2.0], [3.0, -2.0])
    update_reference(ref, pol, 0.6)
    assert ref.weight.tolist() == [pytest.approx([2.2, -0.4], abs=1e-6)]
    assert pol.weight.tolist() == [[3.0, -2.0]]  # the policy is never touched
    # again: 0.6*3 + 0.4*2.2 = 2.68 ; 0.6*(-2) + 0.4*(-0.4) = -1.36
    update_reference(ref, pol, 0.6)
    assert ref.weight.tolist() == [pytest.approx([2.68, -1.36], abs=1e-6)]


def test_hard_update_copies():
    ref, pol = two_param_models([1.0, 2.0], [3.0, -2.0])
    update_reference(ref, pol, 1.0)
    assert ref.weight.tolist() == [[3.0, -2.0]]


def test_bf16_reference_from_fp32_policy_is_rounded_once():
    torch.manual_seed(0)
    ref, pol = torch.nn.Linear(64, 64).to(torch.bfloat16), torch.nn.Linear(64, 64)
    before = {n: p.detach().double() for n, p in ref.named_parameters()}
    update_reference(ref, pol, 0.1)
    for n, p in ref.named_parameters():
        # naive reference: exact lerp in float64, then one rounding to bf16
        want = (0.1 * dict(pol.named_parameters())[n].detach().double() + 0.9 * before[n]).to(torch.bfloat16)
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, want), n
    # and a hand case: bf16 ref 1.0, fp32 policy 1.0 + 2^-6 = 1.015625, alpha 0.5 -> 1.0078125 = 1 + 2^-7 (exact in bf16)
    ref, pol = two_param_models([1.0, 1.0], [1.015625, 1.0], torch.bfloat16)
    update_reference(ref, pol, 0.5)
    assert ref.weight.float().tolist() == [[1.0078125, 1.0]]


def test_tied_weights_updated_exactly_once():
    cfg = GPTNeoXConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref, pol = GPTNeoXForCausalLM(cfg), GPTNeoXForCausalLM(cfg)
    assert ref.get_input_embeddings().weight is ref.get_output_embeddings().weight
    with torch.no_grad():
        ref.get_input_embeddings().weight.zero_()
        pol.get_input_embeddings().weight.fill_(1.0)
    update_reference(ref, pol, 0.6)
    # once: 0.6*1 + 0.4*0 = 0.6 ; a second application through the tied alias would give 0.6 + 0.6*0.4 = 0.84
    assert torch.allclose(ref.get_output_embeddings().weight, torch.full((16, 8), 0.6))
    assert ref.get_input_embeddings().weight is ref.get_output_embeddings().weight


def test_schedule_first_update_at_step_tau():
    # `step` counts finished optimizer steps: tau = 4 updates after steps 4 and 8 of 10, never at step 0; the alpha
    # of each update is --alpha for soft, 1 for hard, and 0 (no update) everywhere else
    assert [update_alpha(s, "soft", 0.6, 4) for s in range(0, 11)] == [0, 0, 0, 0, 0.6, 0, 0, 0, 0.6, 0, 0]
    assert [update_alpha(s, "hard", 0.6, 4) for s in range(0, 11)] == [0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    assert [update_alpha(s, "hard", 0.6, 1) for s in range(0, 4)] == [0, 1, 1, 1]
    assert not any(update_alpha(s, "none", 0.6, 1) for s in range(0, 11))


def test_a_new_schedule_is_one_function():
    # a schedule registered in common.py is a --ref_update choice at once, and update_alpha runs it: here alpha
    # halves at every update, tau = 2, alpha 0.8: after step 2 (update 1) 0.8, step 4 (update 2) 0.4, step 6 0.2
    @common.ref_schedule("halving")
    def halving(step, tau, alpha):
        return alpha / 2 ** (step // tau - 1) if step % tau == 0 else 0.0
    parse = lambda argv: add_common_args(ArgumentParser(""), "tr_dpo").parse_args(argv)  # noqa: E731
    try:
        assert parse(["--ref_update", "halving"]).ref_update == "halving"
        assert [update_alpha(s, "halving", 0.8, 2) for s in range(0, 7)] == [0, 0, 0.8, 0, 0.4, 0, 0.2]
        # a reference at 0 under a policy held at 1: 0.8*1 + 0.2*0 = 0.8, then 0.4*1 + 0.6*0.8 = 0.88
        pol, ref = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            pol.weight.fill_(1.0), ref.weight.fill_(0.0)
        for s in range(1, 5):
            if update_alpha(s, "halving", 0.8, 2):
                update_reference(ref, pol, update_alpha(s, "halving", 0.8, 2))
        assert abs(ref.weight.item() - 0.88) < 1e-6
    finally:
        del common.REF_SCHEDULES["halving"]
    with pytest.raises(InputError, match="invalid choice"):  # gone from the registry, gone from the flags
        parse(["--ref_update", "halving"])

# -----------------------------------------------------------------------------
# IPO


def test_ipo_loss_by_hand():
    beta = 0.5  # target gap 1/(2*beta) = 1
    # pair 0: h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2;  loss = (2 - 1)^2 = 1;  rewards 0.5*1 = 0.5, 0.5*(-1) = -0.5
    # pair 1: h = (-5 - -2) - (-1 - -3) = -3 - 2 = -5;  loss = (-5 - 1)^2 = 36;  rewards 0.5*(-3) = -1.5, 0.5*2 = 1
    # pair 2: policy == reference, h = 0, loss = (0 - 1)^2 = 1 = 1/(4*beta^2), rewards 0, 0
    pc = T(-1.0, -5.0, -4.0).requires_grad_()
    pr = T(-3.0, -1.0, -6.0).requires_grad_()
    losses, rc, rr = ipo_loss(pc, pr, T(-2.0, -2.0, -4.0), T(-2.0, -3.0, -6.0), beta)
    assert losses.tolist() == pytest.approx([1.0, 36.0, 1.0], abs=1e-12)
    assert rc.tolist() == pytest.approx([0.5, -1.5, 0.0], abs=1e-12)
    assert rr.tolist() == pytest.approx([-0.5, 1.0, 0.0], abs=1e-12)
    assert not rc.requires_grad and not rr.requires_grad
    # d loss / d pi_c = 2*(h - 1/(2 beta)): pair 0: 2*(2 - 1) = 2; pair 1: 2*(-5 - 1) = -12; pair 2: -2. Mirror for pi_r.
    # Unlike DPO the gradient changes sign: a gap above the target is pulled back (pair 0).
    losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([2.0, -12.0, -2.0], abs=1e-12)
    assert pr.grad.tolist() == pytest.approx([-2.0, 12.0, 2.0], abs=1e-12)


def test_ipo_loss_is_zero_at_the_target():
    # beta 0.25: target 1/(2*0.25) = 2; h = (0 - -1) - (-1 - 0) = 2 -> loss 0, gradient 0
    pc = T(0.0).requires_grad_()
    losses, _, _ = ipo_loss(pc, T(-1.0), T(-1.0), T(0.0), 0.25)
    losses.sum().backward()
    assert losses.item() == 0.0 and pc.grad.item() == 0.0


def test_ipo_summed_vs_averaged_logps():
    # logps_for_loss: sums from sequence_logps divided by the response length in "mean" mode
    sums, n = T(-6.0, -9.0, -8.0, -4.0), torch.tensor([3, 3, 4, 4])
    assert logps_for_loss(sums, n, "mean").tolist() == [-2.0, -3.0, -2.0, -1.0]
    assert logps_for_loss(sums, n, "sum").tolist() == [-6.0, -9.0, -8.0, -4.0]
    # one pair: chosen 3 tokens, policy -6 / ref -9; rejected 4 tokens, policy -8 / ref -4; beta 0.1, target 5
    # summed:   h = (-6 - -9) - (-8 - -4) = 3 - (-4) = 7;   loss = (7 - 5)^2 = 4
    # averaged: h = (-2 - -3) - (-2 - -1) = 1 - (-1) = 2;   loss = (2 - 5)^2 = 9
    for mode, want in (("sum", 4.0), ("mean", 9.0)):
        pc, rc, pr, rr = logps_for_loss(sums, n, mode).split(1)
        assert ipo_loss(pc, pr, rc, rr, 0.1)[0].item() == pytest.approx(want, abs=1e-12), mode

# -----------------------------------------------------------------------------
# KTO

B = lambda *xs: torch.tensor(xs, dtype=torch.bool)  # noqa: E731
S = {0.5: 0.6224593312018546, 1.5: 0.8175744761936437, -0.5: 0.3775406687981454, 1.0: 0.7310585786300049}  # sigmoid


def test_kto_loss_by_hand():
    # beta 1, z0 = 0.5; r = policy - ref = [-1 - -2, -4 - -3, -2 - -2] = [1, -1, 0]
    # ex 0, desirable:   1 - sigmoid(1*(1 - 0.5))    = 1 - sigmoid(0.5)  = 1 - 0.6224593312 = 0.3775406688
    # ex 1, undesirable: 1 - sigmoid(1*(0.5 - -1))   = 1 - sigmoid(1.5)  = 1 - 0.8175744762 = 0.1824255238
    # ex 2, desirable:   1 - sigmoid(1*(0 - 0.5))    = 1 - sigmoid(-0.5) = 1 - 0.3775406688 = 0.6224593312
    # rewards = beta * r = [1, -1, 0]
    pol = T(-1.0, -4.0, -2.0).requires_grad_()
    losses, rewards = kto_loss(pol, T(-2.0, -3.0, -2.0), B(True, False, True), torch.tensor(0.5), beta=1.0)
    assert losses.tolist() == pytest.approx([1 - S[0.5], 1 - S[1.5], 1 - S[-0.5]], abs=1e-12)
    assert losses.tolist() == pytest.approx([0.3775406688, 0.1824255238, 0.6224593312], abs=1e-10)
    assert rewards.tolist() == [1.0, -1.0, 0.0] and not rewards.requires_grad
    # d/d policy: desirable -beta*s*(1-s) at x = 0.5: -0.6224593312*0.3775406688 = -0.2350037122
    #             undesirable +beta*s*(1-s) at x = 1.5: 0.8175744762*0.1824255238 = +0.1491464521
    losses.sum().backward()
    assert pol.grad[:2].tolist() == pytest.approx([-0.2350037122, 0.1491464521], abs=1e-10)


def test_kto_negative_kl_is_clamped_to_zero_and_not_differentiated():
    # same examples, KL estimate -0.7 -> z0 = max(0, -0.7) = 0
    # ex 0: 1 - sigmoid(1 - 0) = 0.2689414214;  ex 1: 1 - sigmoid(0 - -1) = 0.2689414214;  ex 2: 1 - sigmoid(0) = 0.5
    kl = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    losses, _ = kto_loss(T(-1.0, -4.0, -2.0), T(-2.0, -3.0, -2.0), B(True, False, True), kl, beta=1.0)
    assert losses.tolist() == pytest.approx([1 - S[1.0], 1 - S[1.0], 0.5], abs=1e-12)
    assert not losses.requires_grad  # z0 is detached: no gradient can reach the KL estimate


def test_kto_only_desirable_examples():
    # beta 0.1, z0 = 0.2, r = [1, -1], both desirable (e.g. a rank whose share holds one class)
    # ex 0: 1 - sigmoid(0.1*(1 - 0.2))  = 1 - sigmoid(0.08)  = 1 - 0.5199893402 = 0.4800106598
    # ex 1: 1 - sigmoid(0.1*(-1 - 0.2)) = 1 - sigmoid(-0.12) = 1 - 0.4700359482 = 0.5299640518
    pol = T(-1.0, -3.0).requires_grad_()
    losses, rewards = kto_loss(pol, T(-2.0, -2.0), B(True, True), 0.2, beta=0.1)
    assert losses.tolist() == pytest.approx([0.4800106598, 0.5299640518], abs=1e-10)
    assert rewards.tolist() == pytest.approx([0.1, -0.1], abs=1e-12)
    losses.mean().backward()  # the training reduction; no per-class division, so no 0/0
    # d/d pol_0 of the mean: -0.1 * s(0.08)*(1 - s(0.08)) / 2 = -0.0249600426 / 2
    assert pol.grad[0].item() == pytest.approx(-0.0249600426 / 2, abs=1e-10)
    assert torch.isfinite(pol.grad).all()


def test_kto_weights_scale_each_class():
    # the first case with lambda_D = 1.33, lambda_U = 0.5:
    # 1.33 * 0.3775406688 = 0.5021290895;  0.5 * 0.1824255238 = 0.0912127619;  1.33 * 0.6224593312 = 0.8278709105
    losses, _ = kto_loss(T(-1.0, -4.0, -2.0), T(-2.0, -3.0, -2.0), B(True, False, True), 0.5, beta=1.0,
                         desirable_weight=1.33, undesirable_weight=0.5)
    assert losses.tolist() == pytest.approx([0.5021290895, 0.0912127619, 0.8278709105], abs=1e-10)
