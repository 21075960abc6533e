"""`dsv3 train`: pretrain a DeepSeek-V3 with the V3 recipe (the technical report, §4), resumable to the bit.

    dsv3 train --preset tiny --out runs/tiny            # the built-in corpus, a few minutes on a laptop CPU
    dsv3 train --preset tiny --out runs/tiny            # the same command again: resumes where it stopped

The run directory is itself a model directory of the latest checkpoint (config.json, model.safetensors
with the MTP weights, tokenizer, generation_config.json), loadable by dsv3 and transformers; beside it:
metrics.jsonl (one JSON object per optimizer step), run.json, PNG plots, data/ (cached token ids) and
checkpoints/ (full training state, written atomically).

    dsv3 train --init-from runs/tiny --out runs/tiny-1k --seq-len 1024 \
        --rope-scaling '{"type": "yarn", "factor": 4, "original_max_position_embeddings": 256}'
                                                        # a new run from a model directory's weights

The loop is `Trainer` (trainer.py): batch -> forward (main head + MTP heads) -> loss terms (next-token CE,
lambda x MTP CE, alpha x balance loss: objectives.py) -> backward (gradient accumulation) -> clip -> AdamW ->
balancing-bias update -> log, evaluate, save. This file is its command line: each option is a field of
`TrainConfig`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import PRESETS
from ..parallel import mesh
from ..parallel.mesh import PP_SCHEDULES
from . import balance
from .trainer import AUTOCAST_PRECISION, PRECISIONS, Trainer, TrainConfig, bf16_autocast, export_model

__all__ = ["add_args", "main", "bf16_autocast"]

_export = export_model  # the run directory's export, looked up when main() runs (tests stop a run inside it)


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory (also the model directory of the latest checkpoint)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model size (default tiny); not allowed with --init-from, whose model it would replace")
    g.add_argument("--init-from", default=None, metavar="DIR",
                   help="start a new run from this model directory (ours, a transformers-saved or an official "
                        "DeepSeek-V3 checkpoint, FP8 weights dequantised) instead of random weights: its config "
                        "and tokenizer.json too. --seq-len, --mtp-depth (as deep or deeper: new modules "
                        "initialised) and --rope-scaling may change the model. A resumed run reads its checkpoint, "
                        "not DIR")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300); the schedules scale to it")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order and FIM (default 0)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every K steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots at the end")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="text file, folder, or JSONL with a 'text' field (default: the "
                                                "Python standard library's sources, built in)")
    g.add_argument("--tokenizer", default=None,
                   help="reuse this tokenizer directory (default: train a BPE, or --init-from's tokenizer)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default per preset; with --init-from 1024 at most its context, "
                        "which a longer --seq-len raises)")
    g.add_argument("--fim-rate", type=float, default=0.1, help="share of documents in FIM form (default 0.1)")
    g.add_argument("--val-fraction", type=float, default=0.02, help="documents held out (default 0.02)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (default per preset)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward; gradients accumulate over batch/micro (default: the batch)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default per preset)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps, at most 2000")
    g.add_argument("--lr-schedule", choices=("v3", "cosine", "constant"), default="v3",
                   help="v3 (default): warmup, constant, cosine decay to 1/30, constant (the report's); cosine: "
                        "warmup then cosine to --lr-floor x lr; constant: warmup then --lr (context extension "
                        "trains at the final learning rate of pretraining, constant)")
    g.add_argument("--lr-floor", type=float, default=0.1, help="with --lr-schedule cosine: the end, as a fraction "
                                                              "of --lr (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--bf16-moments", action="store_true", help="keep AdamW's moments in BF16 (as V3)")
    g.add_argument("--init-std", type=float, default=0.006, help="weight init std (V3: 0.006)")
    g.add_argument("--recompute", action="store_true", help="recompute each block in backward (less memory)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32; bf16 (autocast); fp8 (FP8 Linears from dsv3.quant.training, bf16 autocast elsewhere); "
                        "auto (default) = bf16 on CUDA with bf16 support and on a CPU whose bf16 matrix products "
                        "measure at least twice as fast as its float32 ones (AMX), else fp32. A resumed run keeps "
                        "its precision; another is refused")
    g.add_argument("--autocast", choices=sorted(AUTOCAST_PRECISION), default=None,
                   help="deprecated: --precision (auto = auto, bf16 = bf16, off = fp32)")
    g = p.add_argument_group("recipe")
    g.add_argument("--balance", choices=balance.MODES, default="aux-free",
                   help="aux-free: bias updates + sequence-wise loss (V3); aux-loss: the classic auxiliary loss; none")
    g.add_argument("--gamma", type=float, default=0.001, help="bias update speed (V3: 0.001)")
    g.add_argument("--alpha", type=float, default=None,
                   help="balance-loss weight (default 0.0001 for aux-free as V3, 0.001 for aux-loss)")
    g.add_argument("--mtp-depth", type=int, default=None,
                   help="MTP modules (default: the preset's, 1, or the --init-from model's)")
    g.add_argument("--mtp-lambda", type=float, nargs=2, default=(0.3, 0.1), metavar=("FIRST", "THEN"),
                   help="MTP loss weight for the first 2/3 of training, then (V3: 0.3 0.1)")
    g.add_argument("--eval-every", type=int, default=50, help="validation every K steps (and at the end)")
    g.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    g = p.add_argument_group("context extension (YaRN)", "extend a model's context: `--init-from DIR --seq-len L "
                             "--rope-scaling yarn --rope-factor S` (see README, 'Long context')")
    g.add_argument("--rope-scaling", default=None, metavar="yarn|JSON",
                   help="'yarn': DeepSeek-V3's YaRN (beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 1) with "
                        "--rope-factor and --original-max-position-embeddings; or config.json's rope_scaling as "
                        "JSON, e.g. '{\"type\": \"yarn\", \"factor\": 4, \"original_max_position_embeddings\": "
                        "4096}' (default: the model's own)")
    g.add_argument("--rope-factor", type=float, default=None, metavar="S",
                   help="with --rope-scaling yarn: the extension factor s (V3: 40); the model's context becomes "
                        "S x the original length")
    g.add_argument("--original-max-position-embeddings", type=int, default=None, metavar="L0",
                   help="with --rope-scaling yarn: the length the model was trained at (default: the --init-from "
                        "run's --seq-len when it is a dsv3 run directory, else its config's context)")

    g = p.add_argument_group("many processes", "under torchrun (torchrun --nproc-per-node N -m dsv3 train ...): "
                             "N = dp-shard x pp x tp; expert parallelism borrows its ranks from data parallelism. "
                             "Gloo on CPU, NCCL on CUDA; rank 0 alone prints and writes the run directory's files")
    g.add_argument("--dp-shard", type=int, default=-1, metavar="D",
                   help="data-parallel degree, parameters sharded by FSDP2 (default -1: N / (pp x tp))")
    g.add_argument("--ep", type=int, default=1, metavar="E",
                   help="expert-parallel degree: each of E ranks holds 1/E of every MoE layer's routed experts and "
                        "tokens travel to them by all-to-all; divides --dp-shard (default 1)")
    g.add_argument("--pp", type=int, default=1, metavar="P", help="pipeline stages (default 1)")
    g.add_argument("--tp", type=int, default=1, metavar="T",
                   help="tensor-parallel degree for MLA heads and dense MLPs (default 1)")
    g.add_argument("--pp-schedule", choices=PP_SCHEDULES, default="1f1b",
                   help="pipeline schedule (torch.distributed.pipelining's; default 1f1b)")
    g.add_argument("--no-pp-overlap", dest="pp_overlap", action="store_false",
                   help="dualpipev: run each paired forward and backward one after the other (default: side by "
                        "side, one's all-to-all during the other's compute; the same numbers)")


def main(args: argparse.Namespace) -> dict:
    """`dsv3 train`: the options -> TrainConfig -> Trainer; -> the summary of the run's last step. Under
    torchrun, ranks other than 0 print nothing (their errors still reach the console)."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")
    try:
        return Trainer(TrainConfig.from_args(args), export=_export).fit()
    finally:
        mesh.stop()
