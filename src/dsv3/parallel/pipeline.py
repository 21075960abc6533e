"""Pipeline parallelism with torch.distributed.pipelining: the model cut into stages by layer ranges, run by
any of its schedules by name.

    --pp 2 --pp-schedule 1f1b              one stage per rank:        rank r holds stage r
    --pp 2 --pp-schedule interleaved1f1b   two stages per rank, loop: rank r holds stages r, r + pp
    --pp 2 --pp-schedule zbv | dualpipev   two stages per rank, V:    rank r holds stages r, 2 pp - 1 - r

Stages (`Stage`) keep the model's own modules and names: the first holds the embedding, the last the final
norm, the head and the MTP modules. The MTP modules read the embeddings of the tokens one further along:
the first stage looks them up with the rest and they travel with the hidden states to the last stage, so
the one embedding gets its whole gradient back through the pipeline, whatever the schedule (split
backwards such as zbv's and dualpipev's only reach weights on the path to a stage's inputs) and wherever
the last stage is. That costs one more (B, T, D) tensor on each hop, in both directions.

Each micro-batch's loss is computed on the last stage: next-token cross-entropy + lambda x MTP loss + alpha
x its layers' balance losses. The balance losses of the other stages join the step's loss where they
arise (`_AddLoss`: the stage's output carries them into backward), so nothing but hidden states travels
between stages. Token ids, labels and the micro-batch's index reach every stage as keyword arguments of
`schedule.step`, split into micro-batches as the inputs are.

DualPipeV pairs one micro-batch's forward on one stage with another's backward on the other (the report's
Figure 4). `overlap_forward_backward`, registered as the schedule's handler for those pairs, runs the
backward in a second thread while the forward runs here: one's all-to-all (and any communication) proceeds
while the other computes. The two touch different stages and micro-batches, the backward's all-to-alls use
a process group of their own (expert_parallel.py), so the results are those of the sequential handler, bit
for bit (tests/test_parallel.py, pp2 x ep2). Not with --recompute (a recomputed forward in the backward's
thread would issue forward all-to-alls beside the forward's) nor with --tp (TP's all-reduces have no twin
group): there the pairs run one after the other. Tested on CPU only; on GPUs the natural form is two CUDA
streams, not threads.

Every rank builds the whole model and keeps its stages' modules (the others are never run): simple, and
enough for the models a CPU trains; on the meta device first for large ones is future work.
"""

from __future__ import annotations

import contextlib
import threading


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
import torch.distributed.pipelining as pipelining
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import OVERLAP_F_B, _wait_batch_p2p

from ..model.model import DeepSeekV3
from ..model.moe import MoE, RoutingStats
from ..eval.bpb import summed_cross_entropy
from ..model.mtp import mtp_loss
from .mesh import PP_SCHEDULES, Parallel

def stages_per_rank(schedule: str) -> int:
    return PP_SCHEDULES[schedule][1]


def stage_ranks(pp: int, schedule: str) -> list[int]:
    """-> the pp rank holding each stage, as torch's schedules place them (mesh.PP_SCHEDULES)."""
    n = pp * stages_per_rank(schedule)
    if PP_SCHEDULES[schedule][2] == "v":
        return [s if s < pp else n - 1 - s for s in range(n)]
    return [s % pp for s in range(n)]


def layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """The main blocks split as evenly as they go, earlier stages taking the remainder. With more stages than
    blocks the later stages get none: the last still runs the final norm, the head and the MTP modules, one
    in between passes its hidden states on unchanged."""
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class _AddLoss(torch.autograd.Function):
    """Identity on h whose backward also starts `loss`'s backward (gradient 1): a stage's balance losses join
    the step's loss where they arise."""

    @staticmethod
    def forward(ctx, h, loss):
        ctx.loss_meta = (loss.dtype, loss.device)
        return h.clone()  # not a view: the split backward of zbv and dualpipev detaches stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        dtype, device = ctx.loss_meta
        return grad, torch.ones((), dtype=dtype, device=device)


class StepContext:
    """What a training step hands its stages besides the tensors: a RoutingStats per micro-batch, the MTP
    weight lambda of this step, alpha; and what the last stage hands back (each micro-batch's loss terms)."""

    def __init__(self):
        self.stats: list[RoutingStats] = []
        self.terms: list[dict] = []
        self.mtp_lambda, self.alpha = 0.0, 0.0


