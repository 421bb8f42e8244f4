"""Sampling on many processes: FSDP2-sharded models and chains in parallel (torchrun).

    torchrun --nproc_per_node=8 my_script.py      # my_script calls llc_fast.estimate_llc as usual

``estimate_llc`` switches to ``estimate_llc_sharded`` when a process group of several ranks is
initialised. ``mesh`` lays the processes out as chain groups x shard group, ``sharded`` runs the
chains with ``engine``'s FSDP engine and the one sampling loop, ``rows`` splits the chain rows of restricted,
refined and susceptibility runs over the ranks (whole models), ``planner`` estimates per-rank memory
before anything is allocated, ``failure`` makes a failing or unanswering rank stop all ranks.
"""
from .failure import PeerFailedError, failure_guard
from .mesh import ChainMesh, chain_assignment, init_from_env
from .planner import MemoryPlan, MemoryPlanError, ModelSpec, model_spec, plan_memory
from .sharded import estimate_llc_sharded, shard_model
from .units import enable_activation_checkpointing, transformer_blocks

__all__ = ["estimate_llc_sharded", "shard_model", "ChainMesh", "chain_assignment", "init_from_env", "MemoryPlan",
           "MemoryPlanError", "ModelSpec", "model_spec", "plan_memory", "PeerFailedError", "failure_guard",
           "enable_activation_checkpointing", "transformer_blocks"]
