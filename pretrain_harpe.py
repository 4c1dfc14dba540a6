"""Continual pretraining with HARPE (or a baseline position encoding) on megatron-core.

    # the CPU demo: 2 processes, a tiny HARPE model on an offline corpus
    torchrun --nproc-per-node 2 pretrain_harpe.py --config configs/demo_cpu.yaml

    # Llama2-7B to 128k (GPUs), with overrides of any config key
    torchrun --nproc-per-node 8 pretrain_harpe.py --config configs/llama2_7b_128k_harpe.yaml --checkpoint.pretrained ckpt/llama2-7b --train.lr 2e-5

    # check a config and print the parallel layout and step counts without training (with
    # --world-size: planning a job elsewhere, so missing data files are only a warning)
    python pretrain_harpe.py --config configs/llama2_7b_128k_harpe.yaml --dry-run --world-size 32

    # the resolved config (defaults filled in, per-head bases written out) as YAML
    python pretrain_harpe.py --config configs/demo_cpu.yaml --train.seed 7 --print-config

Quiet by default; --verbose shows third-party warnings, --debug tracebacks. Exit codes: 0 done,
2 a config or input error (one line, before any process group starts), 130 interrupted.
"""  # noqa: E501 - each example stays on one line in --help (tests/unit/test_cli_vocabulary.py)

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from megatron_harpe import cli
from megatron_harpe.config import Config, load_config


def config_keys_help(width: int = 100) -> str:
    """The epilog of --help: every config section and key with its type, default and documentation."""
    from megatron_harpe.config_reference import config_keys

    lines = ["config keys (YAML sections; override any as --section.key value; docs/config-reference.md):"]
    section = None
    for key in config_keys():
        name, _, leaf = key.key.rpartition(".")
        if name != section:
            section = name
            lines.append(f"  {section or '(top level)'}:")
        lines.append(f"    {leaf} ({key.type}, default {key.default})")
        if key.doc:
            lines += textwrap.wrap(key.doc, width, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)


class _ConfigKeysHelp(cli.HelpFormatter):
    """Builds the (long) config-key listing only when --help is printed."""

    def format_help(self) -> str:
        return super().format_help() + "\n" + config_keys_help() + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_ConfigKeysHelp)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; no training")
    parser.add_argument(
        "--world-size", type=int, default=None, help="with --dry-run: the number of processes to plan for"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML, overrides applied, bases written out) and exit",
    )
    cli.add_common_flags(parser)
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    return cli.parse_with_overrides(build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    # before CUDA starts: the allocator grows segments instead of fragmenting them (the planner's
    # fragmentation headroom assumes it; planner/engine_memory.py)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg: Config = load_config(args.config, overrides)
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        if args.print_config:
            import yaml

            cfg.validate(world_size=args.world_size, require_backend=False)
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        cfg.validate(world_size=world_size, require_backend=not args.dry_run)  # plan a GPU config anywhere
        planning = args.dry_run and args.world_size is not None  # for a job elsewhere: its data may be too
        try:
            from megatron_harpe.training.inputs import check_training_inputs

            check_training_inputs(cfg)
        except ValueError as missing:
            if not planning:
                raise
            print(f"warning: {missing} (a launch would stop here)", file=sys.stderr)
        if not args.dry_run:  # a precision this device cannot run stops here, in one line
            import torch

            from megatron_harpe.training.mixed_precision import training_precision

            training_precision(cfg.train, "cuda" if torch.cuda.is_available() else "cpu")
    except (ValueError, OSError) as error:
        return cli.report_user_error(error)  # once, by rank 0
    if args.dry_run:
        from megatron_harpe.planner.plan import describe_plan

        print(describe_plan(cfg, world_size))
        return 0
    from megatron_harpe.training.loop import train

    cli.note_missing_gpu_libraries()
    cli.on_interrupt(lambda: last_saved(cfg.checkpoint.save))
    train(cfg)
    return 0


def last_saved(save_dir: str | None) -> str:
    """What an interrupted run leaves behind, for the line printed on Ctrl-C."""
    if not save_dir:
        return "nothing saved (checkpoint.save is not set)"
    from megatron_harpe.checkpointing.checkpoint import find_latest_checkpoint

    latest = find_latest_checkpoint(save_dir)
    if latest is None:
        return f"no checkpoint in {save_dir} yet; the next launch starts from the beginning"
    return f"the last checkpoint is {latest}; the next launch resumes from it"


if __name__ == "__main__":
    sys.exit(cli.run(main))
