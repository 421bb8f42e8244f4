"""MALA acceptance against the oracle vectors (U = |w|^2/2, g = w)."""
import math

import pytest
import torch

from llc_fast.diagnostics import mala_log_acceptance


@pytest.mark.parametrize("w,w_new,lr,expected", [
    ((0.0, 0.0), (1.5, 5.5), 0.1, 0.6661436),
    ((1.0, 1.0), (1.5, 0.5), 0.5, 0.9692332),
    ((0.0, 0.0), (10.5, 5.5), 0.1, 0.1726912),
    ((0.0, 0.0), (10.5, 5.5), 0.5, 0.00015359),
])
def test_oracle_vectors(w, w_new, lr, expected):
    w, w_new = torch.tensor([w], dtype=torch.float64), torch.tensor([w_new], dtype=torch.float64)
    u, u_new = 0.5 * (w**2).sum(1), 0.5 * (w_new**2).sum(1)
    a = math.exp(mala_log_acceptance(w, w_new, w, w_new, u, u_new, lr).item())
    assert a == pytest.approx(expected, rel=1e-6, abs=5e-9)  # the oracle prints 7 significant digits or 1e-8


def test_preconditioner_is_a_change_of_step_per_coordinate():
    """With G per coordinate the proposal is N(w - lr/2 G g, lr G): equal to plain MALA with step lr*G in 1-D."""
    w, w_new = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[0.9]], dtype=torch.float64)
    u, u_new = 0.5 * w[:, 0] ** 2, 0.5 * w_new[:, 0] ** 2
    pre = mala_log_acceptance(w, w_new, w, w_new, u, u_new, 0.1, precond=torch.tensor([[4.0]]))
    plain = mala_log_acceptance(w, w_new, w, w_new, u, u_new, 0.4)
    assert pre.item() == pytest.approx(plain.item(), rel=1e-12)


def test_masked_coordinates_left_out_and_batched_over_chains():
    w = torch.tensor([[0.0, 0.0, 7.0], [1.0, 1.0, 7.0]], dtype=torch.float64)
    w_new = torch.tensor([[1.5, 5.5, 7.0], [1.5, 0.5, 7.0]], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0])
    u, u_new = 0.5 * (w[:, :2] ** 2).sum(1), 0.5 * (w_new[:, :2] ** 2).sum(1)
    a = mala_log_acceptance(w, w_new, w * mask, w_new * mask, u, u_new, torch.tensor([0.1, 0.5]), mask=mask).exp()
    torch.testing.assert_close(a, torch.tensor([0.6661436, 0.9692332], dtype=torch.float64), rtol=1e-6, atol=0)
