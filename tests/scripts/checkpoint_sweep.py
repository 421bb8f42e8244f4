"""A checkpoint sweep to be killed and rerun by tests/test_studies.py: python checkpoint_sweep.py SAVE_DIR OUT [SLEEP_S].

Three checkpoints of a 4-3-4 deep linear network (teacher ranks 0, 1, 3), each with its own teacher data;
each loss_fn call sleeps SLEEP_S so that the sweep can be killed in the middle. Writes the table to OUT.
"""
import sys
import time

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

import llc_fast
from llc_fast.oracles import dln_dataset, make_dln, mse_loss

WIDTHS = (4, 3, 4)
TEACHERS = {r: make_dln(WIDTHS, r, seed=1) for r in (0, 1, 3)}


def data(step):
    ds = dln_dataset(TEACHERS[step], 2000, seed=2, input_range=1.0)
    return DataLoader(ds, batch_size=None, sampler=BatchSampler(RandomSampler(ds), 200, drop_last=True))


def main():
    torch.set_num_threads(1)
    save_dir, out = sys.argv[1], sys.argv[2]
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0

    def loss(model, batch):
        time.sleep(pause)
        return mse_loss(model, batch)

    result = llc_fast.estimate_over_checkpoints(
        [(r, m.state_dict()) for r, m in TEACHERS.items()], data, loss, model=make_dln(WIDTHS, 1, seed=9),
        lr=3e-4, gamma=1.0, num_chains=2, num_draws=100, num_burnin_steps=50, progress=False, save_dir=save_dir,
        components={"full": None, "first": ["0.*"]})
    result.save(out)


if __name__ == "__main__":
    main()
