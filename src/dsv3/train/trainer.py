"""The training loop: `TrainConfig` (every option of `dsv3 train`) and the `Trainer` that runs it.

    trainer = Trainer(TrainConfig(out="runs/tiny", preset="tiny", steps=300))
    summary = trainer.fit()

Building a Trainer readies the run: it claims the run directory, resumes from the newest checkpoint if there
is one (refusing options that would make it another run), prepares tokenizer and data, builds the model
(random weights of a preset, or a model directory's with `init_from`), applies the precision, and builds
the optimizer. `step()` is one optimizer step, top to bottom; `fit()` runs the steps left, then the plots.

Given from outside: the objective (objectives.py; V3's pretraining objective by default) and the export that
makes the run directory a model directory of each checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..ckpt.io import atomic_write_json
from ..ckpt.pretrained import load_pretrained, save_pretrained
from ..ckpt.state import (exported_step, list_checkpoints, load_checkpoint, mark_exported, remove_stale,
                          save_checkpoint)
from ..config import PRESETS, ModelConfig
from ..data.corpus import builtin_corpus, corpus_hash, load_corpus, split
from ..data.dataset import PackedSequences, cached_tokens, tokenize, unigram_entropy
from ..eval.bpb import LossResult, bits_per_byte, next_token_loss
from ..model.model import DeepSeekV3, init_weights
from ..model.moe import RoutingStats
from ..parallel import checkpoint as pcheckpoint
from ..parallel import mesh
from ..parallel.mesh import Layout
from ..parallel.parallelize import clip_grad_norm_, mean_over_dp, parallelize, sum_over_dp
from ..parallel.pipeline import Pipeline
from ..tokenizer import Tokenizer, train_bpe
from . import balance, cpu
from .metrics import MetricsLog, plot_run, read_metrics
from .objectives import Pretraining
from .optim import build_optimizer
from .schedules import default_warmup, gamma_at, lr_for, mtp_lambda_at

# options that define a run: resuming with different values would not continue the same run
RUN_DEFINING = ("preset", "seed", "data", "tokenizer", "seq_len", "batch_size", "micro_batch_size", "balance",
                "mtp_depth", "fim_rate", "val_fraction", "init_std", "bf16_moments", "init_from", "rope_scaling")

# per-preset defaults: (sequence length, sequences per step, peak learning rate)
PRESET_TRAINING = {"micro": (64, 8, 3e-3), "tiny": (256, 16, 2e-3), "bench-small": (256, 16, 1.5e-3),
                   "125M": (1024, 64, 1e-3), "1B": (2048, 256, 4e-4), "671B": (4096, 15360, 2.2e-4)}
OTHER_TRAINING = (1024, 32, 1e-3)  # a model from --init-from (the sequence length at most its context)

PRECISIONS = ("auto", "fp32", "bf16", "fp8")
AUTOCAST_PRECISION = {"auto": "auto", "bf16": "bf16", "off": "fp32"}  # the deprecated --autocast's values
RUN_MARKS = ("checkpoints", "run.json", "metrics.jsonl", "data")  # what makes a directory a run directory of ours


@dataclass
class TrainConfig:
    """Every option of `dsv3 train`; the command line maps onto it field by field (train.py). None means the
    default of the preset (or of the --init-from model): `with_defaults()` fills those in."""

    # run
    out: str  # run directory, also the model directory of the latest checkpoint
    preset: str | None = None  # model size (None: tiny); not with init_from, whose model it would replace
    init_from: str | None = None  # a model directory a new run starts from: weights, config, tokenizer
    steps: int = 300  # optimizer steps; the schedules scale to them
    seed: int = 0  # the weights, the data order and FIM
    save_every: int = 100  # checkpoint every K steps, and at the end
    keep: int = 2  # checkpoints kept
    device: str | None = None  # None: cuda if available, else cpu
    no_plots: bool = False
    # data
    data: str | None = None  # text file, folder or JSONL; None: the built-in corpus
    tokenizer: str | None = None  # reuse this tokenizer directory (None: train a BPE, or init_from's)
    seq_len: int | None = None
    fim_rate: float = 0.1  # share of training documents in FIM form
    val_fraction: float = 0.02  # documents held out
    # optimisation
    batch_size: int | None = None  # sequences per optimizer step
    micro_batch_size: int | None = None  # sequences per forward; gradients accumulate (None: the batch)
    lr: float | None = None  # peak learning rate
    warmup_steps: int | None = None  # None: 5% of the steps, at most 2000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lr_schedule: str = "v3"  # v3 (pretraining's warmup-constant-cosine) | cosine (to lr_floor x lr) | constant
    lr_floor: float = 0.1  # the cosine schedule's end, as a fraction of the peak
    bf16_moments: bool = False  # AdamW's moments in BF16 (as V3)
    init_std: float = 0.006  # weight init std (V3: 0.006); with init_from, for new MTP modules only
    recompute: bool = False  # recompute each block in backward
    precision: str = "auto"  # fp32 | bf16 (autocast) | fp8 (FP8 Linears, bf16 elsewhere) | auto
    # recipe
    balance: str = "aux-free"  # aux-free | aux-loss | none (train/balance.py)
    gamma: float = 0.001  # bias update speed
    alpha: float | None = None  # balance-loss weight (None: 1e-4 aux-free, 1e-3 aux-loss)
    mtp_depth: int | None = None  # MTP modules (None: the preset's or the init_from model's)
    mtp_lambda: tuple[float, float] = (0.3, 0.1)  # MTP loss weight for the first 2/3 of training, then
    eval_every: int = 50
    eval_batches: int = 8
    # model overrides
    rope_scaling: dict | None = None  # config.json's rope_scaling, e.g. {"type": "yarn", "factor": 4, ...}
    # many processes (under torchrun; parallel/mesh.py). Not part of what defines a run: a run may resume in
    # another layout, its losses are the same up to float32 reordering
    dp_shard: int = -1  # data-parallel (FSDP) degree; -1: what the world leaves after pp and tp
    ep: int = 1  # expert-parallel degree, borrowed from dp
    pp: int = 1  # pipeline stages
    tp: int = 1  # tensor-parallel degree
    pp_schedule: str = "1f1b"
    pp_overlap: bool = True  # dualpipev: run each paired forward and backward side by side

    def __post_init__(self) -> None:
        if self.preset is not None and self.init_from is not None:
            raise ValueError(f"--preset {self.preset} and --init-from {self.init_from}: the model comes from "
                             "--init-from; leave out --preset")
        if self.preset is None and self.init_from is None:
            self.preset = "tiny"
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: expected one of {', '.join(sorted(PRESETS))}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.balance not in balance.MODES:
            raise ValueError(f"--balance {self.balance!r}: expected one of {', '.join(balance.MODES)}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"--rope-scaling must be a JSON object, not {self.rope_scaling!r}")
        self.mtp_lambda = tuple(self.mtp_lambda)

    @property
    def layout(self) -> Layout:
        """How the run splits over processes (parallel/mesh.py)."""
        return Layout(self.dp_shard, self.ep, self.pp, self.tp, self.pp_schedule, self.pp_overlap)

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """From `dsv3 train`'s argparse namespace (or any object with those attributes): the deprecated
        --autocast maps onto --precision, --rope-scaling's JSON is parsed."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in vars(args).items() if k in names}
        autocast = getattr(args, "autocast", None)
        if autocast is not None:
            mapped = AUTOCAST_PRECISION[autocast]
            if kw.get("precision") not in (None, mapped):
                raise ValueError(f"--autocast {autocast} (--precision {mapped}) contradicts --precision "
                                 f"{kw['precision']}; give --precision only")
            kw["precision"] = mapped
        if kw.get("precision") is None:
            kw["precision"] = "auto"
        kw["rope_scaling"] = rope_scaling_of(kw.get("rope_scaling"), getattr(args, "rope_factor", None),
                                             getattr(args, "original_max_position_embeddings", None),
                                             kw.get("init_from"))
        return cls(**kw)

    def with_defaults(self, max_positions: int | None = None) -> "TrainConfig":
        """-> a copy with every None that has a default filled in (sequence length at most `max_positions`,
        the context of an init_from model, when not given)."""
        seq_len, batch_size, lr = PRESET_TRAINING.get(self.preset, OTHER_TRAINING)
        if max_positions is not None:
            seq_len = min(seq_len, max_positions)
        c = dataclasses.replace(self, seq_len=self.seq_len or seq_len, batch_size=self.batch_size or batch_size,
                                lr=self.lr or lr)
        c.micro_batch_size = c.micro_batch_size or c.batch_size
        if c.batch_size % c.micro_batch_size:
            raise ValueError(f"--batch-size {c.batch_size} must be a multiple of --micro-batch-size "
                             f"{c.micro_batch_size}")
        if c.alpha is None:
            c.alpha = {"aux-free": 1e-4, "aux-loss": 1e-3, "none": 0.0}[c.balance]
        if c.warmup_steps is None:
            c.warmup_steps = default_warmup(c.steps)
        return c

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size


