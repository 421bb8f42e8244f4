"""``llc-fast estimate``: the LLC of a HuggingFace causal LM on token data, on one process or many.

    llc-fast estimate --model DIR --data FILE --lr 1e-5 --nbeta 30 --output llc.json
    torchrun --nproc_per_node=8 -m llc_fast estimate --model DIR --data FILE --lr 1e-5 --nbeta 30 \\
        --dtype bfloat16 --activation-checkpointing --shard-group-size 2 --output llc.json

Under torchrun the processes form W/S chain groups of S ranks (``--shard-group-size``, default
all); each group's model is sharded with FSDP2. Before sampling, rank 0 prints each rank's memory
(``llc_fast.distributed.planner``), and every rank refuses a configuration that will not fit, saying
what to change (exit code 2). The result is written by rank 0 only, atomically, after every chain
has finished; a failing rank stops all ranks (``llc_fast.distributed.failure``).
"""
from __future__ import annotations

import argparse
import sys
import time

from .options import add_llc_options, llc_options

PLAN_REFUSED_EXIT_CODE = 2
BAD_INPUT_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130


def report_interrupt(args: argparse.Namespace, e, prog: str = "llc-fast estimate") -> None:
    """After Ctrl-C/SIGTERM (on rank 0): the partial result beside --output and the command that resumes."""
    if args.output and e.result is not None:
        from pathlib import Path

        partial = Path(args.output).with_suffix(".partial.json")
        e.result.save(partial)
        print(f"{prog}: partial result ({e.trace.loss_trace.shape[1]} draws per chain) written to "
              f"{partial}", file=sys.stderr, flush=True)
    if e.checkpoint is None:  # the checkpoint could not be written (the exception says why)
        print(f"{prog}: stopped; {e}", file=sys.stderr, flush=True)
        return
    command = [a for a in sys.argv if a not in ("--force",)]
    if "--resume" in command:
        command[command.index("--resume") + 1:command.index("--resume") + 2] = [e.checkpoint]
    else:
        command += ["--resume", e.checkpoint]
    print(f"{prog}: stopped; the run is saved in {e.checkpoint} (its last checkpoint). Resume it with:\n  "
          + " ".join(command), file=sys.stderr, flush=True)


def _estimate(args: argparse.Namespace) -> int:
    import os

    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: its failure summary shows the failing rank's error
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(args)
    return _main(args)