class Stage(nn.Module):
    """One pipeline stage: `layers` of the model (names kept), with the embedding on the first, and norm, head
    and MTP modules on the last (the token embeddings the MTP modules read arrive with the hidden states)."""

    def __init__(self, model: DeepSeekV3, layers: range, first: bool, last: bool, ctx: StepContext):
        super().__init__()
        self.first, self.last, self.ctx = first, last, ctx
        self.layer_ids = list(layers)
        object.__setattr__(self, "run_block", model._run)  # recomputation as the model does it (not a submodule)
        self.with_mtp = len(model.mtp) > 0  # the token embeddings travel with the hidden states
        if first:
            self.embed = model.embed
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.rope = model.rope
        if last:
            self.norm, self.head = model.norm, model.head
            self.mtp = nn.ModuleDict({str(k): m for k, m in enumerate(model.mtp)})
        self._moe_ids = {id(m) for m in self.modules() if isinstance(m, MoE)}

    def blocks(self, h: torch.Tensor, ids: torch.Tensor, stats: RoutingStats | None) -> torch.Tensor:
        freqs = self.rope(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers.values():
            h = self.run_block(layer, h, freqs, None, stats)
        return h

    def evaluate(self, x: torch.Tensor | None, ids: torch.Tensor, stats: RoutingStats | None) -> torch.Tensor:
        """Evaluation's pass through this stage (main model only): hidden states in and out, token ids in on
        the first, logits out on the last."""
        h = self.blocks(self.embed(ids) if self.first else x, ids, stats)
        return self.head(self.norm(h)) if self.last else h

    def balance_loss(self, stats: RoutingStats) -> torch.Tensor | None:
        mine = [loss for moe, loss in stats.losses.items() if id(moe) in self._moe_ids]
        return torch.stack(mine).sum() if mine else None

    def forward(self, x: torch.Tensor, *args: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                mb: torch.Tensor):
        """x: token ids on the first stage, else hidden states (B, T, D) (and args: the token embeddings, for
        the MTP modules). -> hidden states (and the embeddings), or on the last stage this micro-batch's loss."""
        ctx = self.ctx
        stats = ctx.stats[int(mb[0])]
        if self.first:
            emb = self.embed(ids)
            h = emb
        else:
            h, emb = x, (args[0] if args else None)
        h = self.blocks(h, ids, stats)
        if not self.last:
            bal = self.balance_loss(stats)
            if bal is not None:
                h = _AddLoss.apply(h, ctx.alpha * bal)
            elif not self.layer_ids and not self.first:
                h = h.clone()  # an empty stage passes its input on, as a tensor of its own (not a view)
            # (the split backward of zbv and dualpipev detaches stage outputs in place: no views of inputs)
            return (h, emb if self.first else emb.clone()) if self.with_mtp else h
        h = self.norm(h)
        main = F.cross_entropy(self.head(h).flatten(0, 1).float(), labels.flatten())
        loss, terms = main, {"loss": main.detach(), "mtp_loss": 0.0 if len(self.mtp) else None}
        if len(self.mtp):
            T, outs, hk = ids.shape[1], [], h
            for k, module in enumerate(self.mtp.values(), start=1):
                if T - k <= 0:
                    break
                freqs = self.rope(torch.arange(T - k, device=ids.device))
                hk = self.run_block(module, hk[:, :T - k], emb[:, k:], freqs, None, stats)
                outs.append(self.head(module.norm(hk)))
            if outs:
                l_mtp = mtp_loss(outs, ids, labels=labels)
                loss = loss + ctx.mtp_lambda * l_mtp
                terms["mtp_loss"] = l_mtp.detach()
        bal = self.balance_loss(stats)  # now with the MTP blocks' too
        if bal is not None:
            loss = loss + ctx.alpha * bal
        ctx.terms.append(terms)
        return loss


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a DeepSeekV3 or of a rank's StageModel: main layers, then MTP blocks."""
    layers = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    mtp = getattr(model, "mtp", ())
    mtp = mtp.values() if isinstance(mtp, nn.ModuleDict) else mtp
    return [*layers, *(m.block for m in mtp)]


class StageModel(nn.Module):
    """All the stages one rank holds, under the model's own names (embed, layers.N, norm, head, mtp.K): what
    the optimizer, FSDP, clipping and checkpoints see of the model on this rank."""

    def __init__(self, model: DeepSeekV3, stages: list[Stage]):
        super().__init__()
        self.config = model.config
        self.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})
        for name in ("embed", "norm", "head", "mtp"):
            for s in stages:
                if hasattr(s, name):
                    setattr(self, name, getattr(s, name))
                    break
        self.rope = model.rope
        object.__setattr__(self, "stages", stages)  # the stage modules themselves (not registered twice)


