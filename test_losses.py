"""Losses and the reference update against numbers worked out by hand (the arithmetic is in the comments)."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from common import should_update_reference, update_reference
from tr_dpo import dpo_loss

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
    # `step` counts finished optimizer steps: tau = 4 updates after steps 4 and 8 of 10; never at step 0
    assert [s for s in range(0, 11) if should_update_reference(s, "soft", 4)] == [4, 8]
    assert [s for s in range(0, 11) if should_update_reference(s, "hard", 1)] == list(range(1, 11))
    assert not any(should_update_reference(s, "none", 1) for s in range(0, 11))