def _main(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..distributed.failure import failure_guard
    from ..distributed.mesh import init_from_env
    from ..distributed.planner import MemoryPlanError

    try:
        rows = _checked_inputs(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"llc-fast estimate: {e}", file=sys.stderr, flush=True)
        return BAD_INPUT_EXIT_CODE
    if args.stall_timeout is not None:
        import os

        os.environ["LLC_FAST_STALL_TIMEOUT"] = str(args.stall_timeout)
    launch = init_from_env(timeout_s=args.timeout, device=args.device)
    from ..chains.interrupt import SamplingInterrupted

    try:
        with failure_guard():
            result = _run(args, launch, rows)
    except MemoryPlanError as e:
        print(f"llc-fast estimate: refused: {e}", file=sys.stderr, flush=True)
        return PLAN_REFUSED_EXIT_CODE
    except SamplingInterrupted as e:
        if launch.rank == 0:
            report_interrupt(args, e)
        return INTERRUPTED_EXIT_CODE
    if launch.initialised_here and dist.is_initialized():
        dist.destroy_process_group()
    return 0 if result is not None else 1


def _checked_inputs(args: argparse.Namespace):
    """The token rows, after every input has been checked (output path, model directory, token file and dtype,
    ids against the vocabulary, rows against the positions): nothing is loaded onto a device before."""
    from ..config import LLCConfig

    check_output(args.output, force=args.force, model_dir=args.model)
    check_run_files(args)
    LLCConfig(**llc_options(args))  # the checks across options, before the model is loaded
    return checked_rows(args)


def checked_rows(args: argparse.Namespace):
    """The token rows of --data (--seq-len, --token-dtype, --column), checked against --model's vocabulary and
    positions and against --batch-size; the model is not loaded."""
    from ..integrations import hf

    vocab, positions = hf.model_limits(args.model)
    rows = hf.load_tokens(args.data, seq_len=args.seq_len, token_dtype=args.token_dtype, column=args.column)
    hf.check_tokens(rows, vocab, positions)
    hf.token_loader(rows, args.batch_size)  # checks the batch size against the rows
    return rows


def _run(args: argparse.Namespace, launch, rows):
    import torch
    import torch.distributed as dist

    from .. import estimate_llc
    from ..integrations import hf
    from ..distributed.mesh import check_shard_group_size
    from ..distributed.planner import GiB, MemoryPlanError, device_capacity, model_spec, plan_memory
    from ..distributed.sharded import estimate_llc_sharded
    from ..distributed.units import enable_activation_checkpointing, transformer_blocks

    rank0 = launch.rank == 0
    say = (lambda *a: print(*a, flush=True)) if rank0 else (lambda *a: None)
    world, device = launch.world_size, launch.device
    dtype = hf.PARAM_DTYPES[args.dtype]
    shard = check_shard_group_size(args.shard_group_size, world)
    groups = world // shard

    t0 = time.perf_counter()
    loader = hf.token_loader(rows, args.batch_size)
    model = hf.load_causal_lm(args.model, dtype)
    blocks = transformer_blocks(model)
    num_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    say(f"model {args.model}: {type(model).__name__}, {num_params / 1e6:.4g}M parameters ({args.dtype}), "
        f"{len(blocks)} blocks; data {args.data}: {len(rows)} rows x {rows.seq_len} tokens; loaded in "
        f"{time.perf_counter() - t0:.1f} s")
    say(f"{world} process(es) on {device.type}: {groups} chain group(s) x {shard} shard rank(s)")
    if args.activation_checkpointing:
        if not blocks:
            raise ValueError("--activation-checkpointing: no transformer blocks recognised in this model")
        enable_activation_checkpointing(blocks)

    # --- memory plan, before anything is allocated on the device ----------------------------------
    per_group = -(-args.num_chains // groups)
    batched = 1 if shard > 1 or args.activation_checkpointing else min(per_group, args.max_batched_chains or per_group)
    capacity = int(args.memory_limit_gib * GiB) if args.memory_limit_gib else device_capacity(device,
                                                                                             launch.local_world_size)
    plan = plan_memory(model_spec(model, name=str(args.model)), world_size=world, shard_group_size=shard,
                       param_dtype=dtype, sampler=args.sampler, batch_size=args.batch_size, seq_len=rows.seq_len,
                       activation_checkpointing=args.activation_checkpointing, batched_chains=batched,
                       capacity=capacity, split_batch=args.batch_split != "replicate")
    say(plan.table())
    fits = plan.fits
    if world > 1:  # every rank takes the same decision (free memory may differ a little between ranks)
        flag = torch.tensor([int(fits)], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        fits = bool(flag.item())
    if not fits:
        if plan.fits:  # another rank has less memory
            raise MemoryPlanError("another rank does not have the memory this configuration needs (see rank 0's table)")
        plan.check()

    # --- sampling ------------------------------------------------------------------------------------
    kwargs = llc_options(args, progress=rank0 and args.progress, device=device,
                         chain_batching="sequential" if batched == 1 else args.chain_batching, max_batched_chains=batched)
    layout = {name: kwargs.pop(name) for name in ("shard_group_size", "batch_split", "failure_grace_s")}
    t1 = time.perf_counter()
    if world > 1:
        result = estimate_llc_sharded(model, loader, hf.causal_lm_loss, **dict(layout, shard_group_size=shard),
                                      **kwargs)
    else:
        result = estimate_llc(model.to(device), loader, hf.causal_lm_loss, **kwargs)
    result.config.update(provenance(args, rows, "llc-fast estimate"),
                         activation_checkpointing=args.activation_checkpointing)
    say(f"{result.summary()}; init loss {result.init_loss:.4f}; {time.perf_counter() - t1:.1f} s "
        f"({result.timing['steps_per_s']:.3g} chain steps/s, backend {result.config['backend']!r}, "
        f"engine {result.config['engine']!r})")
    if rank0 and args.output:
        result.save(args.output)
        say(f"result written to {args.output}")
    return result


def provenance(args: argparse.Namespace, rows, cli: str) -> dict:
    """What a command-line result records of its inputs (into its config)."""
    return dict(model=str(args.model), data=str(args.data), seq_len=rows.seq_len, batch_size=args.batch_size, cli=cli)


def check_output(output: str | None, *, force: bool, model_dir: str | None = None, flag: str = "--output") -> None:
    """Refuse, before any work, an output path (of ``flag``) that could not be written or would overwrite
    something."""
    from pathlib import Path

    if not output:
        return
    out = Path(output).expanduser()
    if out.is_dir():
        raise ValueError(f"{flag} {output} is a directory; name a file, e.g. {out / 'llc.json'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{flag} {output}: the directory {parent} does not exist (create it first)")
    import os

    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {output}: the directory {parent} is not writable")
    if model_dir is not None and Path(model_dir).resolve() in out.resolve().parents:
        raise ValueError(f"{flag} {output} is inside the model directory {model_dir}; write the result elsewhere")
    if out.exists() and not force:
        raise ValueError(f"{flag} {output} exists; pass --force to overwrite it, or name another file")


def check_run_files(args: argparse.Namespace) -> None:
    """--checkpoint (a file that can be written: its directory exists and is writable) and --resume (this process's
    checkpoint file exists), before any model is loaded."""
    import os
    from pathlib import Path

    from ..chains.checkpoint import rank_path
    from ..distributed.mesh import launched_processes

    check_output(args.checkpoint, force=True, model_dir=args.model, flag="--checkpoint")
    if args.resume:
        path = rank_path(args.resume, int(os.environ.get("RANK", "0")), launched_processes())
        if not path.is_file():
            raise FileNotFoundError(f"--resume {args.resume}: {'' if path == Path(args.resume) else f'{path}, '}"
                                    "the checkpoint to continue, does not exist (a run writes it with --checkpoint "
                                    "FILE, or on Ctrl-C)")


def positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")  # = integrations.hf's (hf.TOKEN_DTYPES)
PARAM_DTYPES = ("bfloat16", "float32", "float64")
COMPONENT_SETS = ("layers", "heads", "attn-mlp", "embeddings")  # = integrations.components.STANDARD's


def add_input_options(p: argparse.ArgumentParser, model: bool = True, data_help: str | None = None) -> None:
    """--model (unless ``model`` is False), --data (optional when ``data_help`` says what it defaults to) and how
    they are read (--seq-len, --token-dtype, --column, --batch-size, --dtype)."""
    if model:
        p.add_argument("--model", required=True, help="directory of a HuggingFace causal LM (save_pretrained); local only")
    p.add_argument("--data", required=data_help is None,
                   help="token ids: a saved datasets directory (column --column), a .npy [rows, tokens] or a .bin"
                        + (f"; {data_help}" if data_help else ""))
    p.add_argument("--seq-len", type=positive_int,
                   help="tokens per row: cuts 1-D .npy/.bin data into rows, truncates longer rows")
    p.add_argument("--token-dtype", default="uint16", choices=TOKEN_DTYPES, help="integer type of a .bin file")
    p.add_argument("--column", default="input_ids", help="column of a datasets directory holding the token ids")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="rows per batch of a chain (under torchrun split over its shard group)")
    p.add_argument("--dtype", default="float32", choices=PARAM_DTYPES,
                   help="parameter dtype; bfloat16 is updated in float32 and stored by stochastic rounding")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "estimate", help="estimate the LLC of a HuggingFace causal LM on token data (also under torchrun)",
        description="Estimate the LLC of a causal LM saved with save_pretrained, with next-token cross-entropy on "
                    "local token data. Runs unchanged under torchrun --nproc_per_node=K -m llc_fast estimate ... "
                    "(FSDP2 shard groups, chain groups in parallel).")
    add_input_options(p)
    add_llc_options(p, scopes=("estimate", "torchrun"))
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~1/3 more compute)")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="memory per rank the plan must fit in (default: the GPU's free memory, or on CPU the "
                        "available memory shared by this machine's processes)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds after which a collective that does not complete fails every rank")
    p.add_argument("--stall-timeout", type=float, default=None,
                   help="seconds without a finished step on any rank after which a rank stuck outside every "
                        "collective is named and all ranks stop (default 600; $LLC_FAST_STALL_TIMEOUT)")
    p.add_argument("--output", help="write the LLCResult as JSON here (rank 0, atomically, after all chains); "
                                    "checked before any work")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output file")
    p.set_defaults(func=_estimate)
