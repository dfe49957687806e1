"""The ``userip`` command line: one subcommand per pipeline stage.

Each stage module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are imported lazily so that
``userip --help`` is fast and a stage's heavy imports are paid only when it runs.

One error path for every command: a stage raises its named error and ``main`` reports it, so a corrupt or
missing artifact, a bad input file, a wrongly typed config value or a bad ``--set`` ends in one line
``userip <command>: error: <ErrorName>: <message>`` on stderr (and in the command's log file) and exit code 2
(the code argparse uses for bad arguments), never a traceback. ``USERIP_TRACEBACK=1`` re-raises for
debugging.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import time
import zlib
from pathlib import Path

from userip.utils.threads import THREADS_ENV, prefer_passive_wait

EXIT_ERROR = 2

# What bad inputs and damaged artifacts raise: the project's named errors are ValueError subclasses
# (ConfigError, DatasetError, FeatureBankError, CorruptArtifactError, ...); OSError covers missing files,
# a file where a folder belongs and unreadable gzip; EOFError / zlib.error are truncated or corrupt
# compressed files. Anything else is a bug and keeps its traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, EOFError, zlib.error)

# Arguments naming run folders, which must not be existing files (mkdir under a file fails deep in a stage).
FOLDER_ARGS: dict[str, tuple[str, ...]] = {"prepare": ("out",), "experiment": ("out_dir",)}

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
    "compare": (
        "userip.evaluation.compare_cli",
        "rows of several experiments on the same data in one paired table (e.g. what the LLM adds)",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userip", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        dest="process_threads",  # not `threads`: `userip train --threads` (the trainer's own) would shadow it
        type=_positive_int,
        default=None,
        help=f"intra-op CPU threads for every stage (also {THREADS_ENV}); default: from each stage's work "
        "size and the CPUs this process may use (userip.utils.threads)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prefer_passive_wait()  # before any stage imports torch
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if args.process_threads is not None:
        # read by every stage, and inherited by the subprocesses it starts (torchrun ranks)
        os.environ[THREADS_ENV] = str(args.process_threads)
    try:
        check_folder_args(args)
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except Exception as e:
        if not is_input_error(e) or os.environ.get("USERIP_TRACEBACK"):
            raise
        message = f"userip {args.command}: error: {describe_error(e)}"
        print(message, file=sys.stderr)
        _log_to_file(message)
        _tell_launcher(message)
        return EXIT_ERROR


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def is_input_error(e: BaseException) -> bool:
    """Whether ``e`` is reported in one line (bad input, damaged artifact) rather than as a bug: the
    ``INPUT_ERRORS``, readers' errors, and the project's own named errors deriving from RuntimeError
    (``BankReloadError``, ``RedisBankError``, ...)."""
    if isinstance(e, (*INPUT_ERRORS, *_library_errors())):
        return True
    return isinstance(e, RuntimeError) and type(e).__module__.startswith("userip.")


def _log_to_file(message: str) -> None:
    """The error line in the command's log file too (the terminal already has it): the last file handler
    ``userip.utils.logging.setup_logging`` added; nothing before a command set its log file up."""
    files = [h for h in logging.getLogger("userip").handlers if isinstance(h, logging.FileHandler)]
    if files:
        files[-1].handle(logging.LogRecord("userip", logging.ERROR, __file__, 0, message, None, None))


def _tell_launcher(message: str) -> None:
    """Under torchrun, the error line in the rank's error file too: torchrun still exits 1 with its failure
    summary (it cannot pass a worker's exit code on), but that summary then names this error ("traceback :
    userip ...: error: ...") instead of pointing at a traceback. ``TORCHELASTIC_ERROR_FILE`` is set by
    torchrun for each worker; the format is the one its ``ErrorHandler.record_exception`` writes, with the
    error line where that puts the traceback (torchrun shows that field)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        info = {"py_callstack": message, "timestamp": str(int(time.time()))}
        # On failure the launcher's summary falls back to its generic line; the error is printed above.
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": info}}))


def check_folder_args(args: argparse.Namespace) -> None:
    """``--run-dir`` / ``--out`` pointing at an existing file is refused before the stage starts."""
    for name in ("run_dir", *FOLDER_ARGS.get(args.command, ())):
        value = getattr(args, name, None)
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            flag = "--" + name.replace("_", "-")
            raise NotADirectoryError(f"{flag} {value}: is a file; expected a run directory (a folder)")


def describe_error(e: BaseException) -> str:
    """``ErrorName: message``; an OSError's message gets its file name when Python left it out."""
    message = str(e) or repr(e)
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in message:
        message = f"{e.filename}: {message}"
    return f"{type(e).__name__}: {message}"


def _library_errors() -> tuple[type[BaseException], ...]:
    # Errors of readers that derive from neither ValueError nor OSError (safetensors: truncated header).
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return ()
    return (SafetensorError,)


if __name__ == "__main__":
    sys.exit(main())
