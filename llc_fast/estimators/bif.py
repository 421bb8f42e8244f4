"""Bayesian influence functions (BIF) from the chains of one run: correlations of per-sample losses across draws.

Kreer, Wu, Adam, Furman & Hoogland, "Bayesian Influence Functions for Hessian-Free Data Attribution" (2025,
arXiv:2509.26544; devinterp 2.x ``bif``): the influence of a training sample z_t on an observable phi is
BIF(z_t, phi) = -Cov[l_t(w), phi(w)] under the localized tempered posterior at w*. With phi the loss l_q of a query
sample (or token) q, llc_fast estimates for every component C (the weights it does not name held at w*, as in the
restricted LLC) the matrix over query samples q and train samples t

    covariance:   Cov_C[l_q, l_t] = (1/N) sum_{c,d} (l_q,cd - mean l_q)(l_t,cd - mean l_t),   N = chains x draws
    correlation:  Cov_C[l_q, l_t] / sqrt(Var_C[l_q] Var_C[l_t])

(the loss values at every draw d of every chain c that did not diverge, pooled about their pooled means, ddof 0;
devinterp's sign: the paper's BIF is minus the covariance). The standard error is the delete-one-chain jackknife
over chains: sqrt((C-1)/C sum_c (theta_(-c) - mean theta_(-.))^2), theta_(-c) the estimate without chain c, so the
autocorrelation within a chain is accounted for (NaN with fewer than 2 chains).

The estimate is streamed: each chain's sums of l_q, l_q^2, l_t, l_t^2 and l_q l_t^T are accumulated over blocks of
draws (the losses read block by block, e.g. from memory-mapped files) and over blocks of query samples, so memory
holds one block, never all draws in float64 (``BLOCK_BYTES``). Values are shifted by their value at w* first (the
sums of products do not lose the covariance to rounding).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..files import check_free_space, reserve
from .bif_result import BIFResult
from .susceptibility import IN_MEMORY_LIMIT, NPY_HEADER_BYTES

KINDS = ("correlation", "covariance")
QUERY, TRAIN = "query", "train"  # the evaluation sets' names in the run's observers
BLOCK_BYTES = 32 * 2**20  # the float64 working set of one block of draws, and of one block of query rows


class ChainSums:
    """Each chain's sums over draws of the shifted losses x [C, D, Nq] and y [C, D, Nt] (``x0``, ``y0``: their
    values at w*): n [C], sx, sxx [C, Nq], sy, syy [C, Nt]; ``ok`` [C]: chains whose values are all finite."""

    def __init__(self, x, y, x0: np.ndarray, y0: np.ndarray, block_bytes: int = BLOCK_BYTES):
        C, D = x.shape[:2]
        self.x, self.y, self.x0, self.y0, self.draws = x, y, x0, y0, D
        self.step = max(1, block_bytes // (8 * C * (x.shape[2] + y.shape[2])))  # draws per block
        self.ok = np.ones(C, dtype=bool)
        self.sx, self.sxx = np.zeros((C, x.shape[2])), np.zeros((C, x.shape[2]))
        self.sy, self.syy = np.zeros((C, y.shape[2])), np.zeros((C, y.shape[2]))
        for a, b in self.blocks():
            xb, yb = self.block(self.x, self.x0, a, b), self.block(self.y, self.y0, a, b)
            self.ok &= np.isfinite(xb).all(axis=(1, 2)) & np.isfinite(yb).all(axis=(1, 2))
            self.sx += xb.sum(axis=1)
            self.sxx += (xb ** 2).sum(axis=1)
            self.sy += yb.sum(axis=1)
            self.syy += (yb ** 2).sum(axis=1)

    def blocks(self):
        return ((a, min(a + self.step, self.draws)) for a in range(0, self.draws, self.step))

    @staticmethod
    def block(values, shift: np.ndarray, a: int, b: int) -> np.ndarray:
        return np.asarray(values[:, a:b], dtype=np.float64) - shift

    def cross(self, rows: slice) -> np.ndarray:
        """[C, q, Nt]: each chain's sum over draws of x[:, :, rows] y^T (a pass over the draws, block by block)."""
        out = np.zeros((self.x.shape[0], rows.stop - rows.start, self.y.shape[2]))
        for a, b in self.blocks():
            out += np.einsum("cdq,cdt->cqt", self.block(self.x[:, :, rows], self.x0[rows], a, b),
                             self.block(self.y, self.y0, a, b))
        return out


