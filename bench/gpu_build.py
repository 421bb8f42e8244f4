"""Stage b of gpu_suite.sh: build the compiled update kernels once, timed, and check one call of
each against the reference.

    python bench/gpu_build.py [--output build.json]

On a GPU: ``llc_fast.kernels.cuda_update.load_cuda_update()`` (nvcc for this GPU's architecture, then
one tiny launch), then one call of the CUDA and of the Triton update (its first call compiles the
kernel) on 2^20 float32 elements of 2 chains, each compared with the reference update on the same
inputs. Without a GPU: the CUDA source is compiled with nvcc for sm_90 if nvcc is there (no launch),
and the Triton update makes its call in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors.
Either way the C++ update (``load_cpu_update``) is built too, so that later stages find it cached;
its failure is reported but does not fail the stage.

Exit code 0 when the CUDA and Triton updates built and agreed with the reference, 77 (skipped)
when there is no GPU and everything that could be checked without one passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import time
import traceback

import torch

from harness import write_results

from llc_fast.kernels import SamplerSettings, StepCounters  # noqa: E402  (harness puts the repository on sys.path)
from llc_fast.kernels import build  # noqa: E402
from llc_fast.kernels.reference import reference_update  # noqa: E402

SKIP = 77


def timed(label: str, fn, results: dict) -> object:
    t0 = time.perf_counter()
    try:
        out = fn()
        results[label] = dict(ok=True, seconds=round(time.perf_counter() - t0, 3))
        print(f"{label}: ok ({results[label]['seconds']:.1f} s)", flush=True)
        return out
    except Exception as e:
        results[label] = dict(ok=False, seconds=round(time.perf_counter() - t0, 3),
                              error=f"{type(e).__name__}: {str(e)[:2000]}")
        print(f"{label}: FAILED after {results[label]['seconds']:.1f} s: {type(e).__name__}: {e}", flush=True)
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    err = (w_dev.cpu().double() - w_ref.double()).abs().max().item()
    tol = (kw["lr"] * 10) ** 0.5 * 1e-5 + 1e-6 * (w_ref.abs().max().item() + 1)
    if not err <= tol:
        raise AssertionError(f"max |w - w_ref| = {err:.3g} > {tol:.3g}")
    return f"max |w - w_ref| = {err:.2e} (tolerance {tol:.1e})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", help="write the stage's results as JSON")
    args = ap.parse_args(argv)

    results: dict = {}
    gpu = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    print(f"# GPU: {torch.cuda.get_device_name(0) if gpu else 'none'}; TRITON_INTERPRET={'1' if interp else 'unset'}; "
          f"build dir: {build.build_root() or '(default caches)'}", flush=True)
    notes = []

    if gpu:
        from llc_fast.kernels.cuda_update import load_cuda_update

        cuda = timed("CUDA update: load_cuda_update() (nvcc build + one launch)", load_cuda_update, results)
        if cuda is not None:
            r = timed("CUDA update: one call vs the reference", lambda: check_against_reference(cuda.update,
                                                                                            torch.device("cuda")),
                      results)
            if r:
                print(f"  {r}")
        from llc_fast.kernels.triton_update import triton_update

        r = timed("Triton update: first call (compiles) vs the reference",
                  lambda: check_against_reference(triton_update.update, torch.device("cuda")), results)
        if r:
            print(f"  {r}")
        cuda_ok = all(v["ok"] for k, v in results.items() if k.startswith(("CUDA", "Triton")))
    else:
        try:
            nvcc = build.find_nvcc()
        except RuntimeError:
            nvcc = None
        if nvcc:
            lib = timed(f"CUDA source: nvcc build for sm_90 (no GPU: not launched; {nvcc})",
                        lambda: build.cuda_library("sm_90"), results)
            if lib is not None:
                print(f"  {lib}")
                notes.append("nvcc compiled the .cu (sm_90)")
        else:
            print("CUDA update: no GPU and no nvcc: not built")
            notes.append("no nvcc")
        if interp:
            from llc_fast.kernels.triton_update import triton_update

            r = timed("Triton update: one call in the interpreter vs the reference",
                      lambda: check_against_reference(triton_update.update, torch.device("cpu"), n=4099), results)
            if r:
                print(f"  {r}")
                notes.append("Triton interpreter call agrees")
        else:
            print("Triton update: no GPU and TRITON_INTERPRET is not 1: not run")
        cuda_ok = all(v["ok"] for v in results.values())

    from llc_fast.kernels.cpp_update import load_cpu_update

    cpu = timed("C++ update: load_cpu_update() (built for later stages)", load_cpu_update, results)
    if cpu is None:
        notes.append("C++ update did not build (not needed on the GPU)")

    if args.output:
        write_results(args.output, dict(gpu=gpu, triton_interpret=interp),
                      [dict(step=k, **v) for k, v in results.items()])
    failed = [k for k, v in results.items() if not v["ok"] and not k.startswith("C++")]
    if failed:
        print("SUMMARY: FAILED: " + "; ".join(failed))
        return 1
    secs = ", ".join(f"{k.split(':')[0]} {v['seconds']:.1f} s" for k, v in results.items() if v["ok"])
    if not gpu:
        print(f"SKIPPED: no GPU ({'; '.join(notes)}; {secs})")
        return SKIP
    print(f"SUMMARY: CUDA and Triton built and agree with the reference ({secs})" if cuda_ok else "SUMMARY: FAILED")
    return 0 if cuda_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