class Pipeline:
    """The stages of this rank, their torch PipelineStages and the schedule."""

    def __init__(self, model: DeepSeekV3, par: Parallel, n_microbatches: int, micro_batch: int, seq_len: int):
        layout = par.layout
        self.par, self.schedule_name = par, layout.pp_schedule
        self.group = par.pp_mesh.get_group()
        self.pp_rank, pp = par.pp_mesh.get_local_rank(), layout.pp
        owners = stage_ranks(pp, layout.pp_schedule)
        self.n_stages = len(owners)
        self.owners = owners
        ranges = layer_ranges(model.config.num_hidden_layers, self.n_stages)
        self.ctx = StepContext()
        self.stage_ids = [s for s in range(self.n_stages) if owners[s] == self.pp_rank]
        self.stages = [Stage(model, ranges[s], s == 0, s == self.n_stages - 1, self.ctx) for s in self.stage_ids]
        self.module = StageModel(model, self.stages)
        self.holds_first = 0 in self.stage_ids
        self.holds_last = self.n_stages - 1 in self.stage_ids
        self.n_microbatches, self.micro_batch, self.seq_len = n_microbatches, micro_batch, seq_len
        self.device = par.device
        self.schedule = None
        # DualPipeV: run each paired forward and backward side by side, where the collectives of the two stay
        # on separate groups (not with recompute, nor TP: see the module docstring)
        self.overlap = layout.pp_overlap and layout.tp == 1 and not model.recompute
        self.overlapped_pairs = 0  # in the last step
        if model.config.tie_word_embeddings:
            raise ValueError("pipeline parallelism (--pp) with tie_word_embeddings: the embedding (first stage) and "
                             "the head (last stage) would be two weights; train this model without --pp")

    def build_schedule(self) -> None:
        """After FSDP has wrapped the stages (the PipelineStages keep references to the modules)."""
        d, mb, T = self.model_dim, self.micro_batch, self.seq_len
        pstages = []
        for sid, stage in zip(self.stage_ids, self.stages):
            # the shapes of what travels between stages (hidden states, which take gradients), given so that
            # no shape inference runs a forward on the meta device
            hidden = tuple(torch.zeros(mb, T, d, device=self.device, requires_grad=True)
                           for _ in range(2 if self.stages[0].with_mtp else 1))
            example_in = (torch.zeros(mb, T, dtype=torch.long, device=self.device),) if sid == 0 else hidden
            example_out = ((torch.zeros((), device=self.device, requires_grad=True),)
                           if sid == self.n_stages - 1 else hidden)
            pstages.append(PipelineStage(stage, sid, self.n_stages, self.device, input_args=example_in,
                                         output_args=example_out, group=self.group))
        cls_name, per_rank, _ = PP_SCHEDULES[self.schedule_name]
        self.schedule = getattr(pipelining, cls_name)(pstages[0] if per_rank == 1 else pstages,  # single or multi
                                                      n_microbatches=self.n_microbatches, loss_fn=_stage_loss,
                                                      scale_grads=True)
        if self.schedule_name == "dualpipev" and self.overlap:
            def overlap(action, ctx):
                overlap_forward_backward(action, ctx, self.device)
                self.overlapped_pairs += 1
            self.schedule.register_custom_function(OVERLAP_F_B, overlap)

    @property
    def model_dim(self) -> int:
        return self.module.config.hidden_size

    def step(self, batch: torch.Tensor, balance_loss: str | None, mtp_lambda: float, alpha: float):
        """Forward and backward of this rank's micro-batches, all in `batch` (n_microbatches x micro_batch
        sequences of T + 1 tokens). -> (each micro-batch's RoutingStats, the last stage's terms or [])."""
        ctx = self.ctx
        ctx.stats = [RoutingStats(balance_loss) for _ in range(self.n_microbatches)]
        ctx.terms, ctx.mtp_lambda, ctx.alpha = [], mtp_lambda, alpha
        ids, labels = batch[:, :-1], batch[:, 1:]
        mb = torch.arange(self.n_microbatches, device=batch.device).repeat_interleave(self.micro_batch)
        args = (ids,) if self.holds_first else ()
        target = labels if self.holds_last else None
        self.overlapped_pairs = 0
        self.schedule.step(*args, target=target, return_outputs=False, ids=ids, labels=labels, mb=mb)
        return ctx.stats, ctx.terms

    @torch.no_grad()
    def evaluate_batch(self, batch: torch.Tensor, stats: RoutingStats | None) -> tuple[float, int]:
        """The summed next-token loss of `batch` (main head only) and its token count, every rank the same:
        the stages run in order, hidden states sent from rank to rank."""
        ids, labels = batch[:, :-1], batch[:, 1:]
        h = None
        result = torch.zeros(2, dtype=torch.float64, device=self.device)
        dtype = torch.float32  # the residual stream's dtype (float32 weights; autocast keeps it float32)
        for s in range(self.n_stages):
            owner, prev = self.owners[s], self.owners[s - 1] if s else None
            if owner == self.pp_rank:
                if s and prev != owner:
                    h = torch.empty(ids.shape[0], ids.shape[1], self.model_dim, device=ids.device, dtype=dtype)
                    dist.recv(h, group=self.group, group_src=prev)
                h = self.stages[self.stage_ids.index(s)].evaluate(h, ids, stats)
                if s == self.n_stages - 1:  # h: the logits
                    result[0], result[1] = summed_cross_entropy(h, labels)
            elif s and prev == self.pp_rank and owner != self.pp_rank:
                dist.send(h.contiguous(), group=self.group, group_dst=owner)
        dist.all_reduce(result, group=self.group)  # only the last stage's rank holds it
        return result[0].item(), int(result[1].item())


