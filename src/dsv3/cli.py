"""`dsv3 <command>`: the command line. Each command is a small function over the library; argparse help
strings say what every option does."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="rewrite a model directory in another dtype, in FP8, resharded, or per rank",
        description="Load a DeepSeek-V3/V2 model directory and write it again: another dtype, FP8 with "
                    "128x128 block scales (--fp8), or other shard sizes. The whole model is held in memory; "
                    "for FP8 <-> BF16 on checkpoints larger than RAM use fp8-cast-bf16 / quantize-fp8, "
                    "which stream. With --model-parallel N: the official demo's per-rank layout instead, streamed "
                    "tensor by tensor, every tensor in its stored dtype.")
    p.add_argument("--input", required=True, help="model directory to read (config.json + *.safetensors)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", default=None,
                   help="dtype of the written weights: bfloat16 (default), float16, float32")
    p.add_argument("--fp8", action="store_true", help="write projections as FP8 e4m3 with block scales")
    p.add_argument("--scale-fmt", choices=["ue8m0"], default=None,
                   help="with --fp8: round scales up to powers of two (DeepSeek-V3.1's format)")
    p.add_argument("--max-shard-size", default=None, help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--model-parallel", type=int, default=None, metavar="N",
                   help="write the official DeepSeek-V3 demo's layout for N processes, model{i}-mp{N}.safetensors "
                        "for i < N (heads, vocabulary and the dense and shared MLPs split, routed experts divided; "
                        "MTP in model{i}-mp{N}-mtp.safetensors), plus model_args.json, the demo's --config. Read by "
                        "`torchrun --nproc-per-node N -m dsv3 generate|serve --tp N --ep N` (each rank reads only its "
                        "file), by one process, and by the demo's generate.py. Dtypes are kept: FP8 stays FP8, but "
                        "slices that would cut 128x128 blocks are written dequantised in float32, which the demo "
                        "cannot read (none for DeepSeek-V3 with N up to 16)")
    _add_overwrite(p)
    p.set_defaults(func=_convert)


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    """--overwrite, for the commands that write a model directory (ckpt/output.py)."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model in an output directory that dsv3 did not write (its other files, such "
                        "as an adapter, are kept); without it such a directory is refused. An output dsv3 wrote "
                        "is replaced whole either way, and a kill leaves the old model or the new one")


def _convert(args) -> None:
    from .ckpt.convert import convert, convert_model_parallel
    t0 = time.time()
    if args.model_parallel is None:
        convert(args.input, args.output, dtype=args.dtype or "bfloat16", fp8=args.fp8, scale_fmt=args.scale_fmt,
                max_shard_size=args.max_shard_size or "5GB", overwrite=args.overwrite)
        print(f"wrote {args.output} in {time.time() - t0:.1f}s")
        return
    given = [flag for flag, v in (("--dtype", args.dtype), ("--fp8", args.fp8), ("--scale-fmt", args.scale_fmt),
                                  ("--max-shard-size", args.max_shard_size)) if v]
    if given:
        raise ValueError(f"--model-parallel writes every tensor in its stored dtype, one file per rank: it does not "
                         f"take {', '.join(given)}; convert the dtype first (dsv3 convert --dtype, fp8-cast-bf16, "
                         "quantize-fp8), then split")
    n = args.model_parallel
    dequantised = convert_model_parallel(args.input, args.output, n, overwrite=args.overwrite)
    if dequantised:
        print(f"note: {len(dequantised)} FP8 weight(s) split into slices that cut their 128x128 scale blocks were "
              f"written dequantised, in float32 (e.g. {dequantised[0]}); dsv3 reads them, the official demo cannot",
              file=sys.stderr)
    files = f"model0-mp{n}.safetensors" + (f" .. model{n - 1}-mp{n}.safetensors" if n > 1 else "")
    print(f"wrote {args.output} ({files}) in {time.time() - t0:.1f}s")


def _add_fp8_cast(sub) -> None:
    p = sub.add_parser(
        "fp8-cast-bf16", help="dequantise an FP8 checkpoint to BF16 (streaming, CPU or GPU)",
        description="Turn an FP8 checkpoint (e4m3 weights with 128x128 weight_scale_inv blocks, as DeepSeek "
                    "releases them) into BF16, tensor by tensor. Unlike the official script it runs on CPU, "
                    "removes quantization_config from config.json and copies the tokenizer and other files.")
    p.add_argument("--input", "--input-fp8-hf-path", dest="input", required=True, help="FP8 model directory")
    p.add_argument("--output", "--output-bf16-hf-path", dest="output", required=True, help="directory to write")
    p.add_argument("--dtype", default="bfloat16", help="output dtype: bfloat16 (default) or float32")
    p.add_argument("--device", default=None, help="where to dequantise (default cpu; e.g. cuda)")
    _add_overwrite(p)
    p.set_defaults(func=_fp8_cast)


