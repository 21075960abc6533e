"""What a run shows: DIR/metrics.jsonl (one JSON object per optimizer step) and PNG plots of it.

Plots need matplotlib (`pip install 'dsv3[plot]'`); without it a run still trains and says so once.
"""

from __future__ import annotations

import json
import os

from ..ckpt.io import atomic_write_text


class MetricsLog:
    """Appends one line per step. On resume, lines after the resumed step are dropped first, so the file
    reads as if the run had never stopped."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is None:
            atomic_write_text(path, "")
        else:
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str) -> list[dict]:
    """Every complete JSON line of a metrics file (a torn last line, from a kill mid-write, is skipped)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def plot_run(run_dir: str) -> list[str]:
    """Write loss.png, maxvio.png and expert_load.png into run_dir from its metrics.jsonl, and for post-training
    runs post_training.png (rewards, held-out accuracy, KL, entropy, completion lengths, clip ratios). -> paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install 'dsv3[plot]'") from e
    import numpy as np

    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no steps to plot")
    steps = [r["step"] for r in rows]
    paths = []

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ax[0].plot(steps, [r["loss"] for r in rows], label="train (main head)", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax[0].plot(*zip(*val), "o-", label="validation", ms=4)
    if "unigram_entropy" in rows[-1]:
        ax[0].axhline(rows[-1]["unigram_entropy"], color="gray", ls="--", lw=1, label="unigram entropy")
    ax[0].set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax[0].legend()
    mtp = [(r["step"], r["mtp_loss"]) for r in rows if r.get("mtp_loss") is not None]
    ax[1].plot(steps, [r["loss"] for r in rows], label="main: next token", lw=1)
    if mtp:
        ax[1].plot(*zip(*mtp), label="MTP: token after next", lw=1)
    ax[1].set(xlabel="step", ylabel="cross-entropy", title="Main head and MTP module")
    ax[1].legend()
    fig.tight_layout()
    paths.append(os.path.join(run_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    mv = [(r["step"], r["maxvio"]) for r in rows if r.get("maxvio") is not None]
    if mv:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(*zip(*mv), lw=1, label="batch MaxVio (mean over MoE layers)")
        g = [(r["step"], r["maxvio_global"]) for r in rows if r.get("maxvio_global") is not None]
        if g:
            ax.plot(*zip(*g), "o-", ms=4, label="global MaxVio (validation)")
        ax.set(xlabel="step", ylabel="MaxVio", title="Expert load imbalance", ylim=(0, None))
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(run_dir, "maxvio.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if any("reward" in r or "eval_accuracy" in r for r in rows):  # post-training: rewards and accuracy
        paths.append(_plot_post_training(rows, run_dir, plt))

    loads = [r["expert_load"] for r in rows if r.get("expert_load")]
    if loads:
        recent = np.asarray(loads[-max(1, len(loads) // 10):], dtype=float).mean(axis=0)  # last 10% of steps
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * recent.shape[1] + 2), 0.5 * recent.shape[0] + 2))
        im = ax.imshow(recent, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="MoE layer", title="Share of routed tokens per expert (last 10% of steps)")
        ax.set_yticks(range(recent.shape[0]))
        ax.set_yticklabels(rows[-1].get("moe_layers", list(range(recent.shape[0]))))
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(os.path.join(run_dir, "expert_load.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _plot_post_training(rows: list[dict], run_dir: str, plt) -> str:
    """post_training.png: what a GRPO (or SFT) run logs beyond the loss, each panel only where logged."""
    def series(key):
        return [(r["step"], r[key]) for r in rows if r.get(key) is not None]

    panels = [("Rewards", [k for k in rows[-1] if k.startswith("rewards/") and k.endswith("/mean")] + ["reward"]),
              ("Held-out accuracy (greedy)", ["eval_accuracy", "eval_format"]),
              ("KL to the reference, entropy", ["kl", "entropy"]),
              ("Completion length (tokens)", ["completions/mean_length", "completions/max_length"]),
              ("Clip ratios", ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]),
              ("Groups with equal rewards", ["frac_reward_zero_std"])]
    panels = [(t, [k for k in keys if series(k)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            pts = series(k)
            ax.plot(*zip(*pts), "o-" if len(pts) < 30 else "-", ms=3, lw=1, label=k)
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, "post_training.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