YARN_V3 = dict(beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)  # DeepSeek-V3's config.json


def rope_scaling_of(value, factor: float | None, original: int | None, init_from: str | None) -> dict | None:
    """--rope-scaling as config.json's rope_scaling object. "yarn" -> V3's YaRN (YARN_V3) with factor s =
    --rope-factor over the original length L0 = --original-max-position-embeddings, by default the length the
    --init-from run trained at (its run.json), else its config's context; JSON -> that object as given."""
    if value is None or isinstance(value, dict):
        if factor is not None or original is not None:
            raise ValueError("--rope-factor and --original-max-position-embeddings go with --rope-scaling yarn")
        return value
    if value.strip().lower() != "yarn":
        if factor is not None or original is not None:
            raise ValueError("--rope-factor and --original-max-position-embeddings go with --rope-scaling yarn, "
                             "not with a JSON rope_scaling (put them in the JSON)")
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--rope-scaling {value!r}: expected 'yarn' or a JSON object ({e})") from None
    if factor is None or not factor >= 1:
        raise ValueError(f"--rope-scaling yarn needs --rope-factor S >= 1 (the context extension factor), "
                         f"not {factor}")
    if original is None:
        if init_from is None:
            raise ValueError("--rope-scaling yarn without --init-from needs --original-max-position-embeddings")
        original = trained_length(init_from)
    if original < 1:
        raise ValueError(f"--original-max-position-embeddings {original} must be >= 1")
    return dict(type="yarn", factor=factor, original_max_position_embeddings=int(original), **YARN_V3)


