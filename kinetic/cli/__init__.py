"""The ``kinetic`` command: one subcommand per job.

* ``kinetic params CONFIG.json|CHECKPOINT_DIR|PRESET`` — parameter counts (total / active / MTP) and
  the layer mix of a config, computed arithmetically, so it works for 120B models on a laptop.
* ``kinetic demo --out DIR`` — build a random model from a preset, save it, reload it, check the
  reloaded logits are bit-identical, and generate a few tokens greedily.
* ``kinetic pretrain --config configs/X.toml [--resume] [--set section.key=value ...]`` — train;
  under ``torchrun --nproc-per-node N`` it runs data-parallel.
* ``kinetic data ...``, ``kinetic tokenizer train`` — corpora and tokenizer (kinetic.cli.data).
* ``kinetic eval``, ``kinetic generate``, ``kinetic chat``, ``kinetic serve`` — evaluation and
  inference (kinetic.eval, kinetic.infer).

Mistakes a user can make (a bad path, an unknown preset, an invalid config) print one line to stderr
and exit with code 2; a failed self-check exits with 1. Every ``--help`` shows each flag's default;
``kinetic --version`` prints the version. ``demo`` also writes ``summary.json``
(versions, commit, tokens, timings) next to the checkpoint so a run can be reproduced from it.

One module per command family, each adding its subcommands with ``register(sub)``:
:mod:`~kinetic.cli.model` (params, demo), :mod:`~kinetic.cli.train` (pretrain), :mod:`~kinetic.cli.eval`
(eval), :mod:`~kinetic.cli.posttrain` (sft), :mod:`~kinetic.cli.infer` (generate, chat, serve),
:mod:`~kinetic.cli.data` (data, tokenizer).
Library code never imports this package: the commands turn its ValueErrors into :class:`UserError`.
"""

from __future__ import annotations

import argparse
import copy
import sys

import kinetic
from kinetic.cli import data, infer, model, posttrain, train
from kinetic.cli import eval as evaluation
from kinetic.errors import UserError

__all__ = ["UserError", "build_parser", "main"]


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to each option's help, also to options without help text; skips
    defaults that say nothing (None, False, empty lists) and help that already names its default."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if self._shows_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        silent = default is None or default is False or default == [] or default == argparse.SUPPRESS
        return bool(action.option_strings) and not silent and action.help is not argparse.SUPPRESS


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kinetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"kinetic {kinetic.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for family in (model, train, posttrain, evaluation, infer, data):  # the order of `kinetic --help`
        family.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns 0 on success, raises SystemExit(code) on failure."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (UserError, OSError) as err:  # OSError: unwritable --out, full disk, ...
        print(f"kinetic {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if code:
        raise SystemExit(code)
    return 0
