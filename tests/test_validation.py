"""Bad inputs get a clear error before any sampling work: what was wrong and what to pass."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import llc_fast

from conftest import mse, regression_data

X, Y = torch.randn(20, 3), torch.randn(20, 1)
DATA = [(X, Y)]


def call(model=None, data=DATA, loss_fn=mse, **kw):
    args = dict(lr=1e-3, nbeta=10.0, num_chains=2, num_draws=5, progress=False)
    args.update(kw)
    return llc_fast.estimate_llc(model if model is not None else nn.Linear(3, 1), data, loss_fn, **args)


@pytest.mark.parametrize("kw,message", [
    (dict(lr=0.0), r"lr must be a finite number > 0, got 0.0. lr is the SGLD step size"),
    (dict(lr=-1e-3), r"lr must be a finite number > 0"),
    (dict(lr=float("nan")), r"lr must be a finite number > 0"),
    (dict(lr=[1e-3, 0.0]), r"lr must be a finite number > 0, got 0.0"),
    (dict(lr=[1e-3, 1e-3, 1e-3]), r"lr must be a scalar or have one value per chain \(2\), got 3"),
    (dict(nbeta=0.0), r"nbeta must be a finite number > 0.*n/log\(n\)"),
    (dict(nbeta=-5.0), r"nbeta must be a finite number > 0"),
    (dict(gamma=-1.0), r"gamma must be a finite number >= 0.*localization"),
    (dict(num_draws=0), r"num_draws must be an integer >= 1, got 0"),
    (dict(num_chains=0), r"num_chains must be an integer >= 1"),
    (dict(num_burnin_steps=-1), r"num_burnin_steps must be an integer >= 0"),
    (dict(num_steps_bw_draws=0), r"num_steps_bw_draws must be an integer >= 1"),
    (dict(sampler="adam"), r"sampler must be one of \('sgld', 'rmsprop_sgld', 'rmsprop_sgld_bc', 'sgnht'\)"),
    (dict(backend="fastest"), r"backend must be one of"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63\)"),
    (dict(box=0.0), r"box .* must be > 0 or None"),
    (dict(mask={"nope": torch.ones(1)}), r"'nope' is not a sampled parameter; sampled: \['weight', 'bias'\]"),
    (dict(mask={"bias": torch.tensor([0.5])}), r"mask for 'bias' must hold only 0 and 1"),
])
def test_bad_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        call(**kw)


def test_nbeta_required_when_size_unknown():
    with pytest.raises(ValueError, match=r"nbeta is required when the data's size is unknown: pass nbeta=n/log\(n\)"):
        call(nbeta=None)


def test_empty_loader():
    with pytest.raises(ValueError, match="data yielded no batches: pass a non-empty"):
        call(data=[])
    empty = DataLoader(TensorDataset(torch.empty(0, 3), torch.empty(0, 1)), batch_size=4)
    with pytest.raises(ValueError, match="data yielded no batches"):
        call(data=empty)


def test_one_shot_iterator_rejected():
    with pytest.raises(TypeError, match="one-shot iterator.*pass a DataLoader or a list"):
        call(data=iter(DATA))
    with pytest.raises(TypeError, match="re-iterable"):
        call(data=42)


def test_loss_fn_must_return_finite_scalar():
    with pytest.raises(ValueError, match=r"scalar mean loss of the batch, got a tensor of shape \(20, 1\).*loss.mean\(\)"):
        call(loss_fn=lambda m, b: (m(b[0]) - b[1]) ** 2)
    with pytest.raises(ValueError, match=r"non-finite value \(nan\) at w\*"):
        call(loss_fn=lambda m, b: mse(m, b) * float("nan"))
    with pytest.raises(TypeError, match="must return a scalar torch.Tensor, got float"):
        call(loss_fn=lambda m, b: 1.0)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        call(loss_fn="mse")


def test_model_without_trainable_float_parameters():
    frozen = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable floating-point parameters.*requires_grad=True"):
        call(model=frozen)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        call(model=lambda x: x)


def test_mixed_devices_and_dtypes():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].to("meta")
    with pytest.raises(ValueError, match=r"several devices .*move the model to one device"):
        call(model=model)
    mixed = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1).double())
    with pytest.raises(ValueError, match=r"mixed dtypes .*cast the model to one dtype"):
        call(model=mixed)
    with pytest.raises(ValueError, match="float32, float64 or bfloat16"):
        call(model=nn.Linear(3, 1).half())


def test_errors_come_before_sampling():
    """A bad loss at w* is reported before any chain runs: loss_fn is called exactly once."""
    calls = []

    def bad(m, b):
        calls.append(1)
        return mse(m, b) * float("inf")

    with pytest.raises(ValueError):
        call(loss_fn=bad)
    assert len(calls) == 1


TWO_CHAINS = dict(lr=1e-3, nbeta=20.0, num_chains=2, num_draws=12, progress=False)


def _loader():
    return DataLoader(regression_data(), batch_size=16)


@pytest.mark.parametrize("engine", ["vmap", "sequential"])
@pytest.mark.parametrize("bad_loss", [
    lambda m, b: mse(m, b).detach(),
    lambda m, b: torch.no_grad()(mse)(m, b),
    lambda m, b: torch.tensor(3),
], ids=["detached", "no_grad", "int_tensor"])
def test_a_loss_without_gradient_is_refused_before_sampling(engine, bad_loss):
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        return bad_loss(m, b)

    with pytest.raises(ValueError, match=r"loss_fn returned (a tensor without gradient|an integer tensor).*at w\*"):
        llc_fast.estimate_llc(nn.Linear(3, 1), _loader(), loss_fn, chain_batching=engine, **TWO_CHAINS)
    assert len(calls) <= 5  # the initial-loss batches and the check, never a sampling step


def test_small_input_defects():
    model = nn.Linear(3, 1)
    r = llc_fast.estimate_llc(model, _loader(), mse, **dict(TWO_CHAINS, lr=np.array([1e-3, 2e-3])))  # numpy per chain
    assert r.config["lr"] == [1e-3, 2e-3]
    with pytest.raises(TypeError, match=r"mask must be a dict \{parameter name"):
        llc_fast.estimate_llc(model, _loader(), mse, mask=[torch.ones(1, 3)], **TWO_CHAINS)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' but no CUDA GPU is visible.*device='cpu'"):
            llc_fast.estimate_llc(model, _loader(), mse, device="cuda", **TWO_CHAINS)
