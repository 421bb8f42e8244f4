"""HuggingFace causal LMs and token data from local files, for ``llc-fast estimate``.

* ``load_causal_lm(dir)``: ``AutoModelForCausalLM.from_pretrained`` with local files only, in the
  requested dtype, in eval mode (no dropout; gradients still flow), without a KV cache.
* ``load_tokens(path)``: token ids as rows = sequences, from a saved ``datasets`` dataset
  directory (``save_to_disk``; column ``input_ids``), a ``.npy`` array ([rows, T], or 1-D cut into
  rows of ``seq_len``) or a raw ``.bin`` of token ids (``token_dtype``, cut into rows of
  ``seq_len``). ``.npy`` and ``.bin`` are memory-mapped: only the batches drawn are read.
* ``causal_lm_loss(model, batch)``: mean next-token cross-entropy over the batch (float32);
  ``causal_lm_token_losses``: the same per predicted token.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _logits_and_targets(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows x (T-1), vocab] float32 logits of positions 0..T-2, [rows x (T-1)] next tokens) of a token batch."""
    ids = batch["input_ids"] if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (list, tuple)) else batch
    logits = model(input_ids=ids, use_cache=False).logits
    return logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)


def causal_lm_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens <= t, over every position of every row."""
    return F.cross_entropy(*_logits_and_targets(model, batch))


def causal_lm_token_losses(model, batch) -> torch.Tensor:
    """The cross-entropy of each predicted token, [rows x (T-1)] (row-major): ``per_token_fn`` of
    ``estimate_susceptibilities`` for token batches; its mean is ``causal_lm_loss``."""
    return F.cross_entropy(*_logits_and_targets(model, batch), reduction="none")


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM from a local directory (config + weights saved by ``save_pretrained``), on the CPU."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved HuggingFace model (no config.json); pass the directory "
                                "written by model.save_pretrained(...)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    if next(model.parameters()).dtype != dtype:  # an older transformers that ignored the dtype argument
        model = model.to(dtype)
    model.eval()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(True)
    return model


class TokenRows(Dataset):
    """Rows of token ids as int64 tensors of shape [T]; ``array`` is [rows, T] (possibly memory-mapped)."""

    def __init__(self, array):
        if array.ndim != 2 or array.shape[1] < 2:
            raise ValueError(f"token data must be rows of at least 2 tokens, got shape {tuple(array.shape)}")
        self.array = array

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, i):
        if isinstance(i, (list, tuple)):  # a whole batch by one index operation (BatchSampler)
            i = np.asarray(i)
        return torch.from_numpy(np.asarray(self.array[i], dtype=np.int64))

    @property
    def seq_len(self) -> int:
        return self.array.shape[1]


def model_limits(path: str | Path) -> tuple[int | None, int | None]:
    """(vocabulary size, longest sequence) of the causal LM saved in ``path``, read from its config alone."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved HuggingFace model (no config.json); pass the directory "
                                "written by model.save_pretrained(...)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                      if isinstance(getattr(config, k, None), int)), None)
    return getattr(config, "vocab_size", None), positions


def check_tokens(rows: "TokenRows", vocab_size: int | None, max_positions: int | None, chunk_rows: int = 4096) -> None:
    """Every token id in [0, vocab_size) and rows no longer than the model's positions; the first bad id is
    named with its row and column. Reads the (memory-mapped) data once, in chunks."""
    if max_positions is not None and rows.seq_len > max_positions:
        raise ValueError(f"rows of {rows.seq_len} tokens are longer than the model's {max_positions} positions: pass "
                         f"--seq-len {max_positions} (or less)")
    if vocab_size is None:
        return
    for start in range(0, len(rows), chunk_rows):
        block = np.asarray(rows.array[start:start + chunk_rows])
        bad = (block < 0) | (block >= vocab_size)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"token id {int(block[r, c])} at row {start + int(r)}, position {int(c)} is outside the "
                             f"model's vocabulary [0, {vocab_size}): check --data and --token-dtype")


def _looks_wider(array: np.ndarray, dtype: np.dtype) -> str | None:
    """The wider dtype the data probably is, when every second value read as ``dtype`` is 0 (the high halves
    of little-endian ids of twice the width), else None."""
    wider = {1: None, 2: "int32 or uint32", 4: "int64"}.get(dtype.itemsize)
    sample = np.asarray(array[: 1 << 20])
    if wider is None or sample.size < 4 or sample.size % 2:
        return None
    pairs = sample.reshape(-1, 2)
    return wider if not pairs[:, 1].any() and pairs[:, 0].any() else None


def load_tokens(path: str | Path, *, seq_len: int | None = None, token_dtype: str = "uint16",
                column: str = "input_ids") -> TokenRows:
    """Token data (see module docstring); ``seq_len`` truncates longer rows and cuts 1-D data into rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"token data {path} does not exist")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise ValueError(f"--seq-len must be an integer >= 2 (tokens per row), got {seq_len!r}")
    if path.is_dir():
        array = _from_datasets(path, column)
    elif path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
    elif path.suffix == ".bin":
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"--token-dtype must be one of {TOKEN_DTYPES}, got {token_dtype!r}")
        if not seq_len:
            raise ValueError(f"{path} is a flat .bin of token ids: pass --seq-len to cut it into rows")
        dtype = np.dtype(token_dtype)
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise ValueError(f"{path} has {size} bytes, not a whole number of {token_dtype} token ids "
                             f"({dtype.itemsize} bytes each): is --token-dtype right?")
        array = np.memmap(path, dtype=dtype, mode="r")
        wider = _looks_wider(array, dtype)
        if wider:
            raise ValueError(f"every second {token_dtype} of {path} is 0: the file looks like {wider} token ids; "
                             f"pass --token-dtype {wider.split()[0]}")
    else:
        raise ValueError(f"token data must be a saved datasets directory, a .npy or a .bin file; got {path}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {array.dtype} in {path}")
    if array.ndim == 1:
        if not seq_len:
            raise ValueError(f"{path} holds a 1-D array of tokens: pass --seq-len to cut it into rows")
        rows = array.shape[0] // seq_len
        array = array[: rows * seq_len].reshape(rows, seq_len)
    elif seq_len:
        if seq_len > array.shape[1]:
            raise ValueError(f"--seq-len {seq_len} is longer than the rows of {path} ({array.shape[1]} tokens)")
        array = array[:, :seq_len]
    return TokenRows(array)


def _from_datasets(path: Path, column: str) -> np.ndarray:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"{path} holds several splits {list(ds)}; save the one to use with save_to_disk")
        ds = next(iter(ds.values()))
    if column not in ds.column_names:
        raise ValueError(f"{path} has no column {column!r} (columns: {ds.column_names}); pass --column")
    rows = ds.with_format("numpy")[column]
    try:
        array = np.asarray(rows) if not isinstance(rows, list) else np.stack(rows)
        if array.dtype == object:
            array = np.stack(list(array))
    except ValueError as e:
        raise ValueError(f"the rows of {column!r} in {path} differ in length; pack them into equal rows first") from e
    return array


def token_loader(rows: TokenRows, batch_size: int):
    """Shuffled batches [batch_size, T] of token rows, one index operation per batch (drop_last)."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    if not 1 <= batch_size <= len(rows):
        raise ValueError(f"--batch-size must lie in [1, {len(rows)}] (the number of token rows), got {batch_size}")
    return DataLoader(rows, batch_size=None, sampler=BatchSampler(RandomSampler(rows), batch_size, drop_last=True))
