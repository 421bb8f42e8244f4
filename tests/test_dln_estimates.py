"""End to end: estimate_llc on deep linear networks against Aoyagi's exact learning coefficient.

Teachers have every layer of rank exactly r (where the local coefficient equals the formula),
inputs are uniform on (-1, 1), n = 10,000 samples in minibatches of 500, nbeta = n/log n,
gamma = 1, lr = 3e-4 with 3,000 burn-in steps and 3,000 draws. The accepted band is 15 %
(the issue's target), which is more than 3 standard errors of each estimate here.
"""
import math

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

import llc_fast
from llc_fast.oracles import dln_dataset, dln_learning_coefficient, make_dln, mse_loss


def dln_estimate(widths, rank, *, num_chains=4, seed=0):
    model = make_dln(widths, rank, seed=1)
    data = dln_dataset(model, 10_000, seed=2, input_range=1.0)
    loader = DataLoader(data, batch_size=None, sampler=BatchSampler(RandomSampler(data), 500, drop_last=True))
    return llc_fast.estimate_llc(model, loader, mse_loss, lr=3e-4, gamma=1.0, num_chains=num_chains,
                                 num_draws=3000, num_burnin_steps=3000, seed=seed, progress=False)


@pytest.mark.parametrize("widths,rank", [((4, 3, 4), 1), ((5, 4, 5), 0), ((8, 4, 8), 2), ((4, 3, 3, 4), 1)])
def test_dln_within_15_percent(widths, rank):
    exact = float(dln_learning_coefficient(widths, rank).llc)
    r = dln_estimate(widths, rank)
    assert r.config["nbeta"][0] == pytest.approx(10_000 / math.log(10_000))
    assert abs(r.llc_mean - exact) < 0.15 * exact, r.summary()
    assert 3 * r.llc_stderr < 0.15 * exact  # precise enough for the 15 % band to mean something