def trained_length(model_dir: str) -> int:
    """The sequence length a model directory was trained at: its run.json's --seq-len when a dsv3 run wrote it
    (a config's max_position_embeddings is only an upper bound: the tiny preset names 2048 and trains at 256);
    the original length of a model already extended with YaRN; else its config's context."""
    try:
        with open(os.path.join(model_dir, "run.json")) as f:
            seq_len = json.load(f)["args"]["seq_len"]
        config = ModelConfig.from_hf(model_dir)
        if config.rope_type == "yarn":
            return config.original_max_position_embeddings
        return int(seq_len)
    except (OSError, KeyError, TypeError, ValueError):
        pass
    config = ModelConfig.from_hf(model_dir)
    return config.original_max_position_embeddings if config.rope_type == "yarn" else config.max_position_embeddings


# ---- precision -----------------------------------------------------------------------------------------

def bf16_autocast(choice: str, device: torch.device, resumed: bool | None = None) -> bool:
    """--autocast: "bf16" / "off" as told; "auto": what a resumed run chose (a run keeps its precision), else on
    CUDA with bf16 support and on a CPU whose bf16 matrix products measure fast enough (train/cpu.py)."""
    if choice != "auto":
        return choice == "bf16"
    if resumed is not None:
        return resumed
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        pays, speedup = cpu.bf16_autocast_pays()
        print(f"bf16 autocast {'on' if pays else 'off'}: this CPU multiplies bf16 matrices at {speedup:.2f}x its "
              "float32 speed")
        return pays
    return False


def resolve_precision(requested: str, device: torch.device, saved: str | None = None) -> str:
    """-> "fp32", "bf16" or "fp8". "auto" is what a resumed run chose (`saved`), else bf16 where it pays
    (`bf16_autocast`). Another value than a resumed run's is refused before this (Trainer._check_resume)."""
    if saved is not None:
        return saved
    if requested == "auto":
        return "bf16" if bf16_autocast("auto", device) else "fp32"
    return requested


def bf16_products(device: torch.device, precision: str):
    """A context for the steps of a run in `precision`: on a CPU that multiplies BF16 matrices more slowly than
    FP32 ones (AVX2), BF16 products taken as FP32 kernels on widened operands, the same numbers at FP32 speed
    (quant/bf16.py); elsewhere nothing."""
    if device.type != "cpu" or precision not in ("bf16", "fp8"):
        return contextlib.nullcontext()
    speedup = cpu.bf16_matmul_speedup()
    if speedup >= 1:
        return contextlib.nullcontext()
    from ..quant.bf16 import fp32_products
    print(f"BF16 matrix products in FP32 kernels: this CPU multiplies BF16 matrices at {speedup:.2f}x its FP32 "
          "speed (same results: exact products, FP32 sums, BF16 outputs)")
    return fp32_products()


def saved_precision(state: dict) -> str:
    """The precision a checkpoint's run trains in (runs from before --precision recorded bf16_autocast)."""
    return state.get("precision") or ("bf16" if state.get("bf16_autocast") else "fp32")


def convert_to_fp8(model: DeepSeekV3) -> None:
    """--precision fp8: FP8 Linears swapped in from outside the model (quant/training.py), keeping the same
    Parameter objects and state_dict names, so the optimizer and checkpoints see the same model."""
    try:
        from ..quant.training import convert_to_fp8_training
    except ImportError as e:
        raise RuntimeError(f"--precision fp8 needs dsv3.quant.training, which this installation lacks ({e}); "
                           "train with --precision bf16 until it arrives") from None
    convert_to_fp8_training(model)


# ---- the run directory: claim, data, model ------------------------------------------------------------------

def claim_run_dir(run_dir: str) -> None:
    """--out is a new or empty directory, or one of our runs: anything else (a model directory someone made,
    a folder of data) is refused, since the trainer writes its tokenizer and model over what is there."""
    os.makedirs(run_dir, exist_ok=True)
    entries = sorted(os.listdir(run_dir))
    if entries and not any(m in entries for m in RUN_MARKS):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"--out {run_dir} is not empty ({shown}) and is not a dsv3 run directory (it has none of "
                         f"{', '.join(RUN_MARKS)}): training would write its tokenizer and model over what is "
                         "there; choose a new or empty directory")
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)  # ours from now on, even if stopped at once


def read_checkpoint_state(run_dir: str, step: int) -> dict:
    """Checkpoint `step`'s state.json alone (its options and precision), before anything is built."""
    with open(os.path.join(run_dir, "checkpoints", f"step_{step:08d}", "state.json"), encoding="utf-8") as f:
        return json.load(f)


