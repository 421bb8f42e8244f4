"""Drop-in replacements for devinterp's LLC entry points, computed by ``llc_fast.estimate_llc``.

Change the import, keep the call::

    from devinterp.slt.llc import llc                       ->  from llc_fast.compat.devinterp import llc
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
                                                            ->  from llc_fast.compat.devinterp import ...
    from devinterp.optim import SGLD, SGMCMC                ->  from llc_fast.compat.devinterp import SGLD, SGMCMC

devinterp 2.x (``llc``, ``sample``, ``compute_llc``, ``create_param_masks``, ``susceptibilities``,
``compute_susceptibilities``, ``bif``, ``compute_bif``, ``to_obs_id``): same signatures and defaults as
devinterp 2.0.1, same output variables and dims. ``susceptibilities`` samples all its weight restrictions ("full" included) as the
components of one batched run instead of one ``sample()`` each. All chains read the same batches in the
same order as devinterp's (its seeded DataLoader order, replayed every pass); only the noise differs,
which comes from llc_fast's counter-based generator. devinterp 1.x (``estimate_learning_coeff_with_summary``,
``estimate_learning_coeff``): same arguments and returned keys as devinterp 1.3.2. The samplers ``SGLD``,
``RMSpropSGLD``, ``SGMCMC.sgld`` and ``SGMCMC.rmsprop_sgld`` are torch optimizers stepping with the fused
update (``optim.py``); they can also be passed to devinterp itself: they compute devinterp's ``metrics=[...]``
diagnostics (``dws``, ``localization_loss``, ``noise``, ``distance``, the norms), so devinterp's own ``sample()``
runs them with a ``MalaAcceptanceRate`` callback. ``scripts/devinterp_suite.py`` runs devinterp 1.3.2's own tests
against devinterp and through this layer.

Conventions: numbers follow devinterp by default, including its questionable choices (2.x: the
burn-in steps and the steps between draws are averaged into each chain's loss, llc_std has ddof=0, a
chain whose loss became NaN/Inf keeps the estimate of the steps it ran; 1.x: nbeta defaults to
B/log B with B the batch size). A warning says so once per process. The native API,
``llc_fast.estimate_llc``, averages only the draws after burn-in, uses ddof=1 and leaves diverged chains
out; ``llc``/``sample``/``compute_llc`` take ``conventions="llc_fast"`` for those rules.

SGNHT (``sgnht.py``): ``SGNHT`` runs llc_fast's sampler "sgnht"; ``SGMCMC.sgnht`` is what devinterp 1.3.2
computes, SGLD with noise level sqrt(2*diffusion_factor). Not supported (clear errors): ``init_noise``,
``save_metrics``, 1.x ``callbacks`` (for MALA
acceptance use ``estimate_llc(mala_every=k)``). The sampling losses are recorded as the mean loss of each
step: the ``batch_sampling``/``batch`` dims have size 1, ``init_loss`` and the sampling losses have one
value per chain (and step or draw) repeated over ``token_pos`` (size 1 without observables; the LLC does
not change) and ``sampling_input_ids_micro`` is absent. Observables (``loss_<id>``, ``input_ids_<id>``) are
per token, as devinterp's.

Known differences besides the noise: with fewer batches than ``num_init_loss_batches`` per epoch, 2.x
cycles them for the initial loss, this layer averages one pass; with
``match_sampling_input_ids_across_chains=False`` each chain reads its own llc_fast-seeded shuffles (not
devinterp's per-chain generators); 1.x returns llc = inf for an infinite loss, this layer raises
``ChainDivergedError`` as for NaN.
"""
from .common import ChainDivergedError, DevinterpCompatWarning, default_nbeta, reset_warnings
from ...integrations.components import create_param_masks
from .optim import SGLD, SGMCMC, RMSpropSGLD
from .sgnht import SGNHT
from .v1 import estimate_learning_coeff, estimate_learning_coeff_with_summary
from .bif import bif, compute_bif
from .susceptibility import compute_susceptibilities, susceptibilities
from .v2 import compute_llc, llc, lm_logits, per_token_loss, sample, to_obs_id

__all__ = [
    "llc", "sample", "compute_llc", "create_param_masks", "estimate_learning_coeff_with_summary",
    "estimate_learning_coeff", "default_nbeta", "SGLD", "RMSpropSGLD", "SGMCMC", "SGNHT", "DevinterpCompatWarning",
    "ChainDivergedError", "lm_logits", "per_token_loss", "reset_warnings", "susceptibilities",
    "compute_susceptibilities", "to_obs_id", "bif", "compute_bif",
]
