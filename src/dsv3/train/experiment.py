"""`dsv3 experiment balance`: the auxiliary-loss-free balancing paper's comparison (Wang et al. 2024,
Table 2), at small scale: the same model, data, seed and steps trained with aux-free balancing (V3's),
with the classic auxiliary loss (alpha 0.001), and with no balancing; validation loss and MaxVio side by
side, and one plot of MaxVio over training.

    dsv3 experiment balance --out runs/balance --steps 300
"""

from __future__ import annotations

import argparse
import copy
import os

from ..ckpt.io import atomic_write_json
from .metrics import read_metrics

RUNS = ("aux-free", "aux-loss", "none")


def add_args(p: argparse.ArgumentParser) -> None:
    from .train import add_args as add_train_args
    add_train_args(p)
    p.set_defaults(no_plots=False)


def main(args: argparse.Namespace) -> dict:
    from .train import main as train
    root = args.out
    os.makedirs(root, exist_ok=True)
    results = {}
    for mode in RUNS:
        run = copy.copy(args)
        run.out = os.path.join(root, mode)
        run.balance = mode
        run.alpha = None  # each mode's default weight (aux-free: 1e-4 sequence-wise; aux-loss: 1e-3)
        if mode != RUNS[0] and not args.tokenizer:
            run.tokenizer = os.path.join(root, RUNS[0])  # one tokenizer, so all three read the same tokens
        print(f"\n=== {mode} ===")
        train(run)
        results[mode] = summarize(run.out)
    table = format_table(results)
    print("\n" + table)
    atomic_write_json(os.path.join(root, "balance.json"), results)
    with open(os.path.join(root, "balance.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    try:
        print("plot: " + plot(root, results))
    except RuntimeError as e:
        print(f"no plot: {e}")
    return results


def summarize(run_dir: str) -> dict:
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    tail = rows[-max(1, len(rows) // 10):]  # the last 10% of steps
    last_eval = [r for r in rows if "val_loss" in r][-1]
    return {"val_loss": last_eval["val_loss"], "val_bpb": last_eval["val_bpb"],
            "maxvio_batch": sum(r["maxvio"] for r in tail) / len(tail),
            "maxvio_global": last_eval["maxvio_global"], "train_loss": sum(r["loss"] for r in tail) / len(tail),
            "steps": rows[-1]["step"]}


def format_table(results: dict) -> str:
    lines = ["| balancing | validation loss | bits/byte | MaxVio (batch, last 10%) | MaxVio (global, validation) |",
             "|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['maxvio_batch']:.3f} | "
                     f"{r['maxvio_global']:.3f} |")
    if "aux-free" in results and "none" in results:
        a, n = results["aux-free"], results["none"]
        lines.append("")
        lines.append(f"aux-free vs none: MaxVio x{a['maxvio_batch'] / max(n['maxvio_batch'], 1e-9):.2f}, "
                     f"validation loss x{a['val_loss'] / n['val_loss']:.4f}")
    if "aux-free" in results and "aux-loss" in results:
        a, b = results["aux-free"], results["aux-loss"]
        lines.append(f"aux-free vs aux-loss: MaxVio x{a['maxvio_batch'] / max(b['maxvio_batch'], 1e-9):.2f}, "
                     f"validation loss x{a['val_loss'] / b['val_loss']:.4f}")
    return "\n".join(lines)


def plot(root: str, results: dict) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install 'dsv3[plot]'") from e
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in results:
        rows = read_metrics(os.path.join(root, mode, "metrics.jsonl"))
        ax[0].plot([r["step"] for r in rows], [r["maxvio"] for r in rows], lw=1, label=mode)
        ev = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        ax[1].plot(*zip(*ev), "o-", ms=3, label=mode)
    ax[0].set(xlabel="step", ylabel="batch MaxVio", title="Expert load imbalance", ylim=(0, None))
    ax[1].set(xlabel="step", ylabel="validation loss", title="Validation loss")
    for a in ax:
        a.legend()
    fig.tight_layout()
    path = os.path.join(root, "balance.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
