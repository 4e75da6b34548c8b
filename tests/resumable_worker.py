"""Accumulate layer statistics resumably; run by tests/test_resumable.py and killed mid-run.

usage: python resumable_worker.py CHECKPOINT_DIR OUT.npz NUM_BATCHES SAVE_EVERY SLEEP_SECONDS

Prints ``batch i`` (flushed) after folding batch ``i``, and writes the final statistics to OUT.npz.
"""

import sys
import time

import numpy as np

from jaxmerge import accumulate_resumable, init_stats, update_stats


def batches(n):
    """Batch ``i``: rows of task ``i % 2`` drawn from a generator seeded with ``i``."""
    for i in range(n):
        r = np.random.default_rng(i)
        yield i, r.standard_normal((16, 6), np.float32), r.standard_normal((16, 3), np.float32)


def initial_state():
    return init_stats(6, 3, num_tasks=2)


def update(state, batch):
    i, x, y = batch
    return update_stats(state, x, y, i % 2)


def main(directory, out, num_batches, save_every, sleep):
    def slow_update(state, batch):
        state = update(state, batch)
        state.gram.block_until_ready()
        print(f"batch {batch[0]}", flush=True)
        time.sleep(sleep)
        return state

    state = accumulate_resumable(
        slow_update, initial_state(), batches(num_batches), directory, save_every=save_every
    )
    np.savez(out, **{k: np.asarray(v) for k, v in state._asdict().items()})


if __name__ == "__main__":
    d, o, n, every, pause = sys.argv[1:]
    main(d, o, int(n), int(every), float(pause))
