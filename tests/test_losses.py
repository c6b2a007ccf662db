"""Loss terms against values computed by hand on tiny inputs."""

import math

import pytest
import torch

from rshash.losses import (
    bit_balance_loss,
    critic_loss,
    generator_loss,
    gradient_penalty,
    nt_xent,
    quantization_loss,
)


def _hand_nt_xent(u, v, tau, w=None):
    """Direct transcription of the definition, one anchor at a time."""
    z = [[c / math.sqrt(sum(c * c for c in x)) for c in x] for x in (u + v)]
    n = len(u)
    total = 0.0
    for a in range(2 * n):
        pos = a + n if a < n else a - n
        sims = {
            b: sum(p * q for p, q in zip(z[a], z[b], strict=True)) / tau
            for b in range(2 * n)
            if b != a
        }
        denom = sum(math.exp(s) for s in sims.values())
        loss = -math.log(math.exp(sims[pos]) / denom)
        total += loss * (w[a % n] if w else 1.0)
    return total


U = [[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]
V = [[0.8, 0.6], [0.0, 1.0], [-0.6, -0.8]]


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.1])
def test_nt_xent_matches_hand_computation(tau):
    got = nt_xent(torch.tensor(U), torch.tensor(V), temperature=tau)
    assert got.item() == pytest.approx(_hand_nt_xent(U, V, tau), rel=1e-5)


def test_nt_xent_two_pairs_closed_form():
    # N=1: each anchor has only its partner as candidate → loss 0 for any temperature.
    assert nt_xent(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.3).item() == 0.0
    # N=2, orthogonal partners, opposite pairs: every anchor sees sims {partner, -1 or 0,...}.
    u = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # anchor 0 (x=1): partner sim 1, others: u1 = -1, v1 = -1 → loss = -log(e / (e + 2/e))
    expected = 4 * -math.log(math.e / (math.e + 2 / math.e))
    assert nt_xent(u, v, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_weights_and_mean():
    w = [0.2, 1.0, 0.5]
    got = nt_xent(torch.tensor(U), torch.tensor(V), 0.5, weights=torch.tensor(w))
    assert got.item() == pytest.approx(_hand_nt_xent(U, V, 0.5, w), rel=1e-5)
    mean = nt_xent(torch.tensor(U), torch.tensor(V), 0.5, reduction="mean")
    assert mean.item() == pytest.approx(_hand_nt_xent(U, V, 0.5) / 6, rel=1e-5)
    zero = nt_xent(torch.tensor(U), torch.tensor(V), 0.5, weights=torch.zeros(3))
    assert zero.item() == 0.0


def test_quantization_and_bit_balance():
    b = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    h1 = torch.tensor([[0.5, -0.5], [-1.0, 0.0]])
    h2 = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    # h1: 0.25 + 0.25 + 0 + 1 ; h2: 0 + 0 + 1 + 0
    assert quantization_loss(b, [h1, h2]).item() == pytest.approx(2.5)
    assert bit_balance_loss(torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.5]])).item() == (
        pytest.approx(9 + 0.25)
    )


def test_adversarial_terms():
    real, fake = torch.tensor([2.0, 4.0]), torch.tensor([1.0, -1.0])
    assert critic_loss(real, fake).item() == pytest.approx(0.0 - 3.0)
    assert generator_loss(fake).item() == pytest.approx(0.0)


def test_gradient_penalty_of_linear_critic():
    # critic(x) = x·a has gradient a everywhere → penalty (‖a‖ − 1)².
    a = torch.tensor([3.0, 4.0])
    gp = gradient_penalty(lambda x: x @ a, torch.randn(5, 2), torch.randn(5, 2))
    assert gp.item() == pytest.approx((5.0 - 1.0) ** 2)
    unit = gradient_penalty(lambda x: x @ (a / 5), torch.randn(5, 2), torch.randn(5, 2))
    assert unit.item() == pytest.approx(0.0, abs=1e-10)
