"""Continual pretraining with HARPE (or a baseline position encoding) on megatron-core.

    # the CPU demo: 2 processes, a tiny HARPE model on an offline corpus
    torchrun --nproc-per-node 2 pretrain_harpe.py --config configs/demo_cpu.yaml

    # Llama2-7B to 128k (GPUs), with overrides of any config key
    torchrun --nproc-per-node 8 pretrain_harpe.py --config configs/llama2_7b_128k_harpe.yaml \\
        --checkpoint.pretrained ckpt/llama2-7b --train.lr 2e-5

    # check a config and print the parallel layout and step counts without training
    python pretrain_harpe.py --config configs/llama2_7b_128k_harpe.yaml --dry-run --world-size 32
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_harpe.config import Config, load_config, parse_overrides


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; no training")
    parser.add_argument(
        "--world-size", type=int, default=None, help="with --dry-run: the number of processes to plan for"
    )
    args, rest = parser.parse_known_args(argv)
    try:
        return args, parse_overrides(rest)
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg: Config = load_config(args.config, overrides)
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world_size=world_size, require_backend=not args.dry_run)  # plan a GPU config anywhere
    except ValueError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        from megatron_harpe.training.plan import describe_plan

        print(describe_plan(cfg, world_size))
        return 0
    from megatron_harpe.training.loop import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
