"""The `storydiff` command line: `storydiff demo` runs the main job offline on the shipped checkpoints."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="storydiff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate comparison figures from the shipped checkpoints, offline")
    demo.add_argument("--output-dir", default="outputs", help="where the figures and tables go (default: outputs)")
    demo.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from storydiff.demo import run_demo

        run_demo(output_dir=args.output_dir, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
