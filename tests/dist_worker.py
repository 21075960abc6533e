"""Run under torchrun by tests/test_parallel.py: train a run with a layout, then check what only the ranks
themselves can see (every rank's balancing biases) and write it to DIR/ranks.json.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py OUT_DIR CORPUS --ep 2 ...
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from dsv3.train.trainer import Trainer, TrainConfig


def main() -> None:
    out, data, *layout = sys.argv[1:]
    kw = dict(zip((a.lstrip("-").replace("-", "_") for a in layout[::2]), layout[1::2]))
    kw = {k: (v if k == "pp_schedule" else int(v)) for k, v in kw.items()}
    trainer = Trainer(TrainConfig(out=out, preset="micro", data=data, steps=4, save_every=2, eval_every=2,
                                  eval_batches=2, no_plots=True, precision="fp32", batch_size=8, micro_batch_size=2,
                                  **kw))
    trainer.fit()
    biases = [m.gate.bias.tolist() for m in trainer.moe_layers]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, biases)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "ranks.json"), "w") as f:
            json.dump({"biases": every, "world": dist.get_world_size()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
