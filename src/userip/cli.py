"""The ``userip`` command line: one subcommand per pipeline stage.

Each stage module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are imported lazily so that
``userip --help`` is fast and a stage's heavy imports are paid only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Fixed registry (never built from user input): subcommand -> (module, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("userip.data.cli", "load a source, filter, label, split; write Parquet tables + manifest"),
    "profile": (
        "userip.profile.cli",
        "infer latent profiles with a frozen LLM, quantize them, write the bank",
    ),
    "train": (
        "userip.ctr.cli",
        "train a CTR model (optionally with profile-ID fields) and report AUC/Logloss",
    ),
    "serve": ("userip.serving.cli", "serve CTR scores over HTTP (feature bank + CTR model, no LLM)"),
    "run": ("userip.pipeline.cli", "the whole pipeline on the embedded default (synthetic data, offline LM)"),
    "experiment": (
        "userip.pipeline.experiment_cli",
        "the paper's tables and figures over seeds, from a config",
    ),
    "explain": ("userip.evaluation.explain_cli", "nearest vocabulary words of users' learned soft tokens"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
