"""Run named cases of cases.py under torchrun; rank 0 writes OUTDIR/<case>.json (the LLCResult).

    torchrun --standalone --nproc_per_node=2 run_cases.py OUTDIR CASE[:S|:presharded] ...

S is the shard group size (default: the world size, through estimate_llc's dispatch); "presharded"
shards the model with fully_shard here (blocks, then the root) before calling estimate_llc. Every
run checks that the model's parameters hold w* again afterwards, bitwise.
"""
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import cases

import llc_fast
from llc_fast.distributed import estimate_llc_sharded, shard_model


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        name, _, s = spec.partition(":")
        make_model, make_data, loss, kwargs = cases.CASES[name]
        model = make_model()
        if s == "presharded":
            from torch.distributed.device_mesh import init_device_mesh

            shard_model(model, init_device_mesh("cpu", (dist.get_world_size(),)))
        before = {n: full(p).clone() for n, p in model.named_parameters()}
        t0 = time.perf_counter()
        if s and s != "presharded":
            result = estimate_llc_sharded(model, make_data(), loss, shard_group_size=int(s), **kwargs)
        else:  # through estimate_llc's dispatch
            result = llc_fast.estimate_llc(model, make_data(), loss, **kwargs)
        changed = [n for n, p in model.named_parameters() if not torch.equal(full(p), before[n])]
        if changed:
            raise AssertionError(f"{spec}: parameters not restored to w*: {changed}")
        if dist.get_rank() == 0:
            result.save(out / f"{name}{'_' + s if s == 'presharded' else '_S' + s if s else ''}.json")
            print(f"{spec}: {time.perf_counter() - t0:.2f} s, engine {result.config['engine']}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