def _fp8_cast(args) -> None:
    from .ckpt.convert import fp8_cast
    t0 = time.time()
    fp8_cast(args.input, args.output, dtype=args.dtype, device=args.device, overwrite=args.overwrite)
    print(f"wrote {args.output} in {time.time() - t0:.1f}s")


def _add_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize-fp8", help="quantise a BF16/FP32 checkpoint to the official FP8 layout (streaming)",
        description="Quantise every attention and MLP projection to FP8 e4m3 with one float32 scale per "
                    "128x128 block (weight_scale_inv = amax / 448), leaving embeddings, head, norms, gate and "
                    "the MTP eh_proj in their dtype, as the official release.")
    p.add_argument("--input", required=True, help="BF16/FP32 model directory")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--scale-fmt", choices=["ue8m0"], default=None,
                   help="round scales up to powers of two (DeepSeek-V3.1's format)")
    p.add_argument("--device", default=None, help="where to quantise (default cpu; e.g. cuda)")
    _add_overwrite(p)
    p.set_defaults(func=_quantize)


def _quantize(args) -> None:
    from .ckpt.convert import quantize_fp8
    t0 = time.time()
    quantize_fp8(args.input, args.output, scale_fmt=args.scale_fmt, device=args.device, overwrite=args.overwrite)
    print(f"wrote {args.output} in {time.time() - t0:.1f}s")


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="chat with a model or complete a file of prompts",
        description="Generate from a model directory with the latent-cache engine. --interactive: a multi-turn "
                    "chat (the model's chat template; /clear forgets the history, /exit or Ctrl-D quits), tokens "
                    "printed as they come. --input-file: one prompt per line, completions printed in order. "
                    "--prompt: one prompt.")
    p.add_argument("--model", required=True, help="model directory (config.json, *.safetensors, tokenizer.json)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--interactive", "-i", action="store_true", help="chat in the terminal")
    mode.add_argument("--input-file", help="a text file with one prompt per line")
    mode.add_argument("--prompt", help="a single prompt")
    p.add_argument("--output-file", help="also write one JSON object per prompt here (prompt, text, token_ids, "
                                         "finish_reason)")
    p.add_argument("--raw", action="store_true",
                   help="batch prompts are plain text to continue, not user messages put through the chat template")
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default 0.6, as DeepSeek suggests)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: all)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per reply (default 256)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of each token the reply already holds, in [-2, 2] (default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted once per time the reply already holds the token, in [-2, 2] (default 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages the tokens of prompt and reply (their positive logits divided by it, "
                        "negative ones multiplied; default 1: off)")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="no end of sequence (and no stop) before this many tokens of a reply (default 0)")
    _add_engine_args(p)
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + reply (default: the config's)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (default 16)")
    p.set_defaults(func=_generate)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine options `generate` and `serve` share (device, dtype, speculation, CUDA graphs)."""
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="draft with the model's MTP module and verify (identical greedy output, faster)")
    p.add_argument("--num-speculative-tokens", type=int, default=1, metavar="K",
                   help="with --speculative mtp: positions drafted per step, the MTP module chained on its own "
                        "output K-1 times (default 1; 2-3 pay when its drafts are mostly right)")
    p.add_argument("--speculative-topk", type=int, default=None, metavar="K",
                   help="with --speculative mtp and one drafted position: greedy requests verify the MTP module's K "
                        "likeliest next tokens at once (default: 1 or 2, adapting to how often its second guess "
                        "is the right one)")
    p.add_argument("--speculative-policy", choices=["adaptive", "always"], default="adaptive",
                   help="with --speculative mtp: 'adaptive' (default) measures drafting and plain steps as it runs "
                        "and drafts only while drafting gives more tokens per second, per batch size; 'always' "
                        "drafts every step")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the cache's full blocks after a request ends and start requests that begin with the "
                        "same tokens from them (a chat's next turn, a shared system prompt); default on")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="prompt tokens one prefill step computes at most; longer prompts are prefilled in chunks, "
                        "which bounds activation and attention-mask memory (default 2048 on CPU, 8192 on GPU)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run the plain PyTorch reference: on a GPU every decode step eagerly instead of replaying "
                        "captured CUDA graphs, on a CPU plain matrix products instead of the layouts timed fastest "
                        "on this machine")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the checkpoint's)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="under torchrun with N processes: split attention heads, dense MLPs, shared experts and the "
                        "vocabulary over them (tensor parallel; each loads only its slices)")
    p.add_argument("--ep", type=int, default=1, metavar="N",
                   help="under torchrun with N processes: give each 1/N of the routed experts (expert parallel); "
                        "with --tp N as well, the official demo's layout. Rank 0 schedules, samples, prints and "
                        "serves; the others follow its steps")
    p.add_argument("--num-redundant-experts", type=int, default=0, metavar="R",
                   help="with --ep N: R more expert slots (a multiple of N) holding replicas of the most loaded "
                        "experts, placed by DeepSeek's EPLB; a token's pair goes to one of its expert's replicas")
    p.add_argument("--expert-loads", default=None, metavar="FILE",
                   help="with --ep N: the expected expert loads to place by: a dsv3 train run's metrics.jsonl (its "
                        "last 10%% of steps), or a JSON list of per-layer loads (default: equal loads)")
    p.add_argument("--eplb-interval", type=int, default=None, metavar="STEPS",
                   help="with --ep N: re-place the experts by the loads served so far every STEPS engine steps "
                        "(default: never; the placement stays the initial one)")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _engine(args, **kwargs):
    """The LLM those options describe (kwargs: the command's own, such as kv_cache_tokens). Under torchrun with
    --tp/--ep: rank 0's engine, whose steps the other ranks follow; None on those ranks, once rank 0 is done."""
    from .infer import LLM

    common = dict(speculative=args.speculative, speculative_topk=args.speculative_topk,
                  num_speculative_tokens=args.num_speculative_tokens, speculative_policy=args.speculative_policy,
                  max_model_len=args.max_model_len, enable_prefix_caching=args.enable_prefix_caching,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_batch_size,
                  seed=args.seed, **kwargs)
    if args.tp > 1 or args.ep > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .parallel.inference import model_parallel_llm

        return model_parallel_llm(args.model, args.tp, args.ep, dtype=args.dtype, device=args.device,
                                  num_redundant_experts=args.num_redundant_experts, expert_loads=args.expert_loads,
                                  eplb_interval=args.eplb_interval, **common)
    if args.num_redundant_experts or args.expert_loads or args.eplb_interval:
        raise ValueError("--num-redundant-experts, --expert-loads and --eplb-interval place experts over the "
                         "processes of --ep N (under torchrun)")
    return LLM(args.model, dtype=args.dtype, device=_device(args), cuda_graphs=False if args.enforce_eager else None,
               cpu_kernels=False if args.enforce_eager else None, **common)


def _stop_workers(llm) -> None:
    from .parallel.inference import stop_workers

    stop_workers(llm)


def _generate(args) -> None:
    llm = _engine(args)
    if llm is None:  # a model-parallel rank other than 0: it followed rank 0's steps until rank 0 was done
        return
    try:
        _generate_with(args, llm)
    finally:
        _stop_workers(llm)


def _generate_with(args, llm) -> None:
    import json

    from .infer import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens)
    tok = llm.tokenizer
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer.json; `dsv3 generate` needs one")
    if args.interactive:
        _chat(llm, params)
        return
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        with open(args.input_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"{args.input_file} has no prompts (one per line)")
    chat = not args.raw and tok.chat_template is not None
    inputs = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True) if chat else p
              for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params)
    dt = time.perf_counter() - t0
    for prompt, out in zip(prompts, outs):
        print(f"Prompt: {prompt}\nCompletion: {out.text}\n")
    n = sum(len(o.token_ids) for o in outs)
    stats = llm.stats
    extra = (f", {stats['acceptance_rate']:.0%} of MTP drafts accepted, {stats['tokens_per_forward']:.2f} tokens "
             "per forward") if args.speculative else ""
    print(f"[{len(outs)} prompts, {n} tokens in {dt:.1f}s: {n / dt:.1f} tokens/s{extra}]", file=sys.stderr)
    balance = getattr(llm.runner, "expert_balance", lambda: None)()
    if balance is not None:  # expert parallel: what each rank's experts computed
        print(f"[expert load per rank, max / mean over {len(balance['pairs_per_rank'][0])} ranks: "
              f"{balance['max_over_mean']:.3f} (mean over the MoE layers that ran; "
              f"{balance['slots']} slots for {balance['experts']} experts); per layer: "
              f"[{', '.join(f'{r:.3f}' for r in balance['max_over_mean_layers'])}]]", file=sys.stderr)
    if args.output_file:
        from .ckpt.io import atomic_write_text
        atomic_write_text(args.output_file, "".join(
            json.dumps({"prompt": p, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason},
                       ensure_ascii=False) + "\n" for p, o in zip(prompts, outs)))


