"""What the benchmarks time, in one place: the models, their data and losses; the devinterp-style eager
update; the minimal hand-written batched loop (``FlatChains``); and the adapters that run devinterp 2.0.1
on the same model and batches (``run_devinterp``). bench/README.md describes each use."""
from __future__ import annotations

import contextlib
import io
import itertools
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from harness import recorded_warnings, synchronize, wall

from llc_fast.kernels import SamplerSettings, StepCounters  # noqa: E402  (harness puts the repo on sys.path)

MLP_WIDTHS = (784, 1024, 256, 10)  # 1,068,810 parameters
INIT_SEED = 100  # devinterp's default init_seed


# --- models, data, losses -------------------------------------------------------------------------

def mlp(widths, device="cpu", seed: int = 0) -> nn.Sequential:
    """A ReLU MLP of these layer widths, initialised under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).to(device)


def mlp_data(widths, samples: int, seed: int = 0):
    """Random inputs and labels, and their generator (to shuffle or draw training batches with)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, widths[0], generator=gen)
    return x, torch.randint(0, widths[-1], (samples,), generator=gen), gen


def trained_mlp(widths, samples: int, batch: int, train_steps: int, device):
    """An MLP trained ``train_steps`` Adam steps on random labels (so that w* is not the initialisation), its
    data and its full-data loss, on ``device``."""
    x, y, gen = mlp_data(widths, samples)
    x, y = x.to(device), y.to(device)
    model = mlp(widths, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(train_steps):
        idx = torch.randint(0, samples, (batch,), generator=gen).to(device)
        opt.zero_grad()
        ce_loss(model, (x[idx], y[idx])).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss = float(ce_loss(model, (x, y)))
    return model, x, y, loss


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def ce_per_sample(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def mse_per_sample(model, x, y):
    return ((model(x) - y) ** 2).mean(dim=1)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (in float32) of a batch of token ids [B, L]."""
    logits = model(ids, use_cache=False, return_dict=False)[0]
    return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def gpt2(layers: int, heads: int, embd: int, positions: int, vocab: int, device="cpu") -> nn.Module:
    """A GPT-2 from a ``GPT2Config`` with random weights, no dropout, eager attention (SDPA has no vmap rule
    on the CPU), ``eval()``."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=embd, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(device).eval()


LM_ARCHS = {  # (layers, hidden, intermediate, heads, kv heads, vocabulary)
    "llama": (22, 2048, 5632, 32, 4, 32000),  # TinyLlama-1.1B's shape
    "gpt-neox": (16, 2048, 8192, 8, 8, 50304),  # Pythia-1B's shape
}


def causal_lm(arch: str, shape, *, seq_len: int, attn: str, dtype: torch.dtype, device) -> nn.Module:
    """``LlamaForCausalLM`` or ``GPTNeoXForCausalLM`` of ``shape`` (``LM_ARCHS``' order) with random weights
    drawn under a fixed seed on ``device``, cast to ``dtype``, every parameter sampled."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    layers, hidden, inter, heads, kv, vocab = shape
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=max(2048, seq_len), tie_word_embeddings=False,
                  use_cache=False)
    if arch == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model

        cfg = Config(num_key_value_heads=kv, **common)
    else:
        from transformers import GPTNeoXConfig as Config, GPTNeoXForCausalLM as Model

        cfg = Config(hidden_dropout=0.0, attention_dropout=0.0, **common)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(cfg)
    return model.to(dtype).eval().requires_grad_(True)


# --- the devinterp-style eager update: one small torch op after another, per parameter tensor ------

def eager_step(sampler: str, params, grads, inits, square_avgs, *, lr, nbeta, gamma, settings=None) -> None:
    """One SGLD (or RMSProp-SGLD: V update, preconditioner, scaled drift and noise) step the way devinterp's
    optimizer loop does it: separate kernels per tensor (RMSProp's alpha and eps: ``settings``' or 0.99, 0.1)."""
    alpha, eps = (0.99, 0.1) if settings is None else (settings.rmsprop_alpha, settings.rmsprop_eps)
    for p, g, p0, v in zip(params, grads, inits, square_avgs):
        if sampler != "sgld":
            v.mul_(alpha).addcmul_(g, g, value=1 - alpha)
            precond = v.sqrt()
            precond.add_(eps)
            precond.reciprocal_()
        dw = g * nbeta
        if gamma != 0:
            dw.add_(p - p0, alpha=gamma)
        if sampler != "sgld":
            dw.mul_(precond)
        p.add_(dw, alpha=-0.5 * lr)
        noise = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
        if sampler != "sgld":
            noise.mul_(precond.sqrt())
        p.add_(noise, alpha=math.sqrt(lr))


def transformer_split(n: int, layers: int = 8) -> list[tuple[int, ...]]:
    """Shapes of the parameter tensors of a small transformer holding exactly ``n`` elements: ``layers``
    blocks of width d (12 tensors, 12 d^2 + 13 d elements), d the largest multiple of 16 that lets the
    blocks fill most of ``n``; a final LayerNorm; the rest is the token embedding (99 tensors for 8 blocks)."""
    d = 16 * max(1, int(math.sqrt(n / (12 * layers))) // 16)
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    per_block = sum(math.prod(s) for s in block)
    layers = min(layers, max(0, (n - 2 * d) // per_block))
    shapes = [s for _ in range(layers) for s in block]
    if n - layers * per_block >= 2 * d:
        shapes += [(d,), (d,)]  # final LayerNorm
    rest = n - sum(math.prod(s) for s in shapes)
    if rest:
        shapes.insert(0, (rest // d, d) if rest % d == 0 else (rest,))  # token embedding
    assert sum(math.prod(s) for s in shapes) == n
    return shapes


def split_views(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [t.view(s) for t, s in zip(flat.split(sizes), shapes)]


# --- the minimal hand-written batched loop ---------------------------------------------------------

class FlatChains:
    """The minimal batched-chains code a user would write: the sampled parameters of ``model`` as one
    flat row w* [N], chain weights w [C, N], and ``grad_and_value`` of ``loss_fn(model, batch)`` at one
    row, vmapped over the rows of w (the batch shared by every chain). Inside, the model sees views of
    the row as its parameters, put in place either by assigning them into the modules' ``_parameters``
    for the call (``how="swap"``, the fewest Python operations; what llc_fast's vmap engine does too)
    or by ``torch.func.functional_call`` (``how="functional_call"``, torch's documented way)."""

    def __init__(self, model: nn.Module, loss_fn, chains: int, how: str = "swap"):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names, sizes, shapes = [n for n, _ in named], [p.numel() for _, p in named], [tuple(p.shape) for _, p in named]
        self.w_star = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.w = self.w_star.expand(chains, -1).clone()
        self.chains, self.numel, self.how = chains, self.w_star.numel(), how
        index = {id(p): k for k, (_, p) in enumerate(named)}
        owners = []  # (module, attribute, k) for every registration, tied parameters included
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in index:
                mod_name, _, attr = name.rpartition(".")
                owners.append((model.get_submodule(mod_name), attr, index[id(p)]))

        def swap_loss(row, batch):
            pieces = [t.view(s) for t, s in zip(row.split(sizes), shapes)]
            saved = [m._parameters[a] for m, a, _ in owners]
            try:
                for m, a, k in owners:
                    m._parameters[a] = pieces[k]
                return loss_fn(model, batch).reshape(())
            finally:
                for (m, a, _), p in zip(owners, saved):
                    m._parameters[a] = p

        def functional_loss(row, batch):
            params = {n: t.view(s) for n, t, s in zip(names, row.split(sizes), shapes)}
            return loss_fn(lambda *a, **k: functional_call(model, params, a, k), batch).reshape(())

        flat_loss = {"swap": swap_loss, "functional_call": functional_loss}[how]
        self.grad_and_loss = vmap(grad_and_value(flat_loss), in_dims=(0, None), randomness="different")


def hand_loop(chains: FlatChains, batches: list | None, steps: int, backend, *, prepared: bool = False, lr, nbeta,
              gamma, sampler="sgld") -> None:
    """``steps`` steps of the same math as estimate_llc: one vmapped forward+backward and one fused update each
    (``backend.update``; ``prepared``: checked and packed once by ``backend.prepare``, then launched at each step
    with that step's gradients, as estimate_llc's loop does); no checks, no recording. ``batches=None``: the
    update alone, with a fixed small gradient."""
    chains.w.copy_(chains.w_star.expand_as(chains.w))  # every chain from w*
    settings = SamplerSettings(sampler=sampler)
    ids = torch.arange(chains.chains, device=chains.w.device)  # on the device once, not copied per step
    w, w_star, grad = chains.w, chains.w_star, torch.full_like(chains.w, 1e-3) if batches is None else None
    if prepared:
        launch = backend.prepare([(w, torch.zeros_like(w), 0, 0)], w_star, None, lr=lr, nbeta=nbeta, gamma=gamma,
                                 settings=settings, seed=0, chain_ids=ids).launch
    for t in range(steps):
        if batches is not None:
            grad, _loss = chains.grad_and_loss(w, batches[t % len(batches)])
        if prepared:
            launch(StepCounters(step=t), grad.contiguous())
        else:
            backend.update(w, grad, w_star, None, lr=lr, nbeta=nbeta, gamma=gamma, settings=settings,
                           counters=StepCounters(step=t), seed=0, chain_ids=ids)


def fwd_bwd_loop(chains: FlatChains, batches: list, steps: int) -> None:
    """``steps`` vmapped forward+backward passes alone (the gradients are computed and dropped)."""
    for t in range(steps):
        chains.grad_and_loss(chains.w, batches[t % len(batches)])


def module_passes(model: nn.Module, loss_fn, batches: list, passes: int) -> None:
    """``passes`` forward+backward passes of the module itself, one batch after another (the gradients dropped)."""
    for i in range(passes):
        loss_fn(model, batches[i % len(batches)]).backward()
    model.zero_grad(set_to_none=True)


def passes_per_second(run, device, seconds: float) -> float:
    """``run(k)`` (k passes) timed, the device synchronized, with k doubled from 5 until the call takes ``seconds``
    (or k reaches 4096): passes per second. Two passes first, untimed (the first after another code path are slow)."""
    run(2)
    k = 5
    while (total := wall(lambda: run(k), device)) < seconds and k < 4096:
        k *= 2
    return k / total


# --- devinterp 2.0.1 -------------------------------------------------------------------------------

class IdsDataset(torch.utils.data.Dataset):
    """The lightest dataset devinterp 2.0.1's ``sample`` accepts: item i is {"input_ids": rows[i]}.
    devinterp documents a HuggingFace ``Dataset``; it only indexes it and wraps it in a DataLoader, so a
    map-style torch dataset works and is much cheaper per batch."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def hf_dataset(rows: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows.cpu().numpy()}).with_format("torch")


def indexed(x: torch.Tensor, y: torch.Tensor, per_sample: Callable):
    """Sample-index rows [i, i] for devinterp, the batch llc_fast's loss takes from an index batch, and
    devinterp's per-token loss view of the same data."""
    rows = torch.arange(x.shape[0], dtype=torch.int64).unsqueeze(1).repeat(1, 2)

    def to_batch(ids: torch.Tensor):
        idx = ids[:, 0].to(x.device)
        return x[idx], y[idx]

    def per_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
        return per_sample(model, *to_batch(ids)).unsqueeze(1)  # (batch, 1)

    return rows, to_batch, per_token_loss


def _loader(ds, batch_size: int, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True)


def devinterp_epoch(ds, batch_size: int, seed: int = INIT_SEED) -> list[torch.Tensor]:
    """The input_ids batches devinterp 2.0.1's sample_single_chain reads (it cycles this first epoch)."""
    return [b["input_ids"] for b in _loader(ds, batch_size, seed)]


def loader_seconds_per_batch(ds, batch_size: int, batches: int, seed: int = INIT_SEED) -> float:
    """Seconds per batch of devinterp's DataLoader over ``ds``."""
    epochs = itertools.chain.from_iterable(itertools.repeat(_loader(ds, batch_size, seed)))  # epoch after epoch
    t0 = time.perf_counter()
    for _ in itertools.islice(epochs, batches):
        pass
    return (time.perf_counter() - t0) / batches


def import_devinterp() -> tuple[float, str | None]:
    """Import devinterp (~6 s: transformers, datasets, xarray, zarr): (seconds, None or the error)."""
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import devinterp.slt.llc  # noqa: F401
            import devinterp.slt.sampling  # noqa: F401
            import devinterp.slt.weight_restrictions  # noqa: F401  (bench_restricted's masks)
    except Exception as e:
        return time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0, None


@contextlib.contextmanager
def devinterp_quiet():
    """devinterp 2.0.1's sample_single_chain always shows a tqdm bar per chain: hand it a disabled one (and
    put its own back afterwards)."""
    import devinterp.slt.sampler as dsampler

    original = dsampler.trange
    dsampler.trange = lambda *a, **k: original(*a, **dict(k, disable=True))
    try:
        yield
    finally:
        dsampler.trange = original


def run_devinterp(model, ds, per_token_loss, *, lr, nbeta, gamma, chains, draws, burnin, batch_size,
                  init_batches, device, param_masks=None) -> dict:
    """devinterp 2.0.1's estimator (``sample`` then ``compute_llc``: what ``devinterp.slt.llc.llc`` does),
    ``sgmcmc_sgld`` with ``localization=gamma``, timed whole (the device synchronized). Its per-chain λ̂ is
    recomputed from its own loss trace and init loss with burn-in left out (2.0.1 averages burn-in in)."""
    from devinterp.slt.llc import compute_llc
    from devinterp.slt.sampling import sample

    with tempfile.TemporaryDirectory(prefix="bench_devinterp_", ignore_cleanup_errors=True) as tmp:
        synchronize(device)
        t0 = time.perf_counter()
        with recorded_warnings() as caught, devinterp_quiet():
            samples = sample(model, ds, {}, lr=lr, n_beta=nbeta, loss_fn=per_token_loss, param_masks=param_masks,
                             num_chains=chains, num_draws=draws, batch_size=batch_size, num_burnin_steps=burnin,
                             num_steps_bw_draws=1, num_init_loss_batches=init_batches, init_seed=INIT_SEED,
                             localization=gamma, sampling_method="sgmcmc_sgld", device=torch.device(device).type,
                             output_path=Path(tmp) / "samples.zarr")
            res = compute_llc(samples).load()
        synchronize(device)
        seconds = time.perf_counter() - t0
        ids = np.asarray(samples.dataset.sampling_input_ids_micro.values)  # (chain, step, batch, L)
    trace = np.asarray(res.loss_trace.values, dtype=np.float64)  # (chain, step), burn-in included
    init = float(res.init_loss)
    return dict(seconds=seconds, per_chain=nbeta * (trace[:, burnin:].mean(axis=1) - init), init_loss=init,
                own_llc_mean=float(res.llc_mean), own_llc_std=float(res.llc_std), input_ids=ids,
                warnings=caught)


def mean_se(per_chain) -> tuple[float, float]:
    """Mean over the finite chains and its standard error (ddof = 1)."""
    ok = np.asarray(per_chain, dtype=np.float64)
    ok = ok[np.isfinite(ok)]
    if ok.size == 0:
        return math.nan, math.nan
    return float(ok.mean()), float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else math.nan


def fmt_params(n: int) -> str:
    """A parameter count as a table or SUMMARY line states it: '1.07M' from 100,000 up, else '24,576'."""
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def fmt_pm(mean: float, se: float) -> str:
    def g(v):
        return "nan" if not math.isfinite(v) else (f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}")
    return f"{g(mean)} ± {g(se)}"