def read_run_state(run_dir: str) -> tuple[list[int], dict | None]:
    """-> the steps of the run's checkpoints and the newest one's state.json (None for a new run)."""
    saved = list_checkpoints(run_dir)
    return saved, (read_checkpoint_state(run_dir, saved[-1]) if saved else None)


def hash_text(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def run_tokenizer(c: TrainConfig, run_dir: str) -> Tokenizer | None:
    """The run's tokenizer: --tokenizer, the run directory's own (a resumed run keeps its tokenizer), or
    --init-from's, which becomes the run's own (a resume does not read init_from again); None for a new run
    from a preset without --tokenizer (it trains one)."""
    if c.tokenizer:
        return Tokenizer.from_dir(c.tokenizer)
    if os.path.isfile(os.path.join(run_dir, "tokenizer.json")):
        return Tokenizer.from_dir(run_dir)
    if not c.init_from:
        return None
    if not os.path.isfile(os.path.join(c.init_from, "tokenizer.json")):
        raise ValueError(f"--init-from {c.init_from} has no tokenizer.json; name one with --tokenizer DIR")
    tok = Tokenizer.from_dir(c.init_from)
    tok.save_pretrained(run_dir)
    return tok


def prepare_data(c: TrainConfig, run_dir: str):
    """Corpus -> split -> tokenizer (given, the run's own, init_from's, or a BPE trained here) -> cached token
    ids. -> (tokenizer, train ids, validation ids, a description for run.json)."""
    docs = load_corpus(c.data) if c.data else builtin_corpus()
    train_docs, val_docs = split(docs, c.val_fraction)
    tok = run_tokenizer(c, run_dir)
    if tok is None:
        tok = train_bpe((d.text for d in train_docs), vocab_size=PRESETS[c.preset]["vocab_size"])
        tok.save_pretrained(run_dir)
    key = {"format": 2, "corpus": corpus_hash(docs), "tokenizer": hash_text(tok.tok.to_str()), "fim_rate": c.fim_rate,
           "seed": c.seed, "val_fraction": c.val_fraction}
    data_dir = os.path.join(run_dir, "data")
    train = cached_tokens(os.path.join(data_dir, "train.npy"), dict(key, split="train"),
                          lambda: tokenize(train_docs, tok, c.fim_rate, c.seed))
    val = cached_tokens(os.path.join(data_dir, "val.npy"), dict(key, split="val"), lambda: tokenize(val_docs, tok))
    val_bytes = sum(len(d.text.encode("utf-8")) for d in val_docs)
    info = {"documents": len(docs), "train_documents": len(train_docs), "val_documents": len(val_docs),
            "corpus_sha256": key["corpus"], "source": c.data or "python-stdlib", "train_tokens": int(len(train)),
            "val_tokens": int(len(val)), "val_bytes": val_bytes, "unigram_entropy": unigram_entropy(train)}
    return tok, train, val, info


class CorpusData:
    """What a Trainer reads and how it evaluates, for pretraining: a text corpus packed into sequences
    (`prepare_data`), validation loss and bits per byte. Post-training brings its own (sft.py, grpo.py), with
    the same methods:

        prepare(config, run_dir) -> (tokenizer, train, val, info)   # train.batch(start, size) -> a batch
        attach(trainer)                                             # once the model is built (optional)
        evaluate(trainer) -> dict                                   # the figures logged at eval steps
    """

    def prepare(self, c: TrainConfig, run_dir: str):
        tok, train_tokens, val_tokens, info = prepare_data(c, run_dir)
        return (tok, PackedSequences(train_tokens, c.seq_len, c.seed),
                PackedSequences(val_tokens, c.seq_len, c.seed, shuffle=False), info)

    def attach(self, trainer: "Trainer") -> None:
        pass

    def evaluate(self, trainer: "Trainer") -> dict:
        """Validation loss and bits per byte over the first eval_batches batches, and the expert loads' MaxVio
        over all of them (eval/bpb.py)."""
        c, info = trainer.config, trainer.data_info
        with trainer.products:
            if trainer.pipeline is None:
                r = next_token_loss(trainer.model, trainer.val_data, c.eval_batches * c.micro_batch_size,
                                    c.micro_batch_size, trainer.device, count_loads=True)
            else:
                r = trainer._pipeline_evaluate()
        tokens_per_byte = info["val_tokens"] / max(info["val_bytes"], 1)
        return {"val_loss": r.loss, "val_bpb": bits_per_byte(r.loss, tokens_per_byte),
                "maxvio_global": balance.maxvio(r.loads).nanmean().item(),
                "unigram_entropy": info["unigram_entropy"]}


def model_config(c: TrainConfig, tok: Tokenizer, source: ModelConfig | None) -> ModelConfig:
    """The model a new run trains: the preset's, sized to the tokenizer, or the `source` model's (init_from);
    either with the options that may change it (sequence length, MTP depth, rope scaling)."""
    if source is None:
        config = ModelConfig.preset(c.preset).replace(vocab_size=tok.vocab_size, initializer_range=c.init_std)
    else:
        if tok.vocab_size > source.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model of {c.init_from} embeds "
                             f"{source.vocab_size}; use the model's own tokenizer")
        depth = source.num_nextn_predict_layers
        if c.mtp_depth is not None and c.mtp_depth < depth:
            raise ValueError(f"--mtp-depth {c.mtp_depth}: {c.init_from} has {depth} MTP module(s); a run from it "
                             f"keeps them (--mtp-depth {depth} or more: the modules beyond {depth} start new)")
        config = source
    changes = dict(max_position_embeddings=max(config.max_position_embeddings, c.seq_len), quantization_config=None)
    changes.update({k: v for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id))
                    if v is not None})
    if c.mtp_depth is not None:
        changes["num_nextn_predict_layers"] = c.mtp_depth
    if c.balance == "aux-loss":
        changes["seq_aux"] = False
    config = config.replace(**changes)
    if c.rope_scaling is not None:  # read as config.json's field is, with its checks; the context grows to the
        # extended length (V3: 40 x 4096 = 163840)
        config = ModelConfig.from_hf(dict(config.to_hf(), rope_scaling=c.rope_scaling))
        if config.rope_type == "yarn":
            extended = int(config.rope_factor * config.original_max_position_embeddings)
            config = config.replace(max_position_embeddings=max(config.max_position_embeddings, extended))
    return config


