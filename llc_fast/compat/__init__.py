"""Compatibility layers: other LLC libraries' APIs on llc_fast's engine.

``llc_fast.compat.devinterp``: devinterp 2.x (``llc``, ``sample``, ``compute_llc``, ``create_param_masks``)
and 1.x (``estimate_learning_coeff_with_summary``, ``estimate_learning_coeff``) entry points and its
samplers (``SGLD``, ``RMSpropSGLD``, ``SGMCMC``) as fused-update torch optimizers. Import it explicitly;
it does not import devinterp.
"""
