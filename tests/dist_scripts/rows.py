"""Restricted, refined and susceptibility runs under torchrun (``row_cases.py``); every rank saves its summary.

    torchrun --standalone --nproc_per_node=2 rows.py OUTDIR CASE[:ckpt|:resume|:fail] ...

CASE alone: OUTDIR/CASE.rank<r>.npz. ":ckpt": the run writing OUTDIR/CASE.ckpt every 5 steps (.ckpt.npz);
":resume": the same run continued from that checkpoint (.resume.npz). ":fail": rank 1's loss_fn raises at its
10th call (nothing is written); ":alive": the same, but rank 1 catches the error and stays alive (sleeping), so
rank 0, waiting in the gather, must be ended by the failure guard. Rank 0 prints each run's row facts.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import cases
import row_cases


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out, rank = Path(sys.argv[1]), dist.get_rank()
    for spec in sys.argv[2:]:
        case, _, mode = spec.partition(":")
        extra = {}
        if mode in ("ckpt", "resume"):
            extra = dict(checkpoint=str(out / f"{case}.ckpt"), checkpoint_every=5)
            if mode == "resume":
                extra["resume"] = str(out / f"{case}.ckpt")
        if mode in ("fail", "alive"):
            calls = [0]
            mse = cases.mse

            def failing(model, batch):
                calls[0] += 1
                if rank == 1 and calls[0] == 10:
                    raise ValueError("injected failure in loss_fn")
                return mse(model, batch)

            cases.mse = failing
        try:
            result = row_cases.run(case, **extra)
        except ValueError:
            if mode == "alive" and rank == 1:
                time.sleep(120)
            raise
        facts = (result.llcs if hasattr(result, "llcs") else result)
        facts = facts.facts if hasattr(facts, "facts") else facts.config
        np.savez(out / f"{case}{'.' + mode if mode else ''}.rank{rank}.npz", **row_cases.summary(result))
        if rank == 0:
            print(f"{spec}: row_split={facts.get('row_split')} world_size={facts.get('world_size')} "
                  f"row_storage={facts.get('row_storage')}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
