"""`dsv3 <command>`: the command line. Each command is a small function over the library; argparse help
strings say what every option does."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="rewrite a model directory in another dtype, in FP8, or resharded",
        description="Load a DeepSeek-V3/V2 model directory and write it again: another dtype, FP8 with "
                    "128x128 block scales (--fp8), or other shard sizes. The whole model is held in memory; "
                    "for FP8 <-> BF16 on checkpoints larger than RAM use fp8-cast-bf16 / quantize-fp8, "
                    "which stream.")
    p.add_argument("--input", required=True, help="model directory to read (config.json + *.safetensors)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the written weights: bfloat16, float16, float32")
    p.add_argument("--fp8", action="store_true", help="write projections as FP8 e4m3 with block scales")
    p.add_argument("--scale-fmt", choices=["ue8m0"], default=None,
                   help="with --fp8: round scales up to powers of two (DeepSeek-V3.1's format)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    p.set_defaults(func=_convert)


def _convert(args) -> None:
    from .ckpt.pretrained import TOKENIZER_FILES, copy_files, load_pretrained, save_pretrained
    t0 = time.time()
    model = load_pretrained(args.input, dtype=args.dtype)
    save_pretrained(model, args.output, dtype=args.dtype, fp8=args.fp8, scale_fmt=args.scale_fmt,
                    max_shard_size=args.max_shard_size)
    copy_files(args.input, args.output, [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(args.input, f))])
    print(f"wrote {args.output} in {time.time() - t0:.1f}s")


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
    p.set_defaults(func=_fp8_cast)


def _fp8_cast(args) -> None:
    from .ckpt.convert import fp8_cast
    t0 = time.time()
    fp8_cast(args.input, args.output, dtype=args.dtype, device=args.device)
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
    p.set_defaults(func=_quantize)


def _quantize(args) -> None:
    from .ckpt.convert import quantize_fp8
    t0 = time.time()
    quantize_fp8(args.input, args.output, scale_fmt=args.scale_fmt, device=args.device)
    print(f"wrote {args.output} in {time.time() - t0:.1f}s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3", description="DeepSeek-V3 in readable, fast PyTorch: model, checkpoints, tools.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dsv3 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_convert(sub)
    _add_fp8_cast(sub)
    _add_quantize(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .ckpt.io import CheckpointError
    try:
        args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
