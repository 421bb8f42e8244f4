"""How many chain rows share a batched group and a forward/backward pass: planned before sampling from the memory
model (state/memory.py) on the CPU as on a GPU, said in result.config; a pass that runs out of memory is split
in half and retried, never abandoned for one chain at a time, and the chains stay the same."""
import numpy as np
import pytest
import torch

import llc_fast
from llc_fast.chains.engines import BatchMemoryWarning, VmapEngine, is_out_of_memory
from llc_fast.state import memory

from conftest import mlp_case

SETTINGS = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=5, num_draws=6, num_burnin_steps=3, progress=False,
                seed=7)

OOM_ERRORS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu_allocator": lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                          "4294967296 bytes. Error code 12 (Cannot allocate memory)"),
    "memory_error": lambda: MemoryError(),
}


def _run(**kw):
    model, loader, loss_fn = mlp_case()
    return llc_fast.estimate_llc(model, loader, loss_fn, **dict(SETTINGS, **kw))


def _passes_above(monkeypatch, rows: int, error, after_calls: int = 0) -> list:
    """Make every batched pass of more than ``rows`` rows raise ``error()`` (after ``after_calls`` passes);
    returns the sizes of the passes that ran."""
    original, sizes = VmapEngine._call, []

    def call(self, w, batch, batch_dim):
        if w.shape[0] > rows and len(sizes) >= after_calls:
            raise error()
        sizes.append(w.shape[0])
        return original(self, w, batch, batch_dim)

    monkeypatch.setattr(VmapEngine, "_call", call)
    return sizes


@pytest.mark.parametrize("kind", sorted(OOM_ERRORS))
@pytest.mark.parametrize("batching,after", [("auto", 0), ("vmap", 4)])
def test_an_out_of_memory_pass_is_halved_and_the_chains_are_the_same(monkeypatch, kind, batching, after):
    """OOM when a pass has more than 2 rows: at the trial pass ("auto") or mid-run ("vmap", at the 5th pass).
    The passes halve (5 -> 3 -> 2 rows) at once with a warning naming the cap that fits, the run stays batched,
    and every chain is bit for bit the chain of a run in groups of 2 (and of a sequential run, to float
    rounding)."""
    groups_of_two = _run(max_batched_chains=2)
    sequential = _run(chain_batching="sequential")
    sizes = _passes_above(monkeypatch, 2, OOM_ERRORS[kind], after_calls=after)
    with pytest.warns(BatchMemoryWarning, match=r"of 3 chains ran out of memory .*max_batched_chains=2"):
        got = _run(chain_batching=batching, row_batching="fit")  # no timed trials: the passes are the plan's
    assert got.config["engine"] == "vmap" and got.config["rows_per_group"] == 5 and got.config["rows_per_pass"] == 2
    assert "ran out of memory" in got.config["row_plan"]
    assert max(sizes[after:]) == 2
    for field in ("loss_trace", "burnin_loss_trace", "llc_per_chain"):
        np.testing.assert_array_equal(getattr(got, field), getattr(groups_of_two, field))
    np.testing.assert_allclose(got.loss_trace, sequential.loss_trace, rtol=1e-6, atol=0)


def test_out_of_memory_with_one_row_per_pass_is_raised(monkeypatch):
    """Nothing smaller to try: chain_batching="vmap" raises the error; "auto" runs one chain at a time and says
    why (the sequential engine needs no vmapped pass)."""
    _passes_above(monkeypatch, 0, OOM_ERRORS["cuda"])
    with pytest.warns(BatchMemoryWarning), pytest.raises(torch.OutOfMemoryError):
        _run(chain_batching="vmap")
    with pytest.warns(RuntimeWarning, match=r"could not be batched over chains \(OutOfMemoryError"):
        got = _run()
    assert got.config["engine"] == "sequential" and got.config["rows_per_group"] == 1
    assert got.config["row_plan"].startswith("1 row: the model could not be batched")


def test_other_errors_are_not_retried(monkeypatch):
    sizes = _passes_above(monkeypatch, 0, lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _run(chain_batching="vmap")
    assert sizes == []


@pytest.mark.parametrize("error,oom", [
    (torch.OutOfMemoryError("CUDA out of memory"), True), (MemoryError(), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), True), (RuntimeError("CUDA out of memory."), True),
    (RuntimeError("Batch norm got a batched tensor"), False), (ValueError("out of memory"), False)])
def test_is_out_of_memory(error, oom):
    assert is_out_of_memory(error) is oom


def _row_bytes(model) -> int:
    numel = sum(p.numel() for p in model.parameters())
    return sum(memory.row_bytes(numel, torch.float32, False).values())


def test_the_plan_on_cpu_uses_the_available_memory_and_is_reported(monkeypatch):
    """No batch_memory_bytes: half the available CPU memory bounds the rows, before sampling, as on a GPU."""
    per_row = _row_bytes(mlp_case()[0])
    full = _run()
    assert full.config["rows_per_group"] == 5 and "5 of 5 rows" in full.config["row_plan"]
    assert "available CPU memory" in full.config["row_plan"]
    free = int(2 * per_row / memory.AVAILABLE_FRACTION) + 1  # room for two rows' buffers
    monkeypatch.setattr(memory, "_cpu_available_bytes", lambda: free)
    tight = _run()
    assert tight.config["rows_per_group"] == 2 and "rows_per_pass" not in tight.config
    assert tight.config["row_plan"].startswith("2 of 5 rows") and "is all that fits" in tight.config["row_plan"]
    assert "available CPU memory" in tight.config["row_plan"]
    np.testing.assert_array_equal(tight.loss_trace, full.loss_trace)


def test_the_plan_takes_batch_memory_bytes_and_max_batched_chains(monkeypatch):
    per_row = _row_bytes(mlp_case()[0])

    def unread():
        raise AssertionError("the available memory was read although batch_memory_bytes was given")

    monkeypatch.setattr(memory, "_cpu_available_bytes", unread)
    got = _run(batch_memory_bytes=3 * per_row)
    assert got.config["rows_per_group"] == 3 and f"batch_memory_bytes={3 * per_row}" in got.config["row_plan"]
    got = _run(batch_memory_bytes=10 * per_row, max_batched_chains=4)
    assert got.config["rows_per_group"] == 4 and "(max_batched_chains=4)" in got.config["row_plan"]
    got = _run(chain_batching="sequential")
    assert got.config["rows_per_group"] == 1 and "chain_batching='sequential'" in got.config["row_plan"]


def test_unknown_memory_plans_every_row_and_says_so(monkeypatch):
    monkeypatch.setattr(memory, "_cpu_available_bytes", lambda: None)
    rows, why = memory.plan_rows(7, 1000, torch.float32, True, torch.device("cpu"))
    assert rows == 7 and "cannot be read" in why and "batch_memory_bytes" in why


def test_cpu_available_bytes_is_read():
    """The count the plan uses on this machine: positive and at most the machine's memory."""
    free = memory._cpu_available_bytes()
    try:
        total = next(int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal:"))
    except OSError:
        pytest.skip("no /proc/meminfo here")
    assert free is not None and 0 < free <= total