def pooled(n, sx, sxx, sy, syy, sxy, kind: str) -> np.ndarray:
    """The estimate (module docstring) from sums over chains and draws: n draws, sx, sxx [..., q], sy, syy [..., t],
    sxy [..., q, t] (leading axes broadcast, e.g. one per left-out chain)."""
    n = np.asarray(n, dtype=np.float64)[..., None, None]
    mx, my = sx[..., :, None] / n, sy[..., None, :] / n
    cov = sxy / n - mx * my
    if kind == "covariance":
        return cov
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt((sxx[..., :, None] / n - mx ** 2) * (syy[..., None, :] / n - my ** 2))


def component_bif(x, y, x0: np.ndarray, y0: np.ndarray, kind: str, out: np.ndarray, out_se: np.ndarray,
                  block_bytes: int = BLOCK_BYTES) -> int:
    """Fill out, out_se [Nq, Nt] with the estimate and its jackknife standard error from one component's losses
    x [C, D, Nq], y [C, D, Nt] (any array type read by slices, e.g. memory-mapped); the number of chains used."""
    sums = ChainSums(x, y, x0, y0, block_bytes)
    ok = np.flatnonzero(sums.ok)
    m = len(ok)
    if m == 0:
        out[...], out_se[...] = np.nan, np.nan
        return 0
    x_sums = sums.sx[ok], sums.sxx[ok]
    totals = [s.sum(axis=0) for s in (sums.sx[ok], sums.sxx[ok], sums.sy[ok], sums.syy[ok])]
    step = max(1, block_bytes // (8 * (m + 1) * y.shape[2]))  # query rows per block
    for a in range(0, x.shape[2], step):
        rows = slice(a, min(a + step, x.shape[2]))
        sxy = sums.cross(rows)[ok]
        total = sxy.sum(axis=0)
        tx, txx, ty, tyy = totals
        out[rows] = pooled(m * sums.draws, tx[rows], txx[rows], ty, tyy, total, kind)
        if m < 2:
            out_se[rows] = np.nan
            continue
        left_out = pooled((m - 1) * sums.draws, tx[rows] - x_sums[0][:, rows], txx[rows] - x_sums[1][:, rows],
                          ty - sums.sy[ok], tyy - sums.syy[ok], total - sxy, kind)
        with np.errstate(invalid="ignore"):
            out_se[rows] = np.sqrt((m - 1) / m * ((left_out - left_out.mean(axis=0)) ** 2).sum(axis=0))
    return m


def matrix_storage(path, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(estimate, stderr) arrays of ``shape`` [K, Nq, Nt]: float64 in memory, or beyond IN_MEMORY_LIMIT float32
    .npy files bif.npy and bif_stderr.npy under ``path`` (free space checked, allocated on disk; refused without
    a path)."""
    nbytes = 8 * int(np.prod(shape, dtype=np.int64))
    if nbytes <= IN_MEMORY_LIMIT:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    layout = f"[{shape[0]} components x {shape[1]} query x {shape[2]} train samples]"
    if path is None:
        raise ValueError(f"the BIF matrices take {2 * nbytes / 2**30:.1f} GiB in memory {layout}: pass "
                         "token_losses_path=DIR to write them (and the losses) to disk, or fewer query or train samples")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "bif.npy", folder / "bif_stderr.npy"]
    check_free_space(folder, nbytes + 2 * NPY_HEADER_BYTES, "the BIF matrices (bif.npy, bif_stderr.npy)",
                     "free space there or pass a token_losses_path on a file system with room", replaced=files)
    out = []
    for file in files:
        print(f"llc_fast: BIF matrix {layout}: {nbytes / 2 / 2**20:.0f} MiB -> {file}", file=sys.stderr)
        array = np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=shape)
        reserve(file, array.offset, array.nbytes)
        out.append(array)
    return out[0], out[1]


def bif_from(observers, llcs, num_chains: int, kind: str, keep_losses: bool, token_losses_path=None) -> BIFResult:
    """The estimator of the module docstring on a finished run's observed losses (rows k*C + c; the train set is the
    query set when the run measured only ``QUERY``)."""
    names, C = llcs.names, num_chains
    values = observers.values
    train = TRAIN if TRAIN in values else QUERY
    x0, y0 = observers.at_w_star[QUERY], observers.at_w_star[train]
    shape = (len(names), values[QUERY].shape[2], values[train].shape[2])
    bif, stderr = matrix_storage(token_losses_path, shape)
    used = []
    for k in range(len(names)):
        rows = slice(k * C, (k + 1) * C)
        used.append(component_bif(values[QUERY][rows], values[train][rows], x0, y0, kind, bif[k], stderr[k]))
    losses = {}
    if keep_losses:
        losses = {name: array.reshape((len(names), C) + array.shape[1:]) for name, array in values.items()}
    return BIFResult(list(names), kind, bif, stderr, llcs, used, losses,
                     None if token_losses_path is None else str(token_losses_path))
