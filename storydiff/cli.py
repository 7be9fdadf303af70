"""The `storydiff` command line: `storydiff demo` runs the main job offline on the shipped checkpoints.

Arguments are checked before any work (and before torch is imported where possible), so a wrong device or output
folder costs a second, not a demo run. Errors are one line on stderr with exit code 2; Ctrl-C exits with 130.
"""

import argparse
import shlex
import sys

EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _version() -> str:
    from storydiff import __version__

    return f"storydiff {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storydiff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="generate comparison figures from the shipped checkpoints, offline",
        description="Generate comparison figures and tables from the shipped checkpoints, offline.",
    )
    demo.add_argument(
        "--output-dir",
        default="outputs",
        help="folder for the figures and tables, created if missing (default: outputs)",
    )
    demo.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    demo.add_argument(
        "--section",
        action="append",
        metavar="NAME",
        help="run only this section (repeat it or give a comma list; see --list); default: all sections",
    )
    demo.add_argument("--list", action="store_true", help="list the sections and exit")
    return parser


def _fail(message: str) -> int:
    print(f"storydiff: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _chosen_sections(section_arguments):
    """`--section a --section b,c` -> ["a", "b", "c"]; None when the flag was not given (all sections)."""
    if section_arguments is None:
        return None
    return [name.strip() for argument in section_arguments for name in argument.split(",") if name.strip()]


def run_demo_command(args) -> int:
    from storydiff import demo

    if args.list:
        for section in demo.DEMO_SECTIONS:
            print(f"{section.slug:<16} {section.title}")
        return 0
    try:
        sections = demo.select_sections(_chosen_sections(args.section))
        demo.check_device(args.device)
        demo.prepare_output_dir(args.output_dir)
    except ValueError as error:
        return _fail(str(error))
    try:
        demo.run_demo(args.output_dir, device=args.device, sections=[section.slug for section in sections])
    except demo.DemoInterrupted as interrupt:
        resume = (
            f"storydiff demo --section {','.join(interrupt.remaining)} --output-dir {shlex.quote(args.output_dir)}"
        )
        if args.device != "cpu":
            resume += f" --device {shlex.quote(args.device)}"
        print(
            f"\nstorydiff demo: interrupted; files already written are complete. To finish, run: {resume}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo_command(args)
    except KeyboardInterrupt:  # before or after the sections (imports, checks, the summary)
        print("\nstorydiff: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
