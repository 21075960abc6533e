"""`dsv3 experiment fp8`: FP8 mixed-precision training against BF16 and FP32 (DeepSeek-V3 report §3.3 and
appendix B.1), at small scale: the same seed, data and steps in FP32, BF16 and FP8, plus BF16 with a second seed
for the seed-to-seed noise band; then the op-by-op fidelity of FP8 against FP32 on the trained model, the
accumulation study and the block-scaled-gradient negative result.

    dsv3 experiment fp8 --out runs/fp8                  # the `make demo` recipe: tiny, 250 steps, 4 runs
    dsv3 experiment fp8 --out runs/fp8 --seeds 3        # BF16 and FP8 with 3 seeds each, compared as means

Writes under --out: one run directory per run (fp32/, bf16/, fp8/, bf16-seed{S+1}/, ...), fp8.json with every
number, fp8.md with the tables and fp8.png (loss curves and FP8's relative loss error against BF16).

At small scale a run's loss moves by more than the report's 0.25% under any change of its arithmetic (FP32 and
BF16 runs of one seed part by ~1-2% within a few hundred steps), so one pair of runs cannot resolve 0.25%:
`--seeds K` trains BF16 and FP8 with K seeds each and compares their mean curves, beside the spread of BF16's
own seeds.

The headline figure is the report's: the relative error of FP8's training loss against BF16's, both smoothed
with an exponential moving average (0.9, as the report's curves), at the end of training and at its worst; the
same figure for BF16 against BF16 with another seed is the noise band it must sit inside.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from ..ckpt.io import atomic_write_json
from .metrics import read_metrics

EMA = 0.9  # the smoothing of the report's loss curves


def add_args(p: argparse.ArgumentParser) -> None:
    from .train import add_args as add_train_args
    add_train_args(p)
    # the `make demo` recipe (dsv3.demo): tiny, 250 steps of 8 sequences, faster bias updates for a short run
    p.set_defaults(preset="tiny", steps=250, batch_size=8, gamma=0.01, eval_every=50, save_every=50,
                   no_plots=False)
    p.add_argument("--runs", default="fp32,bf16,fp8", help="which precisions, comma-separated (default all three)")
    p.add_argument("--seeds", type=int, default=1, help="seeds for BF16 and FP8 each (default 1; BF16 gets at "
                   "least 2, for the seed-to-seed band): K > 1 compares the mean curves")
    p.add_argument("--fidelity-sequences", type=int, default=16,
                   help="validation sequences for the per-op table (default 16)")


def ema(values: list[float], beta: float = EMA) -> list[float]:
    """Exponential moving average with bias correction (so the first values are not pulled toward 0)."""
    out, m = [], 0.0
    for i, v in enumerate(values, start=1):
        m = beta * m + (1 - beta) * v
        out.append(m / (1 - beta ** i))
    return out


def relative_error(run: list[float], baseline: list[float]) -> list[float]:
    """(EMA(run) - EMA(baseline)) / EMA(baseline), step by step."""
    a, b = ema(run), ema(baseline)
    return [(x - y) / y for x, y in zip(a, b)]


def _losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def summarize_curves(runs: dict[str, str], seeds: list[int]) -> dict:
    """Relative loss errors against the BF16 run of the first seed (final, worst over the second half of
    training, where the curves are no longer dominated by the first steps' fast fall, and worst overall); with
    several seeds, FP8's mean curve against BF16's, and the seed-to-seed band: BF16 against BF16 for every pair
    of its seeds."""
    losses = {name: _losses(d) for name, d in runs.items()}
    out = {"final_loss_ema": {n: ema(v)[-1] for n, v in losses.items()}}

    def compare(vals, base):
        rel = relative_error(vals, base)
        return {"final_rel_err": rel[-1], "worst_rel_err_2nd_half": max(rel[len(rel) // 2:], key=abs),
                "worst_rel_err": max(rel, key=abs), "curve": rel}

    base = losses.get("bf16")
    if base is None:
        return out
    for name, vals in losses.items():
        if name != "bf16":
            out[name] = compare(vals, base)
    bf16 = [losses[run_name("bf16", s, seeds[0])] for s in seeds if run_name("bf16", s, seeds[0]) in losses]
    fp8 = [losses[run_name("fp8", s, seeds[0])] for s in seeds if run_name("fp8", s, seeds[0]) in losses]
    out["band"] = [compare(a, b)["final_rel_err"] for i, a in enumerate(bf16) for b in bf16[:i]]
    if len(fp8) > 1 and len(bf16) > 1:
        mean = lambda curves: [sum(v) / len(v) for v in zip(*curves)]  # noqa: E731
        out["fp8-mean"] = {**compare(mean(fp8), mean(bf16)), "seeds": len(fp8)}
        # seed by seed, FP8 against the BF16 run of its own seed (same data order and initial weights)
        out["pair_curves"] = {f"fp8 vs bf16, seed {s}": compare(a, b)["curve"] for s, a, b in zip(seeds, fp8, bf16)}
        pairs = [compare(a, b)["final_rel_err"] for a, b in zip(fp8, bf16)]
        m = sum(pairs) / len(pairs)
        sd = (sum((p - m) ** 2 for p in pairs) / (len(pairs) - 1)) ** 0.5
        out["fp8-pairs"] = {"final_rel_err": pairs, "mean": m, "standard_error": sd / len(pairs) ** 0.5}
    return out


def run_name(precision: str, seed: int, first_seed: int) -> str:
    return precision if seed == first_seed else f"{precision}-seed{seed}"


def fidelity(run_dir: str, sequences: int) -> list[dict]:
    """Per-op SQNR table of FP8 against FP32 on the FP32 run's final model and its validation data."""
    import numpy as np

    from ..ckpt.pretrained import load_pretrained
    from ..data.dataset import PackedSequences
    from ..quant.fidelity import per_op_fidelity
    model = load_pretrained(run_dir, dtype=torch.float32)
    seq_len = read_run(run_dir)["args"]["seq_len"]
    val = PackedSequences(np.load(os.path.join(run_dir, "data", "val.npy")), seq_len, 0, shuffle=False)
    batch = val.batch(0, min(sequences, val.num_sequences))
    return per_op_fidelity(model, batch)


def read_run(run_dir: str) -> dict:
    import json
    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
        return json.load(f)


def accumulation_study(k: int = 4096, size: int = 128, seed: int = 0) -> list[dict]:
    """Relative error (Frobenius) of a K=4096 FP8 GEMM against exact (float64) products of the same e4m3
    operands: FP32 accumulation, a 14-bit accumulator without promotion, and with promotion every 128."""
    from ..quant import fp8
    g = torch.Generator().manual_seed(seed)
    rows = []
    for dist, make in (("uniform [0, 1)", lambda: torch.rand(size, k, generator=g)),
                       ("normal", lambda: torch.randn(size, k, generator=g))):
        a = fp8.act_dequant(*fp8.act_quant(make()))
        b = fp8.act_dequant(*fp8.act_quant(make()))
        exact = a.double() @ b.double().T
        for label, kw in (("FP32 accumulator", dict(acc_bits=None)),
                          ("14-bit accumulator, no promotion", dict(promote_every=None)),
                          ("14-bit accumulator, promoted every 128", dict(promote_every=128))):
            c = fp8.gemm_limited_accumulator(a, b, **kw).double()
            rows.append({"operands": dist, "accumulation": label,
                         "rel_err": ((c - exact).norm() / exact.norm()).item()})
    return rows


def ordinary_tokens_db(ratio: float, grad_block: str, seed: int = 0) -> float:
    """Input-gradient SQNR (dB) of the ordinary tokens of 512 whose output gradients include 8 outlier tokens
    `ratio` times larger, with output gradients in 1x128 tiles (V3) or 128x128 blocks (the rejected scheme)."""
    from ..quant import fp8
    from ..quant.training import Fp8Recipe, _quant_grad, sqnr_db
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(512, 256, generator=g) * 1e-3
    outliers = torch.randperm(512, generator=g)[:8]
    dy[outliers] *= ratio
    w = torch.randn(256, 384, generator=g)
    normal = torch.ones(512, dtype=torch.bool)
    normal[outliers] = False
    wq, ws = fp8.weight_quant(w.T.contiguous())  # W^T (K, N) blocks, as the input-gradient GEMM reads them
    dx = fp8.fp8_gemm_ref(*_quant_grad(dy, Fp8Recipe(grad_block=grad_block)), wq, ws, torch.float32)
    return sqnr_db((dy @ w)[normal], dx[normal])


def outlier_study() -> list[dict]:
    """`ordinary_tokens_db` over outlier sizes 10 to 1e5, for both gradient tilings."""
    return [{"outlier_ratio": ratio, **{b: ordinary_tokens_db(ratio, b) for b in ("1x128", "128x128")}}
            for ratio in (1e1, 1e2, 1e3, 1e4, 1e5)]


def main(args: argparse.Namespace) -> dict:
    from ..quant.fidelity import format_table
    from .train import main as train
    root = args.out
    os.makedirs(root, exist_ok=True)
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    known = ("fp32", "bf16", "fp8")
    if not wanted or any(r not in known for r in wanted):
        raise ValueError(f"--runs {args.runs!r}: expected a comma-separated subset of {', '.join(known)}")
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: expected 1 or more")
    seeds = [args.seed + i for i in range(max(args.seeds, 2))]
    plan = [(p, seeds[0]) for p in known if p in wanted and p != "bf16"]  # FP32 and FP8 of the first seed
    plan += [("fp8", s) for s in seeds[1:args.seeds] if "fp8" in wanted]
    plan = sorted(plan + [("bf16", s) for s in seeds if "bf16" in wanted],
                  key=lambda r: (r[1], known.index(r[0])))
    runs, summaries, first = {}, {}, None
    for precision, seed in plan:
        name = run_name(precision, seed, seeds[0])
        run = copy.copy(args)
        run.precision, run.autocast, run.seed = precision, None, seed
        run.out = os.path.join(root, name)
        if first is not None and not args.tokenizer:
            run.tokenizer = first  # one tokenizer, so every run reads the same tokens
        print(f"\n=== {name} ({precision}, seed {seed}) ===")
        summaries[name] = train(run)
        runs[name] = run.out
        first = first or run.out
    curves = summarize_curves(runs, seeds)
    result = {"runs": {n: {"dir": d, **{k: summaries[n].get(k) for k in ("loss", "val_loss", "val_bpb")}}
                       for n, d in runs.items()},
              "seeds": seeds[:args.seeds],
              "curves": {n: {k: v for k, v in c.items() if k != "curve"} if isinstance(c, dict) and "curve" in c else c
                         for n, c in curves.items()}}
    if "fp32" in runs:
        print("\nper-op fidelity of FP8 against FP32 on the FP32 run's model ...")
        result["per_op"] = fidelity(runs["fp32"], args.fidelity_sequences)
    result["accumulation"] = accumulation_study()
    result["outliers"] = outlier_study()
    report = format_report(result)
    if "per_op" in result:
        report += "\n\n### Per-op fidelity (SQNR against FP32, same inputs)\n\n" + format_table(result["per_op"])
    print("\n" + report)
    atomic_write_json(os.path.join(root, "fp8.json"), result)
    with open(os.path.join(root, "fp8.md"), "w", encoding="utf-8") as f:
        f.write(report + "\n")
    try:
        print("plot: " + plot(root, runs, curves))
    except RuntimeError as e:
        print(f"no plot: {e}")
    return result


def format_report(result: dict) -> str:
    lines = ["| run | final train loss (EMA 0.9) | validation loss | bits/byte | rel. error vs BF16: final | "
             "worst (2nd half) | worst (all) |", "|---|---|---|---|---|---|---|"]
    curves = result["curves"]
    for name, r in result["runs"].items():
        c = curves.get(name, {})
        rel = (f"{100 * c['final_rel_err']:+.3f}% | {100 * c['worst_rel_err_2nd_half']:+.3f}% | "
               f"{100 * c['worst_rel_err']:+.3f}%") if isinstance(c, dict) and "final_rel_err" in c else "- | - | -"
        lines.append(f"| {name} | {curves['final_loss_ema'][name]:.4f} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | "
                     f"{rel} |")
    fp8, band = curves.get("fp8"), curves.get("band") or []
    if isinstance(fp8, dict) and band:
        width = max(abs(b) for b in band)
        lines += ["", f"FP8 vs BF16 at the end (seed {result['seeds'][0]}): {100 * fp8['final_rel_err']:+.3f}% (the "
                      f"report's bar: 0.25%); BF16 seed to seed: {', '.join(f'{100 * b:+.3f}%' for b in band)}."]
        mean, pairs = curves.get("fp8-mean"), curves.get("fp8-pairs")
        if mean:
            lines.append(f"Mean of {mean['seeds']} seeds, FP8 vs BF16: {100 * mean['final_rel_err']:+.3f}% at the "
                         f"end, {100 * mean['worst_rel_err_2nd_half']:+.3f}% at worst over the second half.")
        if pairs:
            lines.append(f"Seed by seed, FP8 vs the BF16 run of the same seed, at the end: "
                         f"{', '.join(f'{100 * p:+.3f}%' for p in pairs['final_rel_err'])}: mean "
                         f"{100 * pairs['mean']:+.3f}% +- {100 * pairs['standard_error']:.3f}% (standard error).")
            vals = {p: [r["val_loss"] for n, r in result["runs"].items() if n.split("-seed")[0] == p]
                    for p in ("bf16", "fp8")}
            vb, vf = (sum(v) / len(v) for v in (vals["bf16"], vals["fp8"]))
            lines.append(f"Validation loss, mean over seeds: BF16 {vb:.4f}, FP8 {vf:.4f} ({100 * (vf / vb - 1):+.3f}%).")
        final = (mean or fp8)["final_rel_err"]
        lines.append(f"FP8 ({'mean' if mean else 'one seed'}) is {'inside' if abs(final) <= width else 'outside'} "
                     f"the seed band (|{100 * width:.3f}%|) and {'within' if abs(final) <= 0.0025 else 'beyond'} "
                     "0.25%.")
    lines += ["", "### Accumulation study (K = 4096, 128 x 128 outputs, e4m3 operands)", "",
              "| operands | accumulation | relative error |", "|---|---|---|"]
    for r in result["accumulation"]:
        lines.append(f"| {r['operands']} | {r['accumulation']} | {100 * r['rel_err']:.4f}% |")
    lines += ["", "### Output gradients with outlier tokens: 1x128 tiles vs 128x128 blocks", "",
              "| outlier tokens' size (x ordinary) | 1x128 tiles (dB) | 128x128 blocks (dB) |", "|---|---|---|"]
    for r in result["outliers"]:
        lines.append(f"| {r['outlier_ratio']:.0e} | {r['1x128']:.1f} | {r['128x128']:.1f} |")
    return "\n".join(lines)


def plot(root: str, runs: dict[str, str], curves: dict) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install 'dsv3[plot]'") from e
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, d in runs.items():
        vals = ema(_losses(d))
        ax[0].plot(range(1, len(vals) + 1), vals, lw=1, label=name)
    ax[0].set(xlabel="step", ylabel="training loss (EMA 0.9)", title="Training loss")
    ax[0].set_ylim(top=min(ax[0].get_ylim()[1], 8))
    # FP8 against the BF16 run of the same seed (same data order and initial weights); the mean of the seeds;
    # FP32 against BF16; BF16 against BF16 of the next seed, in grey: how far runs part that differ in nothing else
    pair_curves = curves.get("pair_curves")
    if not pair_curves and isinstance(curves.get("fp8"), dict):
        pair_curves = {"fp8 vs bf16": curves["fp8"]["curve"]}
    pair_curves = pair_curves or {}
    for label, rel in pair_curves.items():
        ax[1].plot(range(1, len(rel) + 1), [100 * v for v in rel], lw=0.8, alpha=0.8, label=label)
    for name, label, style in (("fp8-mean", "fp8 vs bf16, mean of the seeds", dict(lw=2, color="black")),
                               ("fp32", "fp32 vs bf16", dict(lw=1, color="tab:blue", ls=":")),
                               ("bf16-seed1", "bf16 seed 1 vs seed 0", dict(lw=1, color="grey"))):
        c = curves.get(name)
        if isinstance(c, dict) and "curve" in c:
            ax[1].plot(range(1, len(c["curve"]) + 1), [100 * v for v in c["curve"]], label=label, **style)
    ax[1].axhline(0.25, color="grey", ls="--", lw=0.8)
    ax[1].axhline(-0.25, color="grey", ls="--", lw=0.8)
    ax[1].set(xlabel="step", ylabel="relative loss error (%)", title="Relative error against BF16 (EMA 0.9)")
    ax[1].set_ylim(-3, 3)
    for a in ax:
        a.legend()
    fig.tight_layout()
    path = os.path.join(root, "fp8.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