def build_model(config: ModelConfig, c: TrainConfig, source: DeepSeekV3 | None) -> DeepSeekV3:
    """Initialised weights (V3: N(0, 0.006)), then, from init_from, every weight `source` has (all but new MTP
    modules); the balancing biases come with them."""
    model = DeepSeekV3(config)
    init_weights(model, std=c.init_std, generator=torch.Generator().manual_seed(c.seed))
    if source is not None:
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        kept = source.config.num_nextn_predict_layers
        new = [k for k in missing if not (k.startswith("mtp.") and int(k.split(".")[1]) >= kept)]
        assert not unexpected and not new, f"{unexpected=} {new=}"
        model.generation_config = getattr(source, "generation_config", None)
    return model


def export_model(model: DeepSeekV3, run_dir: str, tok: Tokenizer, step: int) -> None:
    """The run directory's model := checkpoint `step`'s weights, recorded as such once complete."""
    save_pretrained(model, run_dir, dtype=torch.float32, tokenizer=tok)
    mark_exported(run_dir, step)


# ---- the trainer ------------------------------------------------------------------------------------------

class Trainer:
    """Runs a TrainConfig: `fit()` trains the steps left and returns a summary; `step()` is one step.

    objective(model, batch, stats, step) -> (loss, terms) (objectives.py; default: V3 pretraining).
    export(model, run_dir, tokenizer, step) writes the run directory's model after each checkpoint.
    data: what the run reads and how it is evaluated (`CorpusData`, the default: pretraining).
    config.RUN_DEFINING (a class attribute, optional) names the options a resumed run must keep."""

    def __init__(self, config: TrainConfig, objective=None, export=export_model, data=None):
        run_dir = self.run_dir = config.out
        if config.init_from and os.path.realpath(config.init_from) == os.path.realpath(run_dir):
            raise ValueError(f"--init-from and --out are the same directory ({run_dir}): to continue that run, "
                             "run its own command again; to start a new run from it, choose another --out")
        # under torchrun: join the other processes (every rank runs all of this; rank 0 alone writes the run
        # directory's files, the others wait for it where they read them)
        self.par = par = mesh.start(config.layout, config.device)  # None: one process
        self.is_main = par is None or par.is_main
        if self.is_main:
            claim_run_dir(run_dir)
        self.device = device = par.device if par else torch.device(
            config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(config.seed)
        if device.type == "cpu":
            cpu.retain_freed_memory()  # each step reuses the last one's pages instead of faulting in fresh ones
        for path in remove_stale(run_dir) if self.is_main else ():
            print(f"removed {path}, left half-written by a run that was stopped")
        self._barrier()

        # ---- what a resumed run was; else what a new one starts from --------------------------------------------
        # read by rank 0 alone and shared: on a network filesystem ranks could see different directories
        saved, state = self._agreed(lambda: read_run_state(run_dir))
        source = None  # the init_from model, for a new run only: a resumed one reads its checkpoint
        if state is not None and config.init_from:
            if "model_config" not in state:
                raise ValueError(f"{run_dir} holds a run that was not started with --init-from; use another --out")
            max_positions = ModelConfig.from_hf(state["model_config"]).max_position_embeddings
        elif config.init_from:
            source = load_pretrained(config.init_from, dtype=torch.float32, fp8=False)  # FP8 weights dequantised
            max_positions = source.config.max_position_embeddings
        else:
            max_positions = None
        self.config = c = config.with_defaults(max_positions)
        self.run_args = {k: getattr(c, k) for k in getattr(c, "RUN_DEFINING", RUN_DEFINING)}
        if state is not None:
            self._check_resume(state)
        self.precision = self._agreed(  # measured on rank 0 alone (ranks timing at once could disagree)
            lambda: resolve_precision(c.precision, device, None if state is None else saved_precision(state)))

        # ---- data, tokenizer, model, optimizer --------------------------------------------------------------
        self.data = data or CorpusData()
        if self.is_main:  # tokenizer and token cache written once, then read by the other ranks
            self.tok, self.train_data, self.val_data, self.data_info = self.data.prepare(c, run_dir)
        self._barrier()
        if not self.is_main:
            self.tok, self.train_data, self.val_data, self.data_info = self.data.prepare(c, run_dir)
        if state is not None and c.init_from:
            mconfig = ModelConfig.from_hf(state["model_config"])
        else:
            mconfig = model_config(c, self.tok, None if source is None else source.config)
        self.model = model = build_model(mconfig, c, source)
        del source
        model.to(device)
        if self.precision == "fp8":
            convert_to_fp8(model)  # before the optimizer takes the parameters and a checkpoint fills them
        model.recompute = c.recompute
        self.balance_loss = balance.configure(model, c.balance, c.alpha)
        self.moe_layers = balance.moe_layers(model)
        self.moe_names = [n for n, m in model.named_modules() if m in self.moe_layers]
        self.dp_rank, self.dp = 0, 1  # which share of each step's micro-batches this process runs, of how many
        self.module, self.pipeline = model, None  # what this process trains: the model, or its pipeline stages
        if par is not None:
            self.dp_rank, self.dp = par.dp_rank, par.layout.dp
            if c.accumulation % self.dp:
                hint = (f"; e.g. --micro-batch-size {c.batch_size // self.dp}" if c.batch_size % self.dp == 0
                        else "")
                raise ValueError(f"{c.accumulation} micro-batches per step (--batch-size {c.batch_size} / "
                                 f"--micro-batch-size {c.micro_batch_size}) do not split over {self.dp} "
                                 f"data-parallel ranks: each rank runs its own micro-batches{hint}")
            if par.layout.pp > 1:  # this rank's stages of the model: what it trains, checkpoints and clips
                if objective is not None and not isinstance(objective, Pretraining):
                    raise ValueError("pipeline parallelism (--pp) runs the pretraining objective only")
                self.pipeline = Pipeline(model, par, c.accumulation // self.dp, c.micro_batch_size, c.seq_len)
                self.module = self.pipeline.module
            parallelize(self.module, par)  # after FP8 and before the optimizer: it replaces the parameters
            if self.pipeline is not None:
                try:
                    self.pipeline.build_schedule()
                except ValueError as e:  # torch's rule on micro-batches per stage, in the terms of our flags
                    raise ValueError(f"{e}: each rank runs --batch-size / --micro-batch-size / dp = "
                                     f"{c.batch_size} / {c.micro_batch_size} / {self.dp} micro-batches per step; "
                                     "a smaller --micro-batch-size gives more") from None
        self.optimizer = build_optimizer(self.module, lr=c.lr, weight_decay=c.weight_decay,
                                         bf16_moments=c.bf16_moments)
        self.objective = objective or Pretraining(c.steps, c.mtp_lambda, c.alpha)
        if getattr(self.objective, "alpha", 0) is None:  # an objective built before the run's defaults were known
            self.objective.alpha = c.alpha
        self.export = export
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if self.precision in ("bf16", "fp8")
                         else contextlib.nullcontext())
        self.products = self._agreed(lambda: bf16_products(device, self.precision))  # measured on rank 0 alone

        # ---- resume ------------------------------------------------------------------------------------------
        self.global_step, self.samples, self.skipped = 0, 0, 0
        if state is not None:
            if par is not None or pcheckpoint.is_sharded(run_dir, saved[-1]):  # any layout from any layout
                state = pcheckpoint.load(run_dir, saved[-1], self.module, self.optimizer, model)
            else:
                state = load_checkpoint(run_dir, saved[-1], model, self.optimizer)
            self.global_step, self.samples, self.skipped = state["step"], state["samples"], state.get("skipped", 0)
            if self._agreed(lambda: exported_step(run_dir)) != self.global_step:  # stopped before its export
                print(f"exporting checkpoint {self.global_step} to {run_dir} (the model there was not that "
                      "checkpoint's)")
                self._export()
            if self.global_step >= c.steps:
                print(f"{run_dir} has already trained {self.global_step} of {c.steps} steps")
        self.resumed_at = self.global_step if state is not None else None
        self.metrics = None  # rank 0 alone logs
        if self.is_main:
            self.metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), resume_step=self.resumed_at)
            atomic_write_json(os.path.join(run_dir, "run.json"), {
                "args": dataclasses.asdict(c), "data": self.data_info, "precision": self.precision,
                "model": {"parameters": mconfig.num_params(), "active_parameters": mconfig.num_active_params()},
                "accumulation": c.accumulation, "warmup_steps": c.warmup_steps, "alpha": c.alpha,
                "layout": None if par is None else dataclasses.asdict(par.layout)})
        self.tokens_per_step = c.batch_size * c.seq_len
        self.data.attach(self)

    def _check_resume(self, state: dict) -> None:
        """Refuse to resume with options that would make another run (its precision included)."""
        as_saved = lambda v: json.loads(json.dumps(v))  # noqa: E731 (tuples come back from state.json as lists)
        changed = {k: (state["args"].get(k), v) for k, v in self.run_args.items()
                   if state["args"].get(k) != as_saved(v)}
        was = saved_precision(state)
        if self.config.precision not in ("auto", was):
            changed["precision"] = (was, self.config.precision)
        if changed:
            raise ValueError(f"{self.run_dir} holds a run made with other options "
                             f"({', '.join(f'{k}: was {a!r}, now {b!r}' for k, (a, b) in changed.items())}); "
                             "use another --out, or the same options")

    # ---- the step ---------------------------------------------------------------------------------------------

    def step(self) -> dict:
        """One optimizer step: batch -> forward -> loss terms -> backward (accumulated over micro-batches) ->
        clip -> optimizer -> balancing-bias update -> log, evaluate, save. -> the metrics record it wrote."""
        c, step, model = self.config, self.global_step, self.model
        t0 = time.perf_counter()
        lr = lr_for(c.lr_schedule, step, c.steps, c.lr, c.warmup_steps, c.lr_floor)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        model.train()
        logged, loads = {}, 0
        mine = c.accumulation // self.dp  # with data parallelism each rank runs every dp-th micro-batch
        starts = [self.samples + (i * self.dp + self.dp_rank) * c.micro_batch_size for i in range(mine)]
        if self.pipeline is not None:  # the schedule runs them, through this rank's stages
            loads, logged = self._pipeline_step(starts, step)
        else:
            batches = [self.train_data.batch(start, c.micro_batch_size).to(self.device) for start in starts]
            if hasattr(self.objective, "prepare_step"):  # e.g. a loss normalised over the whole step's tokens
                self.objective.prepare_step(batches, self)
            for batch in batches:
                stats = RoutingStats(self.balance_loss)  # this micro-batch's expert loads and balance losses
                with self.products:  # forward and backward: how BF16 products are taken on this device
                    with self.autocast:
                        loss, terms = self.objective(model, batch, stats, step)  # forward and loss terms
                    (loss / mine).backward()  # FSDP averages the gradients over the dp ranks: 1 / accumulation
                loads = loads + stats.loads(self.moe_layers, self.device)
                _accumulate(logged, terms, mine)
        self.samples += c.batch_size
        if self.par is not None:  # every rank's share: loads and logged terms over all of them
            loads, logged = sum_over_dp(loads, self.par), mean_over_dp(logged, self.par)
        grad_norm = clip_grad_norm_(self.module.parameters(), c.grad_clip,  # over every shard and stage
                                    pp_group=None if self.pipeline is None else self.pipeline.group)
        finite = math.isfinite(logged["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if c.balance == "aux-free":
                balance.update_bias(model, loads, gamma_at(step, c.steps, c.gamma))
        else:  # a bad step is skipped, not applied: the run goes on from the weights it had
            self.skipped += 1
            tqdm.write(f"step {step + 1}: loss {logged['loss']} / grad norm {grad_norm} not finite; step skipped")
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step = step = step + 1
        dt = time.perf_counter() - t0

        mv = balance.maxvio(loads)
        record = {"step": step, **logged, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": self.tokens_per_step / dt,
                  "step_time_s": dt,
                  "maxvio": mv.nanmean().item(), "maxvio_layers": mv.tolist(),
                  "expert_load": (loads.float() / loads.sum(-1, keepdim=True).clamp(min=1)).tolist(),
                  "moe_layers": self.moe_names, "skipped": not finite}
        if step % c.eval_every == 0 or step == c.steps:
            record.update(self.evaluate())
        if self.metrics is not None:
            self.metrics.write(record)
        if step % c.save_every == 0 or step == c.steps:
            self.save()
        return record

    def _pipeline_step(self, starts: list[int], step: int) -> tuple[torch.Tensor, dict]:
        """Forward and backward of this rank's micro-batches through the pipeline schedule. -> (expert loads,
        logged terms), each summed over the pipeline ranks (every rank holds some layers' share)."""
        c, model = self.config, self.model
        batch = torch.cat([self.train_data.batch(s, c.micro_batch_size) for s in starts]).to(self.device)
        lam = mtp_lambda_at(step, c.steps, *c.mtp_lambda) if model.mtp else 0.0
        with self.products, self.autocast:
            stats, terms = self.pipeline.step(batch, self.balance_loss, lam, self.objective.alpha)
        n = len(stats)
        loads = sum(st.loads(self.moe_layers, self.device) for st in stats)
        bal = [st.balance_loss_sum() for st in stats]
        parts = torch.tensor([sum(t["loss"].item() for t in terms) / n if terms else 0.0,
                              sum(t["mtp_loss"].item() for t in terms if isinstance(t["mtp_loss"], torch.Tensor)) / n,
                              sum(b.item() for b in bal if b is not None) / n], dtype=torch.float64)
        group = self.pipeline.group
        dist.all_reduce(parts, group=group)
        dist.all_reduce(loads, group=group)
        logged = {"loss": parts[0].item(), "mtp_loss": parts[1].item() if model.mtp else None,
                  "balance_loss": parts[2].item(), "mtp_lambda": lam}
        if c.pp_schedule == "dualpipev":  # rank 0's forward-backward pairs run side by side this step
            logged["pp_overlapped_pairs"] = self.pipeline.overlapped_pairs
        return loads, logged

    def evaluate(self) -> dict:
        """The figures the run's data logs at evaluation steps (`CorpusData.evaluate`: validation loss and bits
        per byte)."""
        return self.data.evaluate(self)

    def _pipeline_evaluate(self) -> LossResult:
        """next_token_loss through the pipeline's stages (every rank runs the same batches), the expert loads
        summed over the pipeline ranks (each counts its own stages' layers)."""
        c = self.config
        r = next_token_loss(self.module, self.val_data, c.eval_batches * c.micro_batch_size, c.micro_batch_size,
                            self.device, count_loads=True, score=self.pipeline.evaluate_batch,
                            layers=self.moe_layers)
        dist.all_reduce(r.loads, group=self.pipeline.group)
        return r

    def save(self) -> None:
        """Checkpoint the whole training state (atomically), then export its weights as the run's model."""
        state = {"samples": self.samples, "args": self.run_args, "skipped": self.skipped,
                 "precision": self.precision, "model_config": self.model.config.to_hf()}
        if self.par is None:
            save_checkpoint(self.run_dir, self.global_step, self.model, self.optimizer, state, keep=self.config.keep)
        else:
            pcheckpoint.save(self.run_dir, self.global_step, self.module, self.optimizer, state, self.config.keep,
                             dataclasses.asdict(self.par.layout))
        self._export()

    def _export(self) -> None:
        """The run directory's model := the current weights (under torchrun: gathered from every rank's
        shards, written by rank 0 into a model of one process)."""
        if self.par is None:
            self.export(self.model, self.run_dir, self.tok, self.global_step)
            return
        full = pcheckpoint.full_model_state(self.module, None if self.pipeline is None else self.pipeline.group)
        if self.is_main:
            whole = DeepSeekV3(self.model.config)
            whole.load_state_dict(full)
            whole.generation_config = getattr(self.model, "generation_config", None)
            self.export(whole, self.run_dir, self.tok, self.global_step)
        self._barrier()

    def _agreed(self, decide):
        """decide() on rank 0, its answer on every rank (one process: decide())."""
        if self.par is None:
            return decide()
        box = [decide() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _barrier(self) -> None:
        if self.par is not None:
            self.par.barrier()

    # ---- the run ----------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train the steps left, write the plots; -> the summary of the run's last step."""
        c, info, cfg = self.config, self.data_info, self.model.config
        what = c.preset if c.init_from is None else f"from {c.init_from}"
        where = "" if self.par is None else f" on {self.par.world} processes ({self.par.layout.describe()})"
        print(f"training {what}{where}: {cfg.num_params() / 1e6:.2f}M parameters ({cfg.num_active_params() / 1e6:.2f}M "
              f"active), {info.get('train_tokens', 0) / 1e6:.2f}M training tokens, {self.tokens_per_step} tokens per step, "
              f"{c.steps} steps, {self.precision}"
              + (f", resuming at step {self.global_step}" if self.resumed_at else ""))
        bar = tqdm(total=c.steps, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.is_main)
        last = {}
        while self.global_step < c.steps:
            last = self.step()
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", maxvio=f"{last['maxvio']:.2f}",
                            tok_s=f"{last['tokens_per_s']:.0f}", refresh=False)
        bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if not c.no_plots and self.is_main:
            try:
                paths = plot_run(self.run_dir)
                print("plots: " + ", ".join(os.path.basename(p) for p in paths))
            except (RuntimeError, ValueError) as e:
                print(f"no plots: {e}")
        return self.summary(last)

    def summary(self, last: dict | None = None) -> dict:
        """The final figures: of `last`, else of the log's record for the current step (a finished run)."""
        if not last:
            path = os.path.join(self.run_dir, "metrics.jsonl")
            last = next((r for r in reversed(read_metrics(path)) if r.get("step") == self.global_step), {})
        summary = {"steps": self.global_step, "loss": last.get("loss"), "val_loss": last.get("val_loss"),
                   "val_bpb": last.get("val_bpb"), "unigram_entropy": self.data_info.get("unigram_entropy"),
                   "maxvio": last.get("maxvio"), "maxvio_global": last.get("maxvio_global"),
                   "skipped_steps": self.skipped}
        if last and hasattr(self.data, "summary"):
            summary.update(self.data.summary(self, last))
        elif last:
            nan = float("nan")
            print(f"done: step {self.global_step}, train loss {last['loss']:.3f}, validation loss "
                  f"{last.get('val_loss', nan):.3f} ({last.get('val_bpb', nan):.3f} bits/byte) against "
                  f"a unigram entropy of {self.data_info['unigram_entropy']:.3f} nats/token; batch MaxVio "
                  f"{last['maxvio']:.3f}")
        return summary


def _accumulate(logged: dict, terms: dict, micro_batches: int) -> None:
    """A step's log from its micro-batches' terms: tensors averaged, plain numbers (weights) as given."""
    for k, v in terms.items():
        if isinstance(v, torch.Tensor):
            logged[k] = logged.get(k, 0.0) + v.item() / micro_batches
        else:
            logged.setdefault(k, v)
