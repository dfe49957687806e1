"""Which frozen LM gives soft tokens that mean their profile? Offline pre-trained vs random vs stories260K.

For each candidate LM, fresh per-user soft tokens are fit *without hints* with the project's profile trainer
(``userip.profile``: frozen LM, phrase-initialised soft tokens, row-wise Adam) on the synthetic dataset, then:

* hobby / background recovery: NMI of k-means (k = 4 / 3) on each profile's soft tokens vs the true profiles;
* decode accuracy (candidates sharing the offline tokenizer): the profile word nearest (cosine, input
  embedding space) to the soft token, among the hint words of that profile, vs the majority hint word of the
  user's true profile value (paper 3.8, Table 5);
* the soft-token fit's LM loss (first vs last steps), the offline LM's pre-training loss, and wall/CPU time.

Run (about 6-10 minutes on 2 busy cores)::

    python bench/bench_offline_lm.py                      # default synthetic data, 400 users fit
    python bench/bench_offline_lm.py --fit-users 300 --fit-epochs 10 --candidates offline,random
    python bench/bench_offline_lm.py --lm-option hidden_size=128 --lm-option max_steps=400

Ends with one ``RESULT key=value ...`` line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from userip.data.prepare import prepare
from userip.data.preprocess import PROFILE_HINT_COLUMNS
from userip.data.schema import Dataset
from userip.lm import OfflineLMConfig, read_lm_manifest, resolve_lm
from userip.profile.lm import load_causal_lm, load_tokenizer
from userip.profile.model import (
    ProfileModel,
    SoftTokenConfig,
    initial_soft_token_table,
    resolve_value_words,
)
from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer
from userip.prompts import PromptBuilder, PromptConfig, build_examples
from userip.utils.config import from_dict

log = logging.getLogger("bench_offline_lm")

STORIES_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
HINT_COLUMNS = PROFILE_HINT_COLUMNS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--users", type=int, default=2000, help="synthetic users generated (default: the default set)"
    )
    p.add_argument(
        "--fit-users", type=int, default=400, help="users whose soft tokens are fit (subset, for time)"
    )
    p.add_argument("--fit-epochs", type=int, default=12, help="soft-token fit epochs (updates per user)")
    p.add_argument("--fit-lr", type=float, default=0.05, help="soft-token learning rate")
    p.add_argument("--fit-batch-size", type=int, default=32)
    p.add_argument(
        "--candidates", default="offline,random,stories", help="comma list of offline, random, stories"
    )
    p.add_argument("--stories-path", default=str(STORIES_PATH))
    p.add_argument(
        "--lm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an OfflineLMConfig field (YAML value), e.g. hidden_size=128",
    )
    p.add_argument("--template-sees-soft-tokens", choices=["true", "false"], default="true")
    p.add_argument("--cache-dir", default=None, help="offline LM cache (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init",
        default="value_words",
        choices=["value_words", "phrase", "random"],
        help="soft-token init (userip.profile.model.SoftTokenInit; default value_words)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared, oversubscribed CPU one thread was ~10x faster than two)",
    )
    return p.parse_args(argv)


def lm_config_from(options: list[str]) -> OfflineLMConfig:
    overrides: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise SystemExit(f"--lm-option {option!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return from_dict(OfflineLMConfig, overrides, where="--lm-option")


def majority_word(dataset: Dataset, profile: str) -> dict[int, str]:
    """True profile value -> the hint word most users with that value have (for decode accuracy)."""
    merged = dataset.truth[["user_id", profile]].merge(dataset.hints[["user_id", HINT_COLUMNS[profile]]])
    return merged.groupby(profile)[HINT_COLUMNS[profile]].agg(lambda s: s.value_counts().index[0]).to_dict()


def fit_soft_tokens(
    lm_path: str,
    dataset: Dataset,
    prompt_config: PromptConfig,
    fit_user_ids: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Fit fresh soft tokens (no hints) under the frozen LM at ``lm_path``; return vectors and loss record."""
    lm = load_causal_lm(lm_path)
    tokenizer = load_tokenizer(lm_path)
    builder = PromptBuilder(tokenizer, prompt_config)
    examples = build_examples(dataset, builder).subset(fit_user_ids)
    soft_config = SoftTokenConfig(init=args.init)
    value_words = resolve_value_words(soft_config, prompt_config, dataset.hints)
    table = initial_soft_token_table(
        dataset.num_users, lm.get_input_embeddings().weight, builder, soft_config, value_words, args.seed
    )
    model = ProfileModel(lm, table, prompt_config)
    train_config = ProfileTrainConfig(
        lr=args.fit_lr,
        batch_size=args.fit_batch_size,
        num_epochs=args.fit_epochs,
        checkpoint_every=0,
        seed=args.seed,
        progress=False,
        log_every=10**9,
    )
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = ProfileTrainer(model, examples, train_config).train()
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    steps_per_epoch = max(1, len(result.loss_history) // args.fit_epochs)
    users = torch.as_tensor(examples.user_ids)
    return {
        "vectors": model.profile_embeds(users).numpy(),  # (N, P, D)
        "user_ids": examples.user_ids,
        "first_epoch_loss": float(np.mean(result.loss_history[:steps_per_epoch])),
        "last_epoch_loss": float(np.mean(result.loss_history[-steps_per_epoch:])),
        "wall_s": wall,
        "cpu_s": cpu,
        "lm": lm,
        "tokenizer": tokenizer,
    }


def recovery_nmi(vectors: np.ndarray, truth: np.ndarray, k: int, seed: int) -> float:
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(vectors)
    return float(normalized_mutual_info_score(truth, labels))


def decode_accuracy(
    vectors: np.ndarray, truth: np.ndarray, words: dict[int, str], lm: Any, tokenizer: Any
) -> float:
    """Share of users whose soft token's nearest profile word (cosine) is their true profile's word."""
    candidates = sorted(set(words.values()))
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in candidates]
    if any(len(i) != 1 or i[0] == tokenizer.unk_token_id for i in ids):
        return float("nan")  # the words are not single tokens of this vocabulary: not comparable
    emb = lm.get_input_embeddings().weight.detach().float()[[i[0] for i in ids]].numpy()
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    nearest = np.asarray(candidates)[np.argmax(v @ emb.T, axis=1)]
    expected = np.asarray([words[int(t)] for t in truth])
    return float(np.mean(nearest == expected))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm_config = lm_config_from(args.lm_option)
    prompt_config = PromptConfig(template_sees_soft_tokens=args.template_sees_soft_tokens == "true")
    dataset = prepare("synthetic", {"num_users": args.users, "seed": args.seed})
    if dataset.truth is None or dataset.hints is None:
        raise SystemExit("the synthetic dataset has no truth/hints table")
    rng = np.random.default_rng(args.seed)
    fit_user_ids = np.sort(
        rng.choice(dataset.num_users, min(args.fit_users, dataset.num_users), replace=False)
    )
    words = {p: majority_word(dataset, p) for p in HINT_COLUMNS}
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="userip-bench-lm-"))

    rows: list[dict[str, Any]] = []
    for name in [c.strip() for c in args.candidates.split(",") if c.strip()]:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        if name == "stories":
            if not Path(args.stories_path).is_dir():
                log.warning("stories260K not found at %s; skipped", args.stories_path)
                continue
            path = args.stories_path
        elif name in ("offline", "random"):
            path = resolve_lm(
                name,
                dataset,
                prompt_config=prompt_config,
                config=lm_config,
                cache_dir=cache_dir,
                progress=False,
            )
        else:
            raise SystemExit(f"unknown candidate {name!r}; expected offline, random or stories")
        build_wall, build_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        pretraining = read_lm_manifest(path).get("pretraining") if name == "offline" else None
        log.info("candidate %s: %s (built in %.1f s)", name, path, build_wall)
        fit = fit_soft_tokens(path, dataset, prompt_config, fit_user_ids, args)
        truth = dataset.truth.set_index("user_id").loc[fit["user_ids"]]
        row: dict[str, Any] = {"lm": name, "build_wall_s": build_wall, "build_cpu_s": build_cpu}
        if pretraining:
            row["pretrain_loss"] = f"{pretraining['initial_loss']:.2f}->{pretraining['final_loss']:.2f}"
            row["pretrain_steps"] = pretraining["steps"]
        row["fit_loss"] = f"{fit['first_epoch_loss']:.3f}->{fit['last_epoch_loss']:.3f}"
        row["fit_loss_drop"] = fit["first_epoch_loss"] - fit["last_epoch_loss"]
        row["fit_wall_s"], row["fit_cpu_s"] = fit["wall_s"], fit["cpu_s"]
        for p, profile in enumerate(prompt_config.profiles):
            k = profile.codebook_size
            vectors = fit["vectors"][:, p]
            row[f"{profile.name}_nmi"] = recovery_nmi(vectors, truth[profile.name].to_numpy(), k, args.seed)
            row[f"{profile.name}_decode"] = decode_accuracy(
                vectors, truth[profile.name].to_numpy(), words[profile.name], fit["lm"], fit["tokenizer"]
            )
        rows.append(row)
        log.info("candidate %s: %s", name, {k: v for k, v in row.items()})

    print_table(rows, args, lm_config)
    result = {f"{r['lm']}_{key}": r[key] for r in rows for key in ("hobby_nmi", "background_nmi")}
    result.update({f"{r['lm']}_hobby_decode": r["hobby_decode"] for r in rows})
    result.update({f"{r['lm']}_fit_loss_drop": r["fit_loss_drop"] for r in rows})
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return 0


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, lm_config: OfflineLMConfig) -> None:
    print(
        f"\nsynthetic users={args.users}, fit users={args.fit_users}, fit epochs={args.fit_epochs}, "
        f"fit lr={args.fit_lr}, offline LM: {lm_config.architecture.value} hidden={lm_config.hidden_size} "
        f"layers={lm_config.num_layers} steps<={lm_config.max_steps}, threads={torch.get_num_threads()}, "
        f"cpus={os.cpu_count()}"
    )
    header = (
        "LM",
        "hobby NMI",
        "background NMI",
        "hobby decode",
        "background decode",
        "fit loss (1st->last epoch)",
        "pre-train loss",
        "build s (cpu)",
        "fit s (cpu)",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = (
            r["lm"],
            f"{r['hobby_nmi']:.3f}",
            f"{r['background_nmi']:.3f}",
            f"{r['hobby_decode']:.2f}",
            f"{r['background_decode']:.2f}",
            r["fit_loss"],
            r.get("pretrain_loss", "-"),
            f"{r['build_wall_s']:.0f} ({r['build_cpu_s']:.0f})",
            f"{r['fit_wall_s']:.0f} ({r['fit_cpu_s']:.0f})",
        )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
