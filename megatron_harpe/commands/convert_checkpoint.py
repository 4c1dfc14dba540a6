"""Convert between Hugging Face Llama checkpoints and megatron_harpe checkpoints, and verify.

    # HF -> megatron, training with the paper's HARPE bases (position from YAML and/or overrides)
    harpe-convert hf-to-megatron --input llama2-7b-hf --output ckpt/llama2-7b --config configs/llama2_7b_128k_harpe.yaml --tensor-parallel 4
    harpe-convert hf-to-megatron --input tiny-hf --output ckpt/tiny --position.type harpe --position.strategy uniform --position.base_min 1e4 --position.base_max 1e5 --verify

    # a GGUF file (llama.cpp quantized) -> megatron: dequantized to fp32 by transformers first
    harpe-convert hf-to-megatron --input models/ --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --output ckpt/smollm2

    # megatron (any TP/CP layout) -> HF; HARPE exports load with trust_remote_code=True
    harpe-convert megatron-to-hf --input runs/demo_cpu/checkpoints --output runs/demo_cpu/hf --verify

    # another vocabulary size, deliberately (added rows initialised as megatron does): then train from it
    harpe-convert resize-vocab --input ckpt/llama2-7b --output ckpt/llama2-7b-v32256 --vocab-size 32256

    # compare logits and greedy continuations of a checkpoint and an HF model
    harpe-convert verify --megatron runs/demo_cpu/checkpoints --hf runs/demo_cpu/hf

(`python tools/convert_checkpoint.py` is the same command.) Runs as one process (no torchrun):
checkpoints are loaded at TP=1 whatever their layout.
Exit codes: 0 ok, 1 verification failed, 2 bad input (nothing written).
"""  # noqa: E501 - each example stays on one line in --help (tests/unit/test_cli_vocabulary.py)

from __future__ import annotations

import argparse
import sys

from megatron_harpe import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for(__doc__)
    cli.add_common_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    to_megatron = commands.add_parser("hf-to-megatron", help="HF Llama dir -> megatron_harpe checkpoint")
    to_megatron.add_argument("--input", required=True, help="HF model directory (config.json + shards, or a GGUF file)")
    to_megatron.add_argument("--gguf-file", help="convert this GGUF file inside --input (dequantized by transformers)")
    to_megatron.add_argument("--output", required=True, help="new checkpoint directory (must not exist or be empty)")
    to_megatron.add_argument("--config", help="YAML run config: its position block (and the rest) is saved along")
    cli.add_parallel(
        to_megatron, tensor="tensor-parallel size to train with (checked, recorded)", context=None, default=None
    )
    cli.add_dtype(to_megatron, help="weight dtype (default: the source's)")
    to_megatron.add_argument("--verify", action="store_true", help="compare with the source afterwards")
    to_megatron.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN/inf anyway")

    to_hf = commands.add_parser("megatron-to-hf", help="megatron_harpe checkpoint -> HF model dir")
    to_hf.add_argument("--input", required=True, help="checkpoint save dir (latest iteration) or an iter_* dir")
    to_hf.add_argument("--output", required=True, help="new HF directory (must not exist or be empty)")
    cli.add_dtype(to_hf, help="weight dtype (default: the HF source's, else the checkpoint's)")
    cli.add_tokenizer(to_hf, help="copied into the export (default: the checkpoint's HF source's)")
    to_hf.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard")
    to_hf.add_argument("--verify", action="store_true", help="load the export and compare afterwards")
    to_hf.add_argument("--allow-nonfinite", action="store_true", help="export weights holding NaN/inf anyway")

    resize = commands.add_parser("resize-vocab", help="copy a megatron_harpe checkpoint with another vocabulary size")
    resize.add_argument("--input", required=True, help="checkpoint save dir (latest iteration) or an iter_* dir")
    resize.add_argument("--output", required=True, help="new checkpoint directory (must not exist or be empty)")
    resize.add_argument("--vocab-size", type=int, required=True, help="rows of the new embedding (and output layer)")
    resize.add_argument("--seed", type=int, default=1234, help="seed of the added rows' initialisation")

    verify = commands.add_parser("verify", help="compare a megatron checkpoint and an HF model")
    verify.add_argument("--megatron", required=True, help="checkpoint save dir or iter_* dir")
    verify.add_argument("--hf", required=True, help="HF model directory")
    for command in (to_megatron, to_hf, resize):
        cli.add_overwrite(command, "an earlier model or checkpoint in --output")
    for command in (to_megatron, to_hf):
        cli.add_progress(command)
    for command in (to_megatron, to_hf, verify):
        command.add_argument("--prompt-length", type=int, default=32, help="verify: tokens compared")
        command.add_argument("--new-tokens", type=int, default=8, help="verify: greedy tokens compared")
        command.add_argument("--tolerance", type=float, default=1e-3, help="verify: largest logit difference allowed")
    return parser


