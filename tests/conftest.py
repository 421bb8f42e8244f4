"""Test-wide settings, and the small models and data several test files share (``from conftest import ...``).

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so before llc_fast is imported: on
machines without a GPU, Triton kernels run in the interpreter."""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # CI has 2 cores; other processes share them

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def update_backend(name: str):
    """(update function, device of its tensors) of a fused-update backend; skips the test where it cannot run."""
    if name == "torch":
        from llc_fast.kernels.torch_update import reference_update

        return reference_update, torch.device("cpu")
    if name == "cpu":
        from llc_fast.kernels.cpu_update import load_cpu_update

        try:
            return load_cpu_update(), torch.device("cpu")
        except RuntimeError as e:  # pragma: no cover - no compiler
            pytest.skip(f"the C++ update cannot be built here: {e}")
    if name == "triton":
        pytest.importorskip("triton")
        from llc_fast.kernels.triton_update import triton_update

        return triton_update, DEVICE
    if name == "cuda":
        if not ON_GPU:
            pytest.skip("no CUDA GPU")
        from llc_fast.kernels.cuda_update import load_cuda_update

        return load_cuda_update(), DEVICE
    raise AssertionError(name)


def quadratic_model(R: int, h: torch.Tensor) -> torch.nn.Module:
    """The mean of R copies of K(w) = sum_j h_j w_j^2 / 2 at w* = 0, one float64 parameter [R, len(h)]; called
    with no batch (``loss_fn = lambda m, b: m()``). Samplers' stationary-law oracles run on it."""
    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(R, h.numel(), dtype=torch.float64))

        def forward(self):
            return (0.5 * h * self.w ** 2).sum() / R

    return Quadratic()


def batch_means_se(y, batches: int) -> float:
    """Standard error of the mean of y [chains, draws] from the means of ``batches`` consecutive blocks per chain."""
    blocks = y[:, : y.shape[1] // batches * batches].reshape(y.shape[0], batches, -1).mean(axis=2).ravel()
    return float(blocks.std(ddof=1) / math.sqrt(blocks.size))


# --- shared case builders: (model, data, loss_fn) ------------------------------------------------

def regression_data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def mlp_case():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=gen), torch.randint(0, 3, (96,), generator=gen)
    torch.manual_seed(0)  # the same weights in every process
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    return model, loader, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])


class TokenModel(nn.Module):
    """Embedding + LayerNorm + tied unembedding."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.relu(self.mix(self.norm(self.emb(idx)))))


def token_case():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (64, 9), generator=gen)
    loader = DataLoader(TensorDataset(tokens), batch_size=16, shuffle=True)

    def loss_fn(m, batch):
        idx = batch[0]
        logits = m(idx[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))

    return TokenModel(), loader, loss_fn


def gpt2_case():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    gen = torch.Generator().manual_seed(2)
    loader = DataLoader(TensorDataset(torch.randint(0, 50, (32, 12), generator=gen)), batch_size=8, shuffle=True)
    return model, loader, lambda m, b: m(input_ids=b[0], labels=b[0]).loss


def checkpoint_recorder(path, loss_fn):
    """(loss_fn that keeps a copy of every checkpoint written to ``path``, the list of (mtime_ns, bytes) copies)."""
    seen = []

    def recording(m, b):
        if path.exists() and (not seen or path.stat().st_mtime_ns != seen[-1][0]):
            seen.append((path.stat().st_mtime_ns, path.read_bytes()))
        return loss_fn(m, b)

    return recording, seen



@pytest.fixture
def tiny_tmpfs(tmp_path):
    """mount(size) -> a directory on a fresh tmpfs of ``size`` (e.g. "64k"), unmounted after the test; skips the test
    where mounting is not permitted (not root, a container without CAP_SYS_ADMIN, not Linux)."""
    import subprocess

    mounted = []

    def mount(size: str):
        import shutil

        if shutil.which("mount") is None or shutil.which("umount") is None:
            pytest.skip("cannot mount a tmpfs here: no mount command")
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def counted_mlp():
    """mlp_case() with a loss_fn that counts its calls: (model, loader, loss_fn, calls), so that a test can see that
    nothing was sampled."""
    model, loader, loss_fn = mlp_case()
    calls = []

    def counting(m, b):
        calls.append(1)
        return loss_fn(m, b)

    return model, loader, counting, calls


def gpt2_checkpoint_run(root, steps) -> list[str]:
    """Tiny GPT-2 checkpoints root/run/checkpoint-<step> (save_pretrained) and root/tokens.npy; the llc-fast
    checkpoints arguments that read them."""
    transformers = pytest.importorskip("transformers")
    for step in steps:
        torch.manual_seed(step)
        config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16)
        transformers.GPT2LMHeadModel(config).save_pretrained(root / "run" / f"checkpoint-{step}")
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 40, (32, 10)))
    return ["checkpoints", "--models", str(root / "run"), "--data", str(root / "tokens.npy")]
