"""Stages a and b of gpu_suite.sh: the environment of a GPU run, then the compiled update kernels built once,
timed, and one call of each checked against the reference.

    python bench/gpu_build.py --env [--output env.json]     # stage a (the suite writes it to env.txt)
    python bench/gpu_build.py [--output build.json]         # stage b

What each stage prints, builds and checks, with a GPU and without (``--dry-run``): bench/README.md, "The GPU
campaign". Exit code: stage a 0, without a GPU too; stage b 0 when the CUDA and Triton updates built and agreed
with the reference, 77 (skipped) when there is no GPU and all that could be checked without one passed, else 1.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import traceback

import torch

from harness import begin, cli, synchronize, version, write_results

from llc_fast.kernels import SamplerSettings, StepCounters, build, reference_update  # noqa: E402  (harness: sys.path)

SKIP = 77
PACKAGES = ("transformers", "devinterp", "arviz_stats", "numpy", "pytest", "xdist")
SMI_QUERY = ("--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.draw,"
             "power.limit,temperature.gpu,persistence_mode,compute_mode,mig.mode.current")


def shell(*cmd: str) -> str:
    """Print '$ cmd' and its output (or why there is none), after a blank line; return the output."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30) if shutil.which(cmd[0]) else None
        out = f"({cmd[0]} not found)" if p is None else \
            (p.stdout + p.stderr).strip() or f"(no output, exit code {p.returncode})"
    except (OSError, subprocess.SubprocessError) as e:
        out = f"({' '.join(cmd)} failed: {type(e).__name__}: {e})"
    print(f"\n$ {' '.join(cmd)}\n{out}")
    return out


def env_stage(output, argv=None) -> int:
    """Stage a: the facts of the machine, printed and (``output``) written as JSON."""
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
    env = begin("gpu_suite environment", device, argv, **{f"version_{m}": version(m) for m in PACKAGES}, **facts)
    print("# " + ", ".join(f"{m} {env[f'version_{m}']}" for m in PACKAGES))
    print("# " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    query = shell("nvidia-smi", SMI_QUERY, "--format=csv")
    shell("nvidia-smi")
    nvcc = shell("nvcc", "--version")
    env.update(nvidia_smi_query=query, nvcc=nvcc.splitlines()[-1] if nvcc else "")
    print(f"SUMMARY: {facts.get('gpu_name', 'no GPU')}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {env['triton']}, devinterp {env['version_devinterp']}, transformers {env['version_transformers']}")
    write_results(output, env, [])
    return 0


def timed(label: str, fn, results: dict) -> object:
    """``fn()``, its seconds and whether it raised recorded in ``results[label]`` and printed; its value or None."""
    t0 = time.perf_counter()
    try:
        out = fn()
        results[label] = dict(ok=True, seconds=round(time.perf_counter() - t0, 3))
        print(f"{label}: ok ({results[label]['seconds']:.1f} s)" + (f"\n  {out}" if isinstance(out, str) else ""))
        return out
    except Exception as e:
        secs = round(time.perf_counter() - t0, 3)
        results[label] = dict(ok=False, seconds=secs, error=f"{type(e).__name__}: {str(e)[:2000]}")
        print(f"{label}: FAILED after {secs:.1f} s: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        return None


def check_against_reference(update, device: torch.device, n: int = 1 << 20) -> str:
    """One SGLD step of 2 chains by ``update`` and by the reference on the same inputs; raises if they differ
    by more than the normals' tolerance (docs/noise.md: 1e-5 times the noise scale, plus rounding)."""
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(n, generator=gen)
    w = w_star + 0.1 * torch.randn(2, n, generator=gen)
    grad = torch.randn(2, n, generator=gen)
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, settings=SamplerSettings(), counters=StepCounters(step=3), seed=7,
              chain_ids=torch.tensor([0, 1]))
    w_ref = w.clone()
    reference_update(w_ref, grad, w_star, None, **kw)
    w_dev = w.to(device)
    update(w_dev, grad.to(device), w_star.to(device), None, **kw)
    synchronize(device)
    err = (w_dev.cpu().double() - w_ref.double()).abs().max().item()
    tol = (kw["lr"] * 10) ** 0.5 * 1e-5 + 1e-6 * (w_ref.abs().max().item() + 1)
    if not err <= tol:
        raise AssertionError(f"max |w - w_ref| = {err:.3g} > {tol:.3g}")
    return f"max |w - w_ref| = {err:.2e} (tolerance {tol:.1e})"


def build_stage(output) -> int:
    """Stage b: the CUDA, Triton and C++ updates built, each checked once; ``output``: the steps as JSON."""
    results, notes = {}, []
    gpu, interp = torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET") == "1"
    print(f"# GPU: {torch.cuda.get_device_name(0) if gpu else 'none'}; TRITON_INTERPRET={'1' if interp else 'unset'}; "
          f"build dir: {build.build_root() or '(default caches)'}", flush=True)
    if gpu:
        from llc_fast.kernels.cuda_update import load_cuda_update

        cuda = timed("CUDA update: load_cuda_update() (nvcc build + one launch)", load_cuda_update, results)
        if cuda is not None:
            timed("CUDA update: one call vs the reference",
                  lambda: check_against_reference(cuda.update, torch.device("cuda")), results)
    else:
        try:
            nvcc = build.find_nvcc()
        except RuntimeError:
            nvcc = None
        if nvcc and timed(f"CUDA source: nvcc build for sm_90 (no GPU: not launched; {nvcc})",
                          lambda: str(build.cuda_library("sm_90")), results):
            notes.append("nvcc compiled the .cu (sm_90)")
        elif not nvcc:
            print("CUDA update: no GPU and no nvcc: not built")
            notes.append("no nvcc")
    if gpu or interp:
        from llc_fast.kernels.triton_update import triton_update

        label = "Triton update: " + ("first call (compiles)" if gpu else "one call in the interpreter")
        if timed(f"{label} vs the reference", lambda: check_against_reference(
                triton_update.update, torch.device("cuda" if gpu else "cpu"), n=1 << 20 if gpu else 4099), results):
            notes.append("Triton interpreter call agrees")
    else:
        print("Triton update: no GPU and TRITON_INTERPRET is not 1: not run")
    from llc_fast.kernels.cpu_update import load_cpu_update

    if timed("C++ update: load_cpu_update() (built for later stages)", load_cpu_update, results) is None:
        notes.append("C++ update did not build (not needed on the GPU)")
    write_results(output, dict(gpu=gpu, triton_interpret=interp), [dict(step=k, **v) for k, v in results.items()])
    failed = [k for k, v in results.items() if not v["ok"] and not k.startswith("C++")]
    if failed:
        print("SUMMARY: FAILED: " + "; ".join(failed))
        return 1
    secs = ", ".join(f"{k.split(':')[0]} {v['seconds']:.1f} s" for k, v in results.items() if v["ok"])
    if not gpu:
        print(f"SKIPPED: no GPU ({'; '.join(notes)}; {secs})")
        return SKIP
    print(f"SUMMARY: CUDA and Triton built and agree with the reference ({secs})")
    return 0


def options(ap) -> None:
    ap.add_argument("--env", action="store_true", help="stage a: print (and write) the environment, build nothing")


main = cli(__doc__, options, lambda args, argv: env_stage(args.output, argv) if args.env else build_stage(args.output),
           each="stage", device=None, retry_busy=False, output="write the stage's results as JSON")

if __name__ == "__main__":
    raise SystemExit(main())