def overlap_forward_backward(action, ctx, device: torch.device) -> None:
    """The handler of DualPipeV's OVERLAP_F_B actions: the pair's backward (FULL_BACKWARD of one micro-batch on
    one stage) in a thread of its own, the forward (FORWARD of another on the other stage) in this one. Each
    does what the schedule's runtime does for that action alone (torch.distributed.pipelining's
    _PipelineScheduleRuntime: wait for its input, compute, hand the result to a stage on this rank)."""
    schedule = ctx.schedule_ref
    stages = {s.stage_index: s for s in schedule._stages}
    forward, backward = action.sub_actions
    failure = []
    modes = torch.utils._python_dispatch._get_current_dispatch_mode_stack()  # e.g. BF16 products in FP32

    def run_backward():
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # a new thread starts on device 0
            with contextlib.ExitStack() as stack:
                for mode in modes:
                    stack.enter_context(mode)
                _full_backward(schedule, stages, backward)
        except BaseException as e:  # re-raised in the schedule's thread
            failure.append(e)

    thread = threading.Thread(target=run_backward, name="dualpipev-backward")
    thread.start()
    try:
        _forward(schedule, stages, forward, ctx)
    finally:
        thread.join()
    if failure:
        raise failure[0]


def _forward(schedule, stages, action, ctx) -> None:
    sid, mb = action.stage_index, action.microbatch_index
    stage = stages[sid]
    schedule._assert_unsharded(stage)
    if not stage.is_first and sid - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((sid, mb)))
    output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=False)
    schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
    if sid + 1 in stages:  # the next stage is on this rank: no send
        stages[sid + 1].set_local_fwd_input(output, mb)


def _full_backward(schedule, stages, action) -> None:
    sid, mb = action.stage_index, action.microbatch_index
    stage = stages[sid]
    schedule._assert_unsharded(stage)
    if not stage.is_last and sid + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((sid, mb)))
    loss = schedule._maybe_get_loss(stage, mb)
    schedule.backward_counter[sid] += 1
    last = schedule.backward_counter[sid] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
    if sid - 1 in stages:  # the previous stage is on this rank: no send
        stages[sid - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


def _stage_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns its micro-batch's loss."""
    return output