def _chat(llm, params) -> None:
    """A multi-turn chat: the history goes through the chat template each turn; replies stream."""
    tok = llm.tokenizer
    if tok.chat_template is None:
        raise ValueError("this tokenizer has no chat template; use --input-file or --prompt with --raw")
    messages: list[dict] = []
    print("Chat with the model. /clear forgets the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/clear":
            messages.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            rid = llm.add_request(tok.apply_chat_template(messages, tokenize=True), params)
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            messages.pop()
            print(f"error: {e} (use /clear to start over)", file=sys.stderr)
            continue
        finished = False
        while not finished:
            for out in llm.step():
                if out.request_id == rid:
                    print(out.new_text, end="", flush=True)
                    finished = out.finished
        reply = llm.release(rid)
        print()
        messages.append({"role": "assistant", "content": reply.text})


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model directory with the OpenAI API (/v1/chat/completions, /v1/completions, "
                    "/v1/models; /health, /metrics) and continuous batching: requests join and leave the running "
                    "batch between engine steps; the cache budget decides how many run at once, at most "
                    "--max-queue sequences (prompts x n) wait, and a request that does not fit gets a 429 (its room "
                    "is then held for its retry, so that no stream of smaller requests keeps it out). The model runs "
                    "once before the server starts: one that cannot run is refused.")
    p.add_argument("--model", required=True, help="model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSV3_API_KEY, else none)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default on CPU: all cores but one, which the HTTP event loop "
                        "needs; an OpenMP thread that loses its core stalls every step)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model directory's name)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences (each prompt x n choices of a request counts) that may wait for a slot, not yet "
                        "started (a sequence counts once: waiting, running, or preempted, which resumes first); a "
                        "request whose sequences do not fit beside those waiting gets a 429 with Retry-After: 1, "
                        "one larger than the whole queue a 400 (default 256). Fair to large requests: the room of "
                        "the largest refused one is held (smaller requests that would take it get 429) until it "
                        "is admitted, or for 30 s after its last retry")
    p.add_argument("--max-seqs-per-request", type=int, default=64, metavar="N",
                   help="the most sequences (prompts x n) one request may hold, so that one client cannot take the "
                        "whole queue; more is a 400 (default 64)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + reply (default: the config's)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="latent cache size in token positions over all requests (default: GPU 90%% of free "
                        "memory; CPU max-batch-size full contexts, capped at 4 GiB)")
    _add_engine_args(p)
    p.add_argument("--seed", type=int, default=None, help="seed of requests that bring none")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default info)")
    p.set_defaults(func=_serve)


def _serve(args) -> None:
    import torch

    if args.threads or _device(args) == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    llm = _engine(args, kv_cache_tokens=args.kv_cache_tokens)
    if llm is None:  # a model-parallel rank other than 0: it followed rank 0's steps until the server stopped
        return
    try:
        _serve_with(args, llm)
    finally:
        _stop_workers(llm)


def _serve_with(args, llm) -> None:
    import uvicorn

    from .serve import create_app

    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(llm, name, api_key=args.api_key, max_queue=args.max_queue,
                     max_seqs_per_request=args.max_seqs_per_request)
    cache = llm.cache.capacity
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 ({llm.model.device}, {llm.model.dtype}; up to "
          f"{args.max_batch_size} requests at once, cache {cache} tokens, context {llm.max_model_len}"
          f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _add_bench(sub) -> None:
    from .bench import __doc__ as doc, add_args
    p = sub.add_parser("bench", help="measure the engine's latency or throughput on a model directory",
                       description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    _add_engine_args(p)
    p.set_defaults(func=_bench)


def _bench(args) -> None:
    from .bench import run
    run(args, _engine)


def _add_train(sub) -> None:
    from .train.train import __doc__ as doc, add_args
    p = sub.add_parser("train", help="pretrain with the V3 recipe (resumable)", description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=_train)


def _train(args) -> None:
    from .train.train import main as train_main
    train_main(args)


def _add_post_training(sub) -> None:
    """sft, distill, grpo (train/) and tasks (data/tasks.py): each module's add_args and main."""
    for name, module, help_ in (
            ("sft", "sft", "supervised fine-tuning on chat records or a built-in task (resumable)"),
            ("distill", "distill", "a teacher answers prompts; the verified answers become SFT records"),
            ("grpo", "grpo", "GRPO with rule-based rewards, rollouts by dsv3's engine (resumable)"),
            ("tasks", None, "write a built-in task's prompts or SFT records as JSONL")):
        if module is None:
            from .data import tasks as mod
        else:
            import importlib
            mod = importlib.import_module(f".train.{module}", __package__)
        p = sub.add_parser(name, help=help_, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.set_defaults(func=lambda args, main=mod.main: main(args))


def _add_experiment(sub) -> None:
    from .train import experiment, fp8_experiment
    p = sub.add_parser("experiment", help="small-scale experiments from the papers (balance, fp8)",
                       description="Small-scale experiments from the DeepSeek-V3 report and its papers: "
                                   "'balance' (aux-free balancing) and 'fp8' (FP8 mixed-precision training).")
    names = p.add_subparsers(dest="name", required=True, metavar="{balance,fp8}")
    for name, module, help_ in (("balance", experiment, "aux-free vs aux-loss vs none"),
                                ("fp8", fp8_experiment, "FP8 vs BF16 vs FP32 training, per-op fidelity, studies")):
        q = names.add_parser(name, help=help_, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(q)
        q.set_defaults(func=_experiment)


def _experiment(args) -> None:
    if args.name == "fp8":
        from .train.fp8_experiment import main as experiment_main
    else:
        from .train.experiment import main as experiment_main
    experiment_main(args)


def _add_eval(sub) -> None:
    from .eval.bpb import __doc__ as bpb_doc, add_args as add_bpb_args
    from .eval import mc, niah, positions
    p = sub.add_parser("eval", help="evaluate a model (bpb, niah, passkey, mc, loss-by-position)",
                       description="Evaluations of a model directory (--model) or a running server (--server), each "
                                   "writing its metrics (lm-eval's names) as JSON to --output or standard output.")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    raw = argparse.RawDescriptionHelpFormatter
    bpb = tasks.add_parser("bpb", help="bits per byte on a text corpus (lm-eval's rolling windows)",
                           description=bpb_doc, formatter_class=raw)
    add_bpb_args(bpb)
    bpb.set_defaults(func=_eval_bpb)
    for name, help_ in (("niah", "needle in a haystack: exact retrieval at each length and depth, heatmap"),
                        ("passkey", "passkey retrieval (filler text), exact and ranked among candidates")):
        t = tasks.add_parser(name, help=help_, description=niah.__doc__, formatter_class=raw)
        niah.add_args(t, name)
        t.set_defaults(func=lambda a, name=name: niah.main(a, name))
    t = tasks.add_parser("mc", help="multiple choice by log-likelihood (acc, acc_norm)", description=mc.__doc__,
                         formatter_class=raw)
    mc.add_args(t)
    t.set_defaults(func=mc.main)
    t = tasks.add_parser("loss-by-position", help="next-token loss against position in the window, plot",
                         description=positions.__doc__, formatter_class=raw)
    positions.add_args(t)
    t.set_defaults(func=positions.main)


def _eval_bpb(args) -> None:
    from .eval.bpb import main as bpb_main
    bpb_main(args)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="write a run's PNG plots (loss, MaxVio, expert loads)",
                       description="Draw loss.png, maxvio.png and expert_load.png into a run directory from its "
                                   "metrics.jsonl (needs matplotlib: pip install 'dsv3[plot]').")
    p.add_argument("run_dir", help="a directory written by dsv3 train")
    p.set_defaults(func=_plot)


def _plot(args) -> None:
    from .train.metrics import plot_run
    for path in plot_run(args.run_dir):
        print(path)


def _add_plan(sub) -> None:
    from .parallel.plan import __doc__ as doc, add_args
    p = sub.add_parser("plan", help="size DeepSeek-V3 training on many GPUs: memory per GPU, all-to-all, pipeline "
                                    "bubble (a fake process group, the model on the meta device)",
                       description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=_plan)


def _plan(args) -> None:
    from .parallel.plan import main as plan_main
    plan_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3", description="DeepSeek-V3 in readable, fast PyTorch: model, checkpoints, tools.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dsv3 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train(sub)
    _add_post_training(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_bench(sub)
    _add_plot(sub)
    _add_experiment(sub)
    _add_eval(sub)
    _add_convert(sub)
    _add_fp8_cast(sub)
    _add_quantize(sub)
    _add_plan(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .ckpt.io import CheckpointError
    try:
        args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
