"""A run in which rank 1 raises at step 3 of its first chain. Rank 0 would write OUT on success.

    torchrun --standalone --nproc_per_node=2 fail.py MODE OUT

MODE "exit": rank 1's exception ends its process (a script that does not catch it).
MODE "alive": rank 1 catches the exception and keeps its process alive (a caller that catches
errors): rank 0, blocked in FSDP's collective, must still stop in bounded time.
MODE "kill": rank 1 kills itself with SIGKILL there (no exception, no message).
MODE "hang": rank 1 sleeps there for ten minutes, outside any collective (run with a short
LLC_FAST_STALL_TIMEOUT).
"""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import cases

from llc_fast.distributed import estimate_llc_sharded

#: The line rank 1 prints (with time.time()) just before it fails.
INJECTED = "fail.py: failure injected at"


def main():
    torch.set_num_threads(1)
    mode, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    calls = [0]

    def failing_loss(model, batch):
        calls[0] += 1
        if dist.get_rank() == 1 and calls[0] == 16 + 3:  # 16 initial-loss batches, then step 3 of the first chain
            print(f"{INJECTED} {time.time():.3f}", flush=True)  # the tests time the stop from here
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "hang":
                time.sleep(600)
            raise ValueError("injected failure in loss_fn")
        return cases.mse(model, batch)

    kwargs = dict(cases.COMMON, num_init_loss_batches=16, num_draws=50)
    try:
        result = estimate_llc_sharded(cases.mlp(), cases.mlp_data(), failing_loss, failure_grace_s=2.0, **kwargs)
    except ValueError:
        if mode == "alive" and dist.get_rank() == 1:
            time.sleep(120)
        raise
    if dist.get_rank() == 0:
        result.save(out)


if __name__ == "__main__":
    main()
