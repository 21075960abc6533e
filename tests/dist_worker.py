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


def fp8_dispatch(out: str) -> None:
    """One FP8-trained MoE layer under expert parallelism, its rows dispatched in FP8 and as they are: the
    experts quantise their input to the same values either way, so outputs and gradients must be identical."""
    from torch.distributed.device_mesh import init_device_mesh

    from dsv3 import DeepSeekV3, ModelConfig, init_weights
    from dsv3.parallel.expert_parallel import apply_ep
    from dsv3.quant.training import convert_to_fp8_training
    dist.init_process_group("gloo")
    model = DeepSeekV3(ModelConfig.preset("micro").replace(hidden_size=256, moe_intermediate_size=128))
    init_weights(model, std=0.02, generator=torch.Generator().manual_seed(0))
    convert_to_fp8_training(model)
    apply_ep(model, init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)))
    moe = model.layers[1].ffn
    x = torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(dist.get_rank()))
    results = []
    assert moe.dispatcher.fp8_recipe is not None  # FP8 experts: the dispatcher sends FP8
    for recipe in (moe.dispatcher.fp8_recipe, None):
        moe.dispatcher.fp8_recipe = recipe
        xi = x.clone().requires_grad_(True)
        model.zero_grad()
        y = moe(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), xi.grad] + [getattr(moe.experts, n).grad.to_local() for n in ("w1", "w2", "w3")])
    same = all(torch.equal(a, b) for a, b in zip(*results))
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, same)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "fp8_dispatch.json"), "w") as f:
            json.dump({"identical": flags}, f)
    dist.destroy_process_group()


def main() -> None:
    if sys.argv[1] == "fp8-dispatch":
        return fp8_dispatch(sys.argv[2])
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