def _verify(megatron: str, hf: str, args: argparse.Namespace, hf_config=None) -> int:
    from megatron_harpe.convert.verify import verify_conversion

    report = verify_conversion(
        megatron, hf, hf_config=hf_config, prompt_length=args.prompt_length, new_tokens=args.new_tokens
    )
    print(f"verify: {report.summary()}")
    if report.ok(args.tolerance):
        print(f"verify: OK (tolerance {args.tolerance:g})")
        return 0
    print(f"verify: FAILED (tolerance {args.tolerance:g})", file=sys.stderr)
    return 1


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.command == "hf-to-megatron" and args.gguf_file:
        from pathlib import Path

        from megatron_harpe.convert.gguf_source import gguf_as_hf_directory
        from megatron_harpe.convert.hf_files import check_output_directory

        check_output_directory(args.output, args.overwrite)
        with gguf_as_hf_directory(
            args.input, args.gguf_file, work_parent=Path(args.output).absolute().parent
        ) as hf_dir:
            args.source_name = str((Path(args.input) / args.gguf_file).resolve())
            args.input, args.gguf_file = str(hf_dir), None
            return run(args, overrides)
    if args.command == "hf-to-megatron":
        from megatron_harpe.convert.hf_config import hf_config_for
        from megatron_harpe.convert.hf_to_megatron import convert_hf_to_megatron
        from megatron_harpe.convert.megatron_side import read_checkpoint_spec

        convert_hf_to_megatron(
            args.input,
            args.output,
            config_path=args.config,
            overrides=overrides,
            tensor_parallel=args.tensor_parallel,
            dtype=cli.torch_dtype(args.dtype),
            source_name=getattr(args, "source_name", None),
            allow_nonfinite=args.allow_nonfinite,
            overwrite=args.overwrite,
            progress=cli.show_progress(args.no_progress),
        )
        print(f"wrote megatron checkpoint {args.output} (start training from it with checkpoint.pretrained)")
        if args.verify:
            spec = read_checkpoint_spec(args.output)  # the source's weights under the new position encoding
            return _verify(args.output, args.input, args, hf_config_for(spec.model, spec.position))
        return 0
    if overrides:
        raise ValueError(f"config overrides ({' '.join(overrides)}) only apply to hf-to-megatron")
    if args.command == "resize-vocab":
        from megatron_harpe.convert.resize_vocab import resize_vocabulary

        resize_vocabulary(args.input, args.output, args.vocab_size, seed=args.seed, overwrite=args.overwrite)
        print(
            f"wrote megatron checkpoint {args.output} with a vocabulary of {args.vocab_size} (start training from it "
            "with checkpoint.pretrained and the same model.vocab_size)"
        )
        return 0
    if args.command == "megatron-to-hf":
        from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf

        exported = convert_megatron_to_hf(
            args.input,
            args.output,
            dtype=cli.torch_dtype(args.dtype),
            tokenizer=args.tokenizer,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            allow_nonfinite=args.allow_nonfinite,
            overwrite=args.overwrite,
            progress=cli.show_progress(args.no_progress),
        )
        print(f"wrote Hugging Face model {args.output} (from {exported})")
        return (
            _verify(str(exported), args.output, args) if args.verify else 0
        )  # the iteration exported, not a newer one
    return _verify(args.megatron, args.hf, args)


def main(argv: list[str] | None = None) -> int:
    args, overrides = cli.parse_with_overrides(build_parser(), sys.argv[1:] if argv is None else argv)
    try:
        return run(args, overrides)
    except (ValueError, FileNotFoundError) as error:
        return cli.report_user_error(error)


def entry_point() -> int:
    """The console script: main() behind megatron_harpe.cli's front door."""
    return cli.run(main, gpu_note=True)


if __name__ == "__main__":
    sys.exit(entry_point())
