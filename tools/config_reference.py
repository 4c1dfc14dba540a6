"""Write docs/config-reference.md: every config section and key with its type, default and
documentation, generated from the config dataclasses (megatron_harpe/config_reference.py).

    python tools/config_reference.py            # regenerate docs/config-reference.md
    python tools/config_reference.py --check    # exit 1 if the committed file is stale
    python tools/config_reference.py --output -  # print it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output",
        default=str(REPO / "docs" / "config-reference.md"),
        help="where to write the reference ('-': standard output; default docs/config-reference.md)",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if --output differs from a fresh rendering"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_harpe.config_reference import render_markdown

    text = render_markdown()
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    target = Path(args.output)
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current != text:
            print(f"{target} is stale: regenerate it with `python tools/config_reference.py`", file=sys.stderr)
            return 1
        return 0
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
