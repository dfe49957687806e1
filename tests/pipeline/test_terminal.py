"""``userip run`` and ``userip experiment`` keep the terminal short (a progress bar per stage, the summary)
and the details in the log.

How terminal lines are counted: a line is what ends in ``\\n`` (plus a last unterminated one), on stdout and
stderr together. A tqdm bar redraws itself with ``\\r`` on the line it sits on, so a person sees one line per
bar however often it updates; carriage returns are therefore not line breaks here.
"""

import re

import yaml
from tests.prompts.conftest import _one_torch_thread  # noqa: F401  (autouse: one torch thread per test)

from userip.cli import main
from userip.pipeline.experiment_cli import LOG_FILE as EXPERIMENT_LOG
from userip.pipeline.run import LOG_FILE

from .conftest import TINY

MAX_TERMINAL_LINES = 40
EPOCH_LINE = re.compile(r"INFO userip\.ctr\.trainer: epoch \d+: train loss")


def terminal_lines(text: str) -> int:
    """Lines a person sees: ``\\n``-terminated ones, plus a last one without ``\\n``; ``\\r`` is no break."""
    return text.count("\n") + (0 if text == "" or text.endswith("\n") else 1)


def test_terminal_line_rule():
    assert terminal_lines("") == 0
    assert terminal_lines("bar 1/3\rbar 2/3\rbar 3/3\n") == 1
    assert terminal_lines("a\nb") == 2


def assert_quiet_terminal(out: str, err: str, bars: tuple[str, ...]) -> None:
    """A short terminal: fewer than MAX_TERMINAL_LINES lines, each stage's bar, no INFO record (the details
    are in the log file)."""
    seen = terminal_lines(out) + terminal_lines(err)
    assert seen < MAX_TERMINAL_LINES, f"{seen} lines on the terminal:\n{out}{err}"
    assert " INFO " not in out + err
    for bar in bars:
        assert bar in err, f"no {bar!r} progress bar"


def test_run_prints_bars_and_summary_and_logs_every_epoch(tmp_path, capfd):
    config = {
        **TINY,
        "profile": {**TINY["profile"], "train": {**TINY["profile"]["train"], "progress": True}},
        "trainer": {"max_epochs": 2, "min_epochs": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"

    assert main(["run", "--config", str(path), "--run-dir", str(run_dir)]) == 0

    out, err = capfd.readouterr()
    assert_quiet_terminal(out, err, ("prepare synthetic", "offline LM pre-training", "profile", "ctr"))
    assert "| UserIP-DCN |" in out and str(run_dir / LOG_FILE) in out

    log = (run_dir / LOG_FILE).read_text()
    assert len(EPOCH_LINE.findall(log)) == 2 * 2  # DCN and UserIP-DCN, 2 epochs each
    assert "userip.profile.trainer: step" in log and "feature bank" in log


def test_experiment_prints_bars_and_tables_and_logs_every_epoch(tmp_path, capfd, monkeypatch):
    """``userip experiment`` is as quiet as ``userip run``; ``--verbose`` puts the INFO records back."""
    # The profile diagnostics (cross-validated probes, ~45 s here) are not what this test is about.
    monkeypatch.setattr("userip.pipeline.experiment.write_diagnostics", lambda *args: None)
    config = {
        **{k: v for k, v in TINY.items() if k != "seeds"},
        "profile": {**TINY["profile"], "train": {**TINY["profile"]["train"], "progress": True}},
        "name": "quiet",
        "run_dir": str(tmp_path / "run"),
        "seeds": [0],
        "tables": ["table2"],
        "baselines": ["dcn"],
        "trainer": {"max_epochs": 2, "min_epochs": 2},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "quiet"

    assert main(["experiment", "--config", str(path), "--out-dir", str(out_dir)]) == 0

    out, err = capfd.readouterr()
    assert_quiet_terminal(
        out, err, ("prepare synthetic", "offline LM pre-training", "profile", "experiment cells")
    )
    assert "| UserIP-DCN |" in out and str(out_dir / EXPERIMENT_LOG) in out
    log = (out_dir / EXPERIMENT_LOG).read_text()
    assert len(EPOCH_LINE.findall(log)) == 2 * 2  # DCN and UserIP-DCN, 2 epochs each

    # --verbose: the same records on the terminal (data and bank reused; the cells of a new folder train).
    verbose_dir = tmp_path / "verbose"
    argv = ["experiment", "--config", str(path), "--out-dir", str(verbose_dir), "--verbose"]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert len(EPOCH_LINE.findall(out + err)) == 2 * 2
    assert len(EPOCH_LINE.findall((verbose_dir / EXPERIMENT_LOG).read_text())) == 2 * 2
