"""PPO maths against numbers computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from medtrain.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    compute_gae,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    per_token_rewards,
    policy_loss,
    truncate_after_stop,
    value_loss,
    whiten,
)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-6)


def test_gae_with_padding_and_a_gap():
    # gamma = 0.9, lam = 0.8, so gamma * lam = 0.72.
    rewards = torch.tensor([[0.1, -0.2, 1.0, 7.0], [0.0, 0.0, 0.0, 1.0], [0.1, 9.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 3.0], [0.1, 0.2, 0.3, 0.4], [0.5, 9.0, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0 (the padded 4th token is ignored: the episode ends at token 2, so V_next = 0 there):
    #   t2: delta = 1.0 + 0.9*0 - 0.2 = 0.8                      A2 = 0.8
    #   t1: delta = -0.2 + 0.9*0.2 - 0.4 = -0.42                 A1 = -0.42 + 0.72*0.8 = 0.156
    #   t0: delta = 0.1 + 0.9*0.4 - 0.5 = -0.04                  A0 = -0.04 + 0.72*0.156 = 0.07232
    # Row 1 (all valid):
    #   t3: 1 - 0.4 = 0.6                                        A3 = 0.6
    #   t2: 0.9*0.4 - 0.3 = 0.06                                 A2 = 0.06 + 0.72*0.6 = 0.492
    #   t1: 0.9*0.3 - 0.2 = 0.07                                 A1 = 0.07 + 0.72*0.492 = 0.42424
    #   t0: 0.9*0.2 - 0.1 = 0.08                                 A0 = 0.08 + 0.72*0.42424 = 0.3854528
    # Row 2 (token 1 masked: skipped, t0 bootstraps from t2):
    #   t3 = 0.6, t2 = 0.492 as row 1; t0: delta = 0.1 + 0.9*0.3 - 0.5 = -0.13, A0 = -0.13 + 0.72*0.492 = 0.22424
    close(advantages, [[0.07232, 0.156, 0.8, 0.0], [0.3854528, 0.42424, 0.492, 0.6], [0.22424, 0.0, 0.492, 0.6]])
    # returns = A + V on valid tokens, 0 on padding
    close(returns, [[0.57232, 0.556, 1.0, 0.0], [0.4854528, 0.62424, 0.792, 1.0], [0.72424, 0.0, 0.792, 1.0]])


def test_gae_gamma_one_lam_one_is_reward_to_go_minus_value():
    # With gamma = lam = 1, A_t = sum_{k >= t} r_k - V_t and the return is the plain reward-to-go.
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(advantages, [[5.5, 4.5, 2.5]])
    close(returns, [[6.0, 5.0, 3.0]])


def test_policy_loss_clip_binds_and_cuts_the_gradient():
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.5, 3.0])
    logprobs = torch.log(ratios).requires_grad_()
    old_logprobs = torch.zeros(5)
    advantages = torch.tensor([1.0, 1.0, -2.0, -1.0, 5.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # max(-A*r, -A*clip(r, 0.8, 1.2)) per token:
    #   t0: r=1.5, A=1:  max(-1.5, -1.2) = -1.2  (clip binds)
    #   t1: r=0.5, A=1:  max(-0.5, -0.8) = -0.5
    #   t2: r=1.1, A=-2: max(2.2, 2.2)   =  2.2  (inside the range: not counted as clipped)
    #   t3: r=0.5, A=-1: max(0.5, 0.8)   =  0.8  (clip binds)
    #   t4: masked
    # loss = (-1.2 - 0.5 + 2.2 + 0.8) / 4 = 0.325; clipfrac = 2/4
    assert loss.item() == pytest.approx(0.325, abs=1e-6)
    assert clipfrac.item() == 0.5
    # approx_kl = 0.5 * mean(log r^2) = 0.5 * (0.1644019539 + 2*0.4804530139 + 0.0090840304) / 4
    assert approx_kl.item() == pytest.approx(0.1417990015, abs=1e-6)
    loss.backward()
    # d/dlogp of -A*r/4 is -A*r/4 where unclipped; clipped and masked tokens get no gradient.
    close(logprobs.grad, [0.0, -0.125, 0.55, 0.0, 0.0])


def test_value_loss_with_clipping():
    values = torch.tensor([1.0, 0.0, 0.5, 2.0])
    old_values = torch.tensor([0.5, 0.5, 0.5, 0.0])
    returns = torch.tensor([1.5, 1.0, 0.5, 9.0])
    mask = torch.tensor([1, 1, 1, 0])
    loss, clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # t0: V_clip = 0.5 + clip(0.5) = 0.7; (1.0-1.5)^2 = 0.25, (0.7-1.5)^2 = 0.64 -> 0.64 (clipped one is larger)
    # t1: V_clip = 0.5 - 0.2 = 0.3;       (0.0-1.0)^2 = 1.0,  (0.3-1.0)^2 = 0.49 -> 1.0
    # t2: V = V_old = R -> 0
    # loss = 0.5 * (0.64 + 1.0 + 0) / 3 = 0.273333..; vf_clipfrac = 1/3
    assert loss.item() == pytest.approx(0.82 / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3, abs=1e-6)


def test_per_token_rewards_kl_penalty_and_score_at_last_valid_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -3.0], [-2.0, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # right padding
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # k1 = logp - ref_logp: row0 [0.5, -1.0, 0.0, pad], row1 [1.0, -0.5, pad, pad]
    close(kl, [[0.5, -1.0, 0.0, 0.0], [1.0, -0.5, 0.0, 0.0]])
    # -0.1 * kl, plus the score at the last valid token (index 2 and index 1)
    close(rewards, [[-0.05, 0.1, 2.0, 0.0], [-0.1, 0.05 - 1.0, 0.0, 0.0]])

    _, kl3 = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1, kl_estimator="k3")
    # k3 = (r - 1) - log r with log r = ref - logp: row0 t0 log r = -0.5: e^-0.5 - 1 + 0.5 = 0.1065307
    #                                              row0 t1 log r = 1.0: e - 1 - 1 = 0.7182818
    #                                              row1 t0 log r = -1: e^-1 - 1 + 1 = 0.3678794
    #                                              row1 t1 log r = 0.5: e^0.5 - 1 - 0.5 = 0.1487213
    close(kl3, [[0.1065307, 0.7182818, 0.0, 0.0], [0.3678794, 0.1487213, 0.0, 0.0]])


def test_per_token_rewards_needs_a_valid_token():
    with pytest.raises(ValueError, match="at least one valid response token"):
        per_token_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)


def test_whiten_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    # valid entries 1..6: mean 3.5, unbiased var = (6.25+2.25+0.25+0.25+2.25+6.25)/5 = 3.5
    assert masked_mean(x, mask).item() == 3.5
    assert masked_var(x, mask).item() == pytest.approx(3.5)
    white = whiten(x, mask)
    s = math.sqrt(3.5)
    close(white[mask.bool()], [-2.5 / s, -1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 2.5 / s])
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-6)
    # shift_mean=False rescales only: the mean stays 3.5
    kept = whiten(x, mask, shift_mean=False)
    close(kept[mask.bool()], [3.5 - 2.5 / s, 3.5 - 1.5 / s, 3.5 - 0.5 / s, 3.5 + 0.5 / s, 3.5 + 1.5 / s, 3.5 + 2.5 / s])


def test_masked_var_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2 valid entries"):
        masked_var(torch.tensor([1.0, 2.0]), torch.tensor([1, 0]))


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # probs [0.25, 0.75] and [0.5, 0.5]
    close(logprobs_from_logits(logits, torch.tensor([[1, 0]])), [[math.log(0.75), math.log(0.5)]])
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351; H(uniform over 2) = ln 2
    close(entropy_from_logits(logits), [[0.5623351, math.log(2.0)]])


@pytest.mark.parametrize(
    ("current_kl", "expected"),
    [
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # err = 6.6/6 - 1 = +0.1 (inside)  -> 0.100256
        (5.4, 0.1 * (1 - 0.1 * 256 / 10000)),  # err = -0.1 (inside)             -> 0.099744
        (12.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # err = +1.0 clipped to +0.2      -> 0.100512
        (0.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # err = -1.0 clipped to -0.2      -> 0.099488
    ],
)
def test_adaptive_kl_controller(current_kl, expected):
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(current_kl, n_steps=256)
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_kl_controllers_state_round_trip():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(12.0, n_steps=256)
    restored = AdaptiveKLController(0.5, target=1.0, horizon=1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == {"value": 0.1 * 1.00512, "target": 6.0, "horizon": 10000.0}
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=256)
    assert fixed.state_dict() == {"value": 0.05}


def test_truncate_after_stop():
    responses = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 9, 9, 9], [5, 9, 1, 4]])
    ids, mask, has_stop = truncate_after_stop(responses, stop_token_ids=[1, 9], pad_token_id=0)
    assert ids.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0], [5, 9, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert has_stop.tolist() == [True, False, True, True]


def test_missing_eos_penalty_replaces_the_score():
    scores = torch.tensor([0.5, 1.2, -0.3])
    has_stop = torch.tensor([True, False, False])
    close(apply_missing_eos_penalty(scores, has_stop, penalty=-1.0), [0.5, -1.0, -1.0])
    close(apply_missing_eos_penalty(scores, has_stop, penalty=None), [0.5, 1.2, -0.3])
