"""Post-training on a laptop CPU, end to end: SFT -> GRPO (against a shuffled-reward control) -> R1-style
distillation (a student on verified traces against a student on answers alone), from the `make demo` model.

    python benchmarks/post_training.py --base runs/demo --out runs/post      # ~45 min on 2 cores

Every stage is a dsv3 command run in this process (`dsv3 sft`, `dsv3 grpo`, `dsv3 distill`), so a stopped
run picks up where it was: each stage's run directory resumes, and a finished one is skipped. The held-out
accuracy is greedy exact match in the required format (`<think>...</think>` then `\\boxed{answer}`) on the
task's test split, which never shares a problem with its training split. Writes OUT/post_training.json
(every curve and the final table) and OUT/post_training.png; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from dsv3.cli import build_parser  # noqa: E402
from dsv3.data.tasks import make_task  # noqa: E402
from dsv3.eval.tasks import task_accuracy  # noqa: E402
from dsv3.infer.engine import LLM  # noqa: E402


def dsv3(*argv: str):
    """Run one dsv3 command in this process."""
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


def metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(run: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in metrics(run) if key in r]


def accuracy(model_dir: str, records: list[dict]) -> float:
    """Greedy held-out accuracy of a model directory, as the runs' evaluations measure it."""
    llm = LLM(model_dir, max_num_seqs=64)
    return task_accuracy(llm, records, max_new_tokens=64)["accuracy"]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
        flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
        keep = [f for f in flags if f.startswith(("avx512f", "amx", "avx2", "fma"))]
        return f"{name} ({' '.join(keep)})"
    except OSError:
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/demo", help="the pretrained model (make demo's run directory)")
    ap.add_argument("--out", default="runs/post", help="where the stages' run directories go")
    ap.add_argument("--digits", type=int, default=2, help="arithmetic operands' digits (default 2)")
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--grpo-steps", type=int, default=200)
    ap.add_argument("--grpo-lr", type=float, default=3e-5)
    ap.add_argument("--distill-prompts", type=int, default=2000)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--eval-records", type=int, default=400, help="held-out prompts per evaluation (SFT: 200)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not os.path.isfile(os.path.join(a.base, "config.json")):
        sys.exit(f"{a.base} is not a model directory: run `make demo` first (it writes runs/demo)")
    os.makedirs(a.out, exist_ok=True)
    out = lambda name: os.path.join(a.out, name)  # noqa: E731
    t0 = time.time()
    task = ["--task", "arithmetic", "--digits", a.digits]
    common = ["--precision", "fp32", "--seed", a.seed, "--no-plots"]

    # 1. SFT on step-by-step traces of the built-in task
    dsv3("sft", "--init-from", a.base, *task, "--out", out("sft"), "--steps", a.sft_steps, "--lr", 2e-3,
         "--seq-len", 256, "--batch-size", 16, "--task-records", 10000, "--eval-every", 50, "--save-every", 100,
         "--eval-records", 200, *common)
    # 2. GRPO from the SFT model, and the control: the same run with its rewards shuffled across each batch
    grpo = ["--init-from", out("sft"), *task, "--steps", a.grpo_steps, "--prompts-per-step", 16, "-G", 8,
            "--max-new-tokens", 64, "--seq-len", 128, "--lr", a.grpo_lr, "--eval-every", 25, "--save-every", 50,
            "--eval-records", a.eval_records, *common]
    dsv3("grpo", *grpo, "--out", out("grpo"))
    dsv3("grpo", *grpo, "--out", out("grpo-shuffled"), "--shuffle-rewards")
    # 3. Distillation: the GRPO model as teacher (as R1 taught V3), its verified traces for a student; the
    #    control student learns the answers alone for the same prompts
    traces = out("traces.jsonl")
    if not os.path.isfile(traces):
        dsv3("distill", "--teacher", out("grpo"), *task, "-n", a.distill_prompts, "--out", traces,
             "--max-new-tokens", 64, "--seed", a.seed)
    answers = out("answers.jsonl")
    dsv3("tasks", *task, "--split", "train", "-n", a.distill_prompts, "--seed", a.seed, "--format", "sft-answers",
         "--out", answers)
    test_prompts = out("test_prompts.jsonl")
    dsv3("tasks", *task, "--split", "test", "-n", a.eval_records, "--seed", a.seed, "--format", "prompts",
         "--out", test_prompts)
    student = ["--init-from", a.base, "--steps", a.student_steps, "--lr", 2e-3, "--seq-len", 256,
               "--batch-size", 16, "--eval-every", 50, "--save-every", 100, "--eval-data", test_prompts,
               "--eval-records", a.eval_records, "--val-fraction", 0.02, *common]
    dsv3("sft", *student, "--data", traces, "--out", out("student-traces"))
    dsv3("sft", *student, "--data", answers, "--out", out("student-answers"))

    # the starting points, on the same held-out prompts as the runs' evaluations
    held_out = make_task("arithmetic", digits=a.digits).records("test", a.eval_records, a.seed)
    start = {name: accuracy(path, held_out) for name, path in (("base", a.base), ("sft", out("sft")))}

    runs = {name: out(name) for name in ("sft", "grpo", "grpo-shuffled", "student-traces", "student-answers")}
    result = {"cpu": cpu_name(), "seconds": time.time() - t0, "args": vars(a),
              "curves": {name: {"eval_accuracy": curve(run, "eval_accuracy"), "reward": curve(run, "reward"),
                                "loss": curve(run, "loss")} for name, run in runs.items()}}
    with open(traces + ".summary.json", encoding="utf-8") as f:
        result["distill"] = json.load(f)
    acc = {name: result["curves"][name]["eval_accuracy"] for name in runs}
    result["start"] = start
    table = [("SFT on traces (from the base model)", start["base"], start["sft"]),
             ("GRPO (from the SFT model)", start["sft"], acc["grpo"][-1][1]),
             ("GRPO, shuffled rewards (control)", start["sft"], acc["grpo-shuffled"][-1][1]),
             ("student on the teacher's verified traces", start["base"], acc["student-traces"][-1][1]),
             ("student on answers alone", start["base"], acc["student-answers"][-1][1])]
    result["table"] = [{"run": r, "start": s, "end": e} for r, s, e in table]
    with open(os.path.join(a.out, "post_training.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['cpu']}; {result['seconds'] / 60:.1f} min")
    print(f"{'held-out greedy accuracy':42s} {'start':>7s} {'end':>7s}")
    for r, s, e in table:
        print(f"{r:42s} {s:7.3f} {e:7.3f}")
    print(f"distillation: kept {result['distill']['kept']} of {result['distill']['completions']} teacher "
          f"completions ({result['distill']['acceptance_rate']:.1%} correct)")
    plot(result, os.path.join(a.out, "post_training.png"))


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    c = result["curves"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name in ("sft",):
        ax[0].plot(*zip(*c[name]["eval_accuracy"]), marker="o", label="SFT on traces")
    ax[0].set(title="SFT: held-out accuracy", xlabel="step", ylabel="greedy exact match")
    for name, label in (("grpo", "GRPO"), ("grpo-shuffled", "GRPO, shuffled rewards")):
        ax[1].plot(*zip(*c[name]["eval_accuracy"]), marker="o", label=f"{label}: held-out accuracy")
        steps, rewards = zip(*c[name]["reward"])
        ax[1].plot(steps, rewards, alpha=0.4, label=f"{label}: batch reward")
    ax[1].set(title="GRPO from the SFT model", xlabel="step")
    for name, label in (("student-traces", "student on verified traces"), ("student-answers", "answers alone")):
        ax[2].plot(*zip(*c[name]["eval_accuracy"]), marker="o", label=label)
    ax[2].set(title="Distillation: held-out accuracy", xlabel="step")
    for x in ax:
        x.legend(fontsize=8)
        x.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
