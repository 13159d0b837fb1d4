"""The ``levyattn`` command line. Thin: it parses, calls the library, prints.

Each subcommand lives in ``levyattn/cli/<name>.py`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``, and, when an interrupted run can be continued,
``after_interrupt(args) -> str`` (how to continue it, printed after Ctrl-C). Heavy imports happen
inside ``run`` so that ``levyattn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("demo", "train", "sweep", "analyze", "lens", "atlas", "translate", "generate", "convert")


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a misspelled choice or command (subparsers inherit it)."""

    def _check_value(self, action: argparse.Action, value: object) -> None:
        if action.choices is not None and value not in action.choices:
            from levyattn.config import did_you_mean

            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{did_you_mean(value, action.choices)} (choose from {choices})"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="levyattn", description="Fractional (Lévy) attention: models, analyses, the lens."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"levyattn.cli.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run, after_interrupt=getattr(module, "after_interrupt", None))
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (tests and callers may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_library_messages() -> None:
    """The library's INFO messages on stderr as ``levyattn: ...`` lines: the one-time build of the
    CPU kernel, progress lines when stderr is not a terminal."""
    logger = logging.getLogger("levyattn")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("levyattn: %(message)s"))
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from levyattn import __version__

        print(__version__)
        return 0
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    from levyattn._extras import MissingExtraError

    show_library_messages()
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, MissingExtraError) as err:
        print(f"levyattn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = args.after_interrupt(args) if args.after_interrupt else None
        print(f"levyattn {args.command}: interrupted" + (f"; {how}" if how else ""), file=sys.stderr)
        return 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


if __name__ == "__main__":
    sys.exit(main())
