import math

import pytest
import torch

from mammo_retrieval.train.losses import nt_xent


def naive_nt_xent(z1, z2, tau):
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        positive = (i + n2 // 2) % n2
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[positive]) / tau) / denominator)
    return total / n2


@pytest.mark.parametrize("n, tau", [(3, 0.5), (5, 1.0), (4, 0.07)])
def test_closed_form_for_orthogonal_pairs(n, tau):
    # positives identical, every other pair orthogonal: loss = log(1 + (2N - 2) exp(-1/tau))
    z = torch.eye(n)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / tau))  # 3.6e-6 at tau=0.07: compare absolutely
    assert float(nt_xent(z, z.clone(), tau)) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_a_single_pair_has_zero_loss():
    # N=1: the only other view is the positive, so the softmax is certain and the loss 0
    z1 = torch.tensor([[1.0, 0.0]])
    assert float(nt_xent(z1, z1.clone(), 0.07)) == pytest.approx(0.0, abs=1e-7)


def test_matches_a_naive_loop_on_random_projections():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen)
    assert float(nt_xent(z1, z2, 0.07)) == pytest.approx(naive_nt_xent(z1, z2, 0.07), rel=1e-4)


def test_half_precision_inputs_do_not_overflow():
    z = torch.eye(4).half()
    assert torch.isfinite(nt_xent(z, z.clone(), 0.07))
