"""What does each searched profile setting's soft tokens know? Probes every cached stage of a run folder.

``userip experiment``'s diagnostics probe only the chosen profile; a ``profile_search`` leaves one stage per
candidate in ``RUN/profiles/<setting>-<digest>/``. This probes the soft tokens of each of them (and of
``RUN/profile``, the config's own stage) like the diagnostics do (``userip.evaluation.probes.probe_report``:
5-fold cross-validated linear-probe AUC beside the bag of the same profile rows and random vectors), with
targets from the **valid** rows and the users table only, so a reader can compare settings without test data.

    python bench/bench_stage_probes.py --run-dir runs/ml100k_warm [--markdown OUT.md] [--lm-reliance]

``--lm-reliance`` also asks how much the frozen LM reads each stage's soft tokens: the mean target-token NLL
of the stage's prompts (up to ``--max-examples``) with each user's own trained soft tokens, another user's (a
seeded permutation), the mean over users, and the stage's initial table (value words + noise). If ``own`` is
barely below ``mean``, the LM's likelihood cannot tell users apart through the slots, so it cannot put their
taste into the soft tokens either (whatever moves them is the surrogate loss).

Ends with one ``RESULT`` line: ``stages=N``; per target ``best_<target>=<auc>``, the highest probe AUC of
any stage's soft tokens, ``best_<target>_stage`` (its setting, ":" for "="), and ``bag_<target>=<auc>``, the
bag of items'; with ``--lm-reliance``, ``max_reliance=<(mean - own) / mean>`` and ``max_reliance_stage``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from userip.data.schema import Dataset
from userip.evaluation.probes import probe_markdown, probe_report
from userip.evaluation.tables import markdown_table
from userip.lm.resolve import is_no_lm
from userip.profile.model import profile_means
from userip.profile.recipe import load_soft_tokens, setup
from userip.profile.stage import _profile_config, read_stage_config, reopen_profile
from userip.prompts.collate import collate
from userip.utils.run_layout import RunLayout


def stage_folders(run_dir: Path) -> dict[str, Path]:
    """Stage name -> its profile folder: ``RUN/profile`` as "run", each ``RUN/profiles/<setting>-<digest>``
    by its setting."""
    layout = RunLayout(run_dir)
    folders = {"run": layout.profile} if layout.profile.exists() else {}
    for stage in sorted(layout.profiles.glob("*/")):
        folders[stage.name.rsplit("-", 1)[0]] = RunLayout(stage).profile
    return folders


@torch.no_grad()
def lm_reliance(
    stage_dir: Path, dataset: Dataset, max_examples: int = 2000, batch_size: int = 64, seed: int = 0
) -> dict[str, float]:
    """Mean target-token NLL of a stage's prompts under its frozen LM with four soft-token tables: each
    user's own, another user's, the mean over trained users, and the initial one (see the module doc)."""
    finished = reopen_profile(stage_dir, dataset)
    # The stage's own model, rebuilt as the stage built it (the LM it recorded, the table it started from).
    prepared = setup(stage_dir, _profile_config(finished.config, finished.lm_path))
    model, examples = prepared.model, prepared.examples
    initial = model.table.weight.clone()  # (U, S, D) as the stage started (seeded)
    trained, trained_mask, _ = load_soft_tokens(RunLayout(stage_dir).profile)
    rng = np.random.default_rng(seed)
    users = torch.nonzero(trained_mask).squeeze(1).numpy()
    permuted = np.arange(trained.shape[0])
    permuted[users] = rng.permutation(users)
    tables = {
        "own": trained,
        "other_user": trained[permuted],
        "mean": trained[users].mean(0, keepdim=True).expand_as(trained).contiguous(),
        "initial": initial,
    }
    rows = np.arange(len(examples))
    if len(rows) > max_examples:
        rows = np.sort(rng.choice(rows, max_examples, replace=False))
    nll = {}
    for name, table in tables.items():
        model.table.weight.copy_(table)
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            batch = collate(
                [examples[int(i)] for i in rows[start : start + batch_size]],
                examples.builder.pad_token_id,
                model.prompt_config.template_sees_soft_tokens,
                model.lm_dtype,
                device=model.device,
            )
            summed, tokens = model(batch)
            total, count = total + float(summed), count + int(tokens)
        nll[name] = total / count
    return {**nll, "examples": float(len(rows)), "reliance": (nll["mean"] - nll["own"]) / nll["mean"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, help="also write the probe table here")
    parser.add_argument(
        "--lm-reliance", action="store_true", help="also measure how much the LM reads the slots"
    )
    parser.add_argument("--max-examples", type=int, default=2000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    folders = stage_folders(args.run_dir)
    if not folders:
        print(f"error: {args.run_dir} has no profile stage (RUN/profile or RUN/profiles/*)", file=sys.stderr)
        return 2
    dataset = Dataset.load(RunLayout(args.run_dir).data)
    features, records, users = {}, {}, None
    for name, folder in folders.items():
        records[name], config = read_stage_config(folder.parent)
        soft_tokens, trained_mask, _ = load_soft_tokens(folder)
        trained = torch.nonzero(trained_mask).squeeze(1).numpy()
        if users is not None and not (len(users) == len(trained) and (users == trained).all()):
            print(f"error: {folder} trained other users than the first stage", file=sys.stderr)
            return 2
        users = trained
        # As the experiment's diagnostics: one mean vector per profile, (N, P * hidden).
        features[name] = profile_means(soft_tokens[trained], config.prompt).flatten(1).numpy()
    table = probe_report(dataset, features, dataset.profile_rows(), users, ("valid",))
    text = probe_markdown(table)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    parts = [f"stages={len(folders)}"]
    for target in table.columns:
        stages = table.loc[list(features), target].dropna()
        if stages.empty:  # too few users of one class for cross-validation (probe_report warned)
            continue
        best_stage = str(stages.idxmax()).replace("=", ":")
        parts += [f"best_{target}={stages.max():.3f}", f"best_{target}_stage={best_stage}"]
        parts.append(f"bag_{target}={table.loc['bag_of_items', target]:.3f}")
    if args.lm_reliance:
        reliance = {}
        for name, folder in folders.items():
            if is_no_lm(records[name]["lm_path"]):
                continue  # no LM to read the slots
            reliance[name] = lm_reliance(folder.parent, dataset, args.max_examples)
        table = pd.DataFrame.from_dict(reliance, orient="index").rename_axis("stage").reset_index()
        text = markdown_table(table, float_format="{:.4f}")
        print(text)
        if args.markdown:
            with args.markdown.open("a") as f:
                f.write("\n" + text)
        if reliance:
            best = max(reliance, key=lambda name: reliance[name]["reliance"])
            parts += [
                f"max_reliance={reliance[best]['reliance']:.4f}",
                f"max_reliance_stage={best.replace('=', ':')}",
            ]
    print("RESULT " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
