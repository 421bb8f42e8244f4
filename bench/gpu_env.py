"""Stage a of gpu_suite.sh: the environment of a GPU run, printed (the suite writes it to env.txt)
and, with ``--output``, as JSON.

    python bench/gpu_env.py [--output env.json]

nvidia-smi (full report and one query line), nvcc --version, the harness's environment header
(date, device, torch/triton/llc_fast versions, git commit, kernel source hashes, C++ flags),
torch's CUDA and cuDNN versions, the GPU's name, capability, memory and multiprocessors, and the
versions of the packages the later stages import (transformers, devinterp, arviz-stats, pytest).
Exits 0 on a machine without a GPU too: the header then says so.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess

import torch

from harness import environment, print_environment, version, write_results

PACKAGES = ("transformers", "devinterp", "arviz_stats", "numpy", "pytest", "xdist")


def run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return f"({cmd[0]} not found)"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (p.stdout + p.stderr).strip() or f"(no output, exit code {p.returncode})"
    except (OSError, subprocess.SubprocessError) as e:
        return f"({' '.join(cmd)} failed: {type(e).__name__}: {e})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", help="also write the facts as JSON")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    facts: dict = dict(cuda_available=gpu, torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                       device_count=torch.cuda.device_count() if gpu else 0)
    if gpu:
        p = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        facts.update(gpu_name=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                     memory_total_gib=round(total / 2**30, 2), memory_free_gib=round(free / 2**30, 2),
                     l2_cache_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    env = environment(device, argv, **{f"version_{m}": version(m) for m in PACKAGES}, **facts)
    print_environment("gpu_suite environment", env)
    print("# " + ", ".join(f"{m} {env[f'version_{m}']}" for m in PACKAGES))
    print("# " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    print()
    print("$ nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,"
          "clocks.mem,power.draw,power.limit,temperature.gpu,persistence_mode,compute_mode,mig.mode.current "
          "--format=csv")
    query = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,"
                 "clocks.mem,power.draw,power.limit,temperature.gpu,persistence_mode,compute_mode,mig.mode.current",
                 "--format=csv"])
    print(query)
    print()
    print("$ nvidia-smi")
    print(run(["nvidia-smi"]))
    print()
    print("$ nvcc --version")
    nvcc = run(["nvcc", "--version"])
    print(nvcc)
    env.update(nvidia_smi_query=query, nvcc=nvcc.splitlines()[-1] if nvcc else "")
    name = facts.get("gpu_name", "no GPU")
    print(f"SUMMARY: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {env['triton']}, "
          f"devinterp {env['version_devinterp']}, transformers {env['version_transformers']}")
    if args.output:
        write_results(args.output, env, [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
