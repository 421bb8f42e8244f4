"""``llc-fast demo``: estimate the LLC of a small deep linear network against its exact value."""
from __future__ import annotations

import argparse
import math
import time

from .options import add_llc_options, llc_options

DEMO_WIDTHS = (4, 3, 4)
DEMO_RANK = 1
#: estimate_llc's options the demo takes, and its own defaults of them (settings that estimate this model well)
DEMO_OPTIONS = ("sampler", "lr", "gamma", "num_chains", "num_draws", "num_burnin_steps", "seed", "backend", "progress")
DEMO_DEFAULTS = dict(lr=1e-4, num_draws=5000, num_burnin_steps=5000)


def _demo(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..api import refuse_under_torchrun

    try:
        refuse_under_torchrun("llc-fast demo", "run it without torchrun: llc-fast demo")
    except ValueError as e:
        print(f"llc-fast demo: {e}", file=sys.stderr, flush=True)
        return 2
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from .. import estimate_llc
    from ..oracles import dln_dataset, dln_learning_coefficient, make_dln, mse_loss

    # a 24-parameter model: extra intra-op threads only add synchronisation (and on a loaded machine, stalls)
    torch.set_num_threads(1)
    widths, rank = DEMO_WIDTHS, DEMO_RANK
    exact = float(dln_learning_coefficient(widths, rank).llc)
    model = make_dln(widths, rank, seed=args.seed)
    dataset = dln_dataset(model, args.num_samples, seed=args.seed, input_range=1.0)
    # whole shuffled batches by one index operation each (TensorDataset takes index lists)
    data = DataLoader(dataset, batch_size=None,
                      sampler=BatchSampler(RandomSampler(dataset), args.batch_size, drop_last=True))
    n = args.num_samples
    print(f"Deep linear network, widths {widths}, every layer of rank {rank}: "
          f"{sum(p.numel() for p in model.parameters())} parameters, n = {n}, nbeta = n/log n = {n / math.log(n):.1f}")
    print(f"exact learning coefficient (Aoyagi 2024): {exact:g}")
    t0 = time.perf_counter()
    result = estimate_llc(model, data, mse_loss, **llc_options(args))
    seconds = time.perf_counter() - t0
    err = (result.llc_mean - exact) / exact
    print(f"estimate: {result.llc_mean:.3f} ± {result.llc_std:.3f} (std over {args.num_chains} chains, "
          f"standard error {result.llc_stderr:.3f}), exact {exact:g}, relative error {err:+.1%}, "
          f"{seconds:.1f} s on backend {result.config['backend']!r}")
    if args.output:
        result.save(args.output)
        print(f"result written to {args.output}")
    return 0


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="estimate the LLC of a small deep linear network and compare with the exact value")
    add_llc_options(demo, DEMO_OPTIONS, defaults=DEMO_DEFAULTS)
    demo.add_argument("--num-samples", type=int, default=10_000)
    demo.add_argument("--batch-size", type=int, default=500)
    demo.add_argument("--output", help="write the LLCResult as JSON to this file")
    demo.set_defaults(func=_demo)
