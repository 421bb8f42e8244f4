"""What one sampler step needs besides the tensors, shared by all backends: the settings, the
step counters, the parameter dtypes and the dtype the update computes in."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLERS = ("sgld", "rmsprop_sgld", "rmsprop_sgld_bc")
SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float64 weights are updated in float64, float32 and bfloat16 weights in float32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class SamplerSettings:
    """Hyperparameters shared by every chain of one update.

    sampler: "sgld" (G = 1), "rmsprop_sgld" (devinterp's RMSProp preconditioner: V starts at
        0, no bias correction) or "rmsprop_sgld_bc" (Hitchcock & Hoogland: V starts at 1,
        bias-corrected).
    rmsprop_alpha, rmsprop_eps: V <- alpha*V + (1-alpha)*g^2 and G = 1/(sqrt(V_hat) + eps).
    weight_decay: adds weight_decay * w to the drift.
    box: if set, each weight is clamped to [w* - box, w* + box] after the step.
    noise_level: multiplies the injected noise (1 is the correct posterior; devinterp's knob).
    """

    sampler: str = "sgld"
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 0.1
    weight_decay: float = 0.0
    box: float | None = None
    noise_level: float = 1.0

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

    @property
    def preconditioned(self) -> bool:
        return self.sampler != "sgld"

    @property
    def bias_corrected(self) -> bool:
        return self.sampler == "rmsprop_sgld_bc"

    @property
    def initial_statistic(self) -> float:
        """The starting value of the RMSProp statistic V."""
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


def per_chain(value: float | torch.Tensor, num_chains: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or a [C] vector of a per-chain hyperparameter, as a [C] tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        return t.expand(num_chains)
    if t.shape != (num_chains,):
        raise ValueError(f"per-chain hyperparameter must be a scalar or have shape ({num_chains},), got {tuple(t.shape)}")
    return t
