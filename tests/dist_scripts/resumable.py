"""A run that writes checkpoints, to be killed and resumed by tests/test_resume.py (one process or torchrun).

    python resumable.py MODE OUT [SLEEP_S]        MODE: full | ckpt | resume
    torchrun --standalone --nproc_per_node=2 resumable.py MODE OUT [SLEEP_S]

full: an uninterrupted run; ckpt: the same run writing OUT.ckpt every 5 steps, each loss_fn call sleeping
SLEEP_S (so that it can be killed in the middle); resume: the same run continued from OUT.ckpt. Rank 0 writes
the result to OUT.<MODE>.json. The case is cases.py's mlp_rmsprop (RMSProp, mask, box, uneven FSDP shards).
"""
import os
import sys
import time

import torch
import torch.distributed as dist

import cases

import llc_fast


def main():
    torch.set_num_threads(1)
    mode, out = sys.argv[1], sys.argv[2]
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    make_model, make_data, loss, kwargs = cases.CASES["mlp_rmsprop"]
    kwargs = dict(kwargs, num_draws=int(os.environ.get("RESUMABLE_DRAWS", "60")))

    def slow(model, batch):
        time.sleep(pause)
        return loss(model, batch)

    extra = {} if mode == "full" else dict(checkpoint=out + ".ckpt", checkpoint_every=5)
    if mode == "resume":
        extra["resume"] = out + ".ckpt"
    result = llc_fast.estimate_llc(make_model(), make_data(), slow, **kwargs, **extra)
    if not dist.is_initialized() or dist.get_rank() == 0:
        result.save(f"{out}.{mode}.json")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
