"""What one sampler step needs besides the tensors, shared by all backends: the settings, the
step counters, the parameter dtypes and the dtype the update computes in."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLERS = ("sgld", "rmsprop_sgld", "rmsprop_sgld_bc", "sgnht")
#: The samplers every backend runs (the fused kernels); "sgnht" runs on the reference "torch" backend only.
KERNEL_SAMPLERS = ("sgld", "rmsprop_sgld", "rmsprop_sgld_bc")
#: The injected noise of a step: "euler" (xi_t, Euler-Maruyama) or "lm" ((xi_t + xi_{t+1})/2, Leimkuhler-Matthews:
#: on a quadratic its draws have the exact posterior law at every stable lr; ``docs/update.md``). Every backend runs
#: both; a kernel draws the next step's normals too.
NOISE_SCHEMES = ("euler", "lm")
SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
#: The update is stable only while lr·G·(nbeta·h + gamma) < STABILITY_LIMIT along every Hessian eigenvector (h its
#: eigenvalue): on a quadratic, w - w* is multiplied each step by 1 - (lr/2)·G·(nbeta·h + gamma), whose size passes 1
#: at 4 (``reference.py``; ``docs/update.md``). Hence lr < 4/(nbeta·h_max + gamma) for plain SGLD.
STABILITY_LIMIT = 4.0


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float64 weights are updated in float64, float32 and bfloat16 weights in float32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class SamplerSettings:
    """Hyperparameters shared by every chain of one update.

    sampler: "sgld" (G = 1), "rmsprop_sgld" (devinterp's RMSProp preconditioner: V starts at
        0, no bias correction) or "rmsprop_sgld_bc" (Hitchcock & Hoogland: V starts at 1,
        bias-corrected), or "sgnht" (Ding et al.'s thermostat with momentum; ``reference.sgnht_step``).
    rmsprop_alpha, rmsprop_eps: V <- alpha*V + (1-alpha)*g^2 and G = 1/(sqrt(V_hat) + eps).
    weight_decay: adds weight_decay * w to the drift.
    box: if set, each weight is clamped to [w* - box, w* + box] after the step.
    noise_level: multiplies the injected noise (1 is the correct posterior; devinterp's knob).
    sgnht_diffusion: "sgnht": the diffusion factor A (devinterp's diffusion_factor), the thermostat's start value.
    noise_scheme: "euler" (the noise xi_t) or "lm" (the Leimkuhler-Matthews noise (xi_t + xi_{t+1})/2; not "sgnht").
    """

    sampler: str = "sgld"
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 0.1
    weight_decay: float = 0.0
    box: float | None = None
    noise_level: float = 1.0
    sgnht_diffusion: float = 0.01
    noise_scheme: str = "euler"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 0.0 < self.rmsprop_alpha < 1.0:
            raise ValueError(f"rmsprop_alpha must lie in (0, 1), got {self.rmsprop_alpha}")
        if not self.rmsprop_eps > 0.0:
            raise ValueError(f"rmsprop_eps must be > 0, got {self.rmsprop_eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if self.box is not None and not self.box > 0.0:
            raise ValueError(f"box (the clamp half-width around w*) must be > 0 or None, got {self.box}")
        if not (math.isfinite(self.noise_level) and self.noise_level >= 0.0):
            raise ValueError(f"noise_level must be finite and >= 0, got {self.noise_level}")
        if not (math.isfinite(self.sgnht_diffusion) and self.sgnht_diffusion >= 0.0):
            raise ValueError(f"sgnht_diffusion (the thermostat's diffusion factor A) must be finite and >= 0, got "
                             f"{self.sgnht_diffusion}")
        if self.noise_scheme not in NOISE_SCHEMES:
            raise ValueError(f"noise_scheme must be one of {NOISE_SCHEMES}, got {self.noise_scheme!r}")
        if self.noise_scheme != "euler" and self.thermostat:
            raise ValueError(f"noise_scheme={self.noise_scheme!r} is a Langevin step's noise; sampler='sgnht' takes "
                             "noise_scheme='euler'")

    @property
    def preconditioned(self) -> bool:
        """An RMSProp sampler (G from the statistic V)."""
        return self.sampler in ("rmsprop_sgld", "rmsprop_sgld_bc")

    @property
    def thermostat(self) -> bool:
        """"sgnht": a momentum per element (in the statistic's buffer) and a thermostat per chain row."""
        return self.sampler == "sgnht"

    @property
    def has_statistic(self) -> bool:
        """Whether the update keeps a second [C, N] buffer: V (RMSProp) or the momentum (SGNHT)."""
        return self.sampler != "sgld"

    @property
    def bias_corrected(self) -> bool:
        return self.sampler == "rmsprop_sgld_bc"

    @property
    def initial_statistic(self) -> float:
        """The starting value of the RMSProp statistic V (of the SGNHT momentum: 0)."""
        return 1.0 if self.bias_corrected else 0.0

    def statistic_scale(self, stat_step: int) -> float:
        """Factor that turns V into V_hat at statistic step ``stat_step`` (0-based): 1/(1 - alpha^(t+1))."""
        if not self.bias_corrected:
            return 1.0
        return 1.0 / -math.expm1((stat_step + 1) * math.log(self.rmsprop_alpha))


@dataclass(frozen=True)
class StepCounters:
    """Where one update sits in the noise stream and in the preconditioner's schedule.

    step: the sampler step t (0-based) that keys the noise.
    update_statistic: whether V takes this step's gradient (False once the preconditioner is frozen).
    stat_step: the step whose bias correction applies (t, or the step at which V was frozen).
    """

    step: int
    update_statistic: bool = True
    stat_step: int = 0


def per_chain(value: float | torch.Tensor, num_rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or a [C] vector of a per-chain hyperparameter, as a [C] tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        return t.expand(num_rows)
    if t.shape != (num_rows,):
        raise ValueError(f"per-chain hyperparameter must be a scalar or have shape ({num_rows},), got {tuple(t.shape)}")
    return t


@dataclass(frozen=True, eq=False)
class RowMasks:
    """One 0/1 mask per chain row, without a per-row copy: row c uses component ``row_component[c]``.

    windows: int64 [K, 3]; component k's mask is ``buffer[offset_k : offset_k + hi_k - lo_k]`` on the
        local flat elements [lo_k, hi_k) (row k = (lo_k, hi_k, offset_k)), and 0 (not sampled) on
        every element outside that window.
    buffer: uint8 [B] of 0/1, the components' windows concatenated (components may share bytes).
    row_component: int64 [C]: each chain row's component, or -1 for no restriction (all ones).

    Element i (a local flat index, like the shared [N_local] mask's) of row c has the mask value
    1 if row_component[c] < 0, else (lo <= i < hi ? buffer[offset + i - lo] : 0) with (lo, hi,
    offset) = windows[row_component[c]]. The update checks the fields against its sizes
    (``backend.pack_call``); ``buffer`` must be on the weights' device, ``windows`` and
    ``row_component`` may be anywhere (they are read on the host once per call or prepare).
    """

    windows: torch.Tensor
    buffer: torch.Tensor
    row_component: torch.Tensor

    @classmethod
    def from_dense(cls, masks, row_component) -> "RowMasks":
        """From components ``masks`` (each an [N] 0/1 tensor, or None for no restriction; an iterable,
        read one mask at a time) and each row's index into ``masks``: every mask is trimmed to the window
        between its first and last nonzero (an all-zero mask is refused: it would sample nothing); rows
        of a None component get -1."""
        windows, pieces, index, total, device, count = [], [], {}, 0, None, 0
        for k, m in enumerate(masks):
            count = k + 1
            if m is None:
                continue
            if not isinstance(m, torch.Tensor) or m.ndim != 1:
                raise ValueError(f"masks[{k}] must be a 1-d 0/1 tensor or None, got {getattr(m, 'shape', type(m))}")
            if device is not None and m.device != device:
                raise ValueError(f"masks must be on one device, got {device} and {m.device}")
            device = m.device
            nz = torch.nonzero(m != 0).flatten()
            if nz.numel() == 0:
                raise ValueError(f"masks[{k}] is all zeros: a component that samples no element")
            lo, hi = int(nz[0]), int(nz[-1]) + 1
            index[k] = len(windows)
            windows.append((lo, hi, total))
            pieces.append((m[lo:hi] != 0).to(torch.uint8))
            total += hi - lo
        rows = [int(k) for k in row_component]
        for c, k in enumerate(rows):
            if not 0 <= k < count:
                raise ValueError(f"row_component[{c}] = {k} is not an index into the {count} masks")
        buffer = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8, device=device)
        return cls(windows=torch.tensor(windows, dtype=torch.int64).reshape(-1, 3), buffer=buffer.contiguous(),
                   row_component=torch.tensor([index.get(k, -1) for k in rows], dtype=torch.int64))

    def for_rows(self, row_component: torch.Tensor) -> "RowMasks":
        """The same components for other rows: row c uses this RowMasks's row ``row_component[c]``'s component."""
        return RowMasks(self.windows, self.buffer, self.row_component[torch.as_tensor(row_component).cpu()])

    @property
    def num_rows(self) -> int:
        return int(self.row_component.shape[0])

    def row_windows(self) -> torch.Tensor:
        """int64 [C, 3] on the host: each row's (lo, hi, offset), (0, 0, -1) for an unrestricted row
        (what the kernels read: a negative offset means all ones)."""
        comp = self.row_component.cpu()
        table = torch.zeros((comp.shape[0], 3), dtype=torch.int64)
        table[:, 2] = -1
        restricted = comp >= 0
        if bool(restricted.any()):
            table[restricted] = self.windows.cpu()[comp[restricted]]
        return table

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """uint8 [C, stop - start]: the mask values of local elements [start, stop) of every row, on the
        buffer's device."""
        table = self.row_windows().to(self.buffer.device)
        lo, hi, off = (table[:, k:k + 1] for k in range(3))
        i = torch.arange(start, stop, dtype=torch.int64, device=self.buffer.device)[None, :]
        inside = (i >= lo) & (i < hi) & (off >= 0)
        if self.buffer.numel():
            pos = torch.where(inside, off + i - lo, torch.zeros_like(i))
            values = torch.where(inside, self.buffer[pos], torch.zeros((), dtype=torch.uint8, device=i.device))
        else:
            values = torch.zeros(inside.shape, dtype=torch.uint8, device=i.device)
        return torch.where(off < 0, torch.ones((), dtype=torch.uint8, device=i.device), values)

    def dense(self, num_elements: int) -> torch.Tensor:
        """uint8 [C, num_elements]: every row's mask over local elements [0, num_elements) (tests)."""
        return self.rows(0, num_elements)
