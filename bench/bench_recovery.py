"""Recovery of the synthetic generator's true profiles by UserIP-Tuning's profile IDs (issue 4, check 2).

Pipeline: default synthetic dataset -> offline LM (pre-trained on the dataset's texts with hint words, then
frozen; cached) -> soft tokens fit jointly with codebooks + surrogate (Algorithm 1, ``userip.codebook`` as the
trainer's aux) -> nearest-code IDs -> feature bank + report. Figures: NMI / ARI of the learned hobby and
background IDs against the true hobby and background, against k-means on bag-of-items user vectors (upper
reference: no LM, same training interactions) and random IDs (chance).

    python bench/bench_recovery.py                       # default synthetic dataset, offline LM
    python bench/bench_recovery.py --lm-steps 200        # the LM pre-trained for 200 steps (documented run)
    python bench/bench_recovery.py --lm random           # ablation: frozen random LM of the same shape
    python bench/bench_recovery.py --num-users 600 --epochs 4   # quick look

Ends with one line ``RESULT hobby_nmi=... background_nmi=... kmeans_bow_nmi=... random_nmi=...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from userip.codebook import QuantizationConfig
from userip.codebook.recovery import kmeans_bow_codes, profile_recovery, random_codes
from userip.profile.bank import build_aux, write_bank
from userip.utils.seed import seed_everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--num-users", type=int, default=None, help="synthetic users (default: the generator's default)"
    )
    p.add_argument("--lm", default="offline", help="'offline' (default), 'random', or a model folder")
    p.add_argument(
        "--lm-steps", type=int, default=None, help="offline LM pre-training steps (default: its config)"
    )
    p.add_argument("--epochs", type=int, default=15, help="profile-inference epochs (as `userip profile`)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02, help="soft-token learning rate")
    p.add_argument(
        "--aux-lr", type=float, default=1e-3, help="codebook + surrogate learning rate (paper: 1e-3)"
    )
    p.add_argument("--loss-weight", type=float, default=0.001, help="lambda of eq. 7 (paper: 0.001)")
    p.add_argument("--beta", type=float, default=0.001, help="commitment weight (paper: 0.001)")
    p.add_argument("--without-vq", action="store_true", help="ablation: continuous profiles, k-means IDs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init",
        default="value_words",
        choices=["value_words", "phrase", "random"],
        help="soft-token init (userip.profile.model.SoftTokenInit; default value_words)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="offline LM cache (default: ~/.cache/userip/lm)")
    p.add_argument("--out", default=None, help="folder for the bank + report (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    from userip.data.prepare import prepare
    from userip.lm import OfflineLMConfig, resolve_lm
    from userip.profile.lm import load_causal_lm, load_tokenizer
    from userip.profile.model import (
        ProfileModel,
        SoftTokenConfig,
        initial_soft_token_table,
        resolve_value_words,
    )
    from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer
    from userip.prompts import PromptBuilder, PromptConfig, build_examples

    t0 = time.perf_counter()
    options = {"seed": args.seed} | ({"num_users": args.num_users} if args.num_users else {})
    dataset = prepare("synthetic", options)
    print(f"dataset: synthetic {dataset.statistics()} hash={dataset.content_hash}")
    prompt_config = PromptConfig()
    lm_config = OfflineLMConfig(**({"max_steps": args.lm_steps} if args.lm_steps else {}))
    t_lm = time.perf_counter()
    lm_path = resolve_lm(args.lm, dataset, prompt_config=prompt_config, config=lm_config,
                         cache_dir=args.cache_dir, progress=False)  # fmt: skip
    print(f"LM: {args.lm} -> {lm_path} ({time.perf_counter() - t_lm:.1f} s)")
    tokenizer = load_tokenizer(lm_path)
    lm = load_causal_lm(lm_path, dtype="fp32", device="cpu")
    hidden = lm.get_input_embeddings().weight.shape[1]
    builder = PromptBuilder(tokenizer, prompt_config)
    soft_config = SoftTokenConfig(init=args.init)
    value_words = resolve_value_words(soft_config, prompt_config, dataset.hints)
    table = initial_soft_token_table(
        dataset.num_users, lm.get_input_embeddings().weight, builder, soft_config, value_words, args.seed
    )
    print(f"soft tokens start from ({args.init}): {value_words if args.init == 'value_words' else 'phrases'}")
    model = ProfileModel(lm, table, prompt_config)
    examples = build_examples(dataset, builder)

    quant_config = QuantizationConfig(
        loss_weight=args.loss_weight, beta=args.beta, without_vq=args.without_vq, seed=args.seed
    )
    aux = build_aux(dataset, prompt_config.profiles, hidden, quant_config)
    train_config = ProfileTrainConfig(
        lr=args.lr, aux_lr=args.aux_lr, batch_size=args.batch_size, num_epochs=args.epochs, seed=args.seed,
        progress=False, checkpoint_every=0, log_every=10**9,
    )  # fmt: skip
    t_fit = time.perf_counter()
    result = ProfileTrainer(model, examples, train_config, aux=aux).train()
    losses = result.loss_history
    print(
        f"profile inference: {result.steps} steps, {result.seconds:.1f} s, "
        f"LM loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}, "
        f"aux {json.dumps({k: round(v, 4) for k, v in result.aux_metrics.items()})}"
    )

    profile_table = model.profile_embeds(torch.arange(dataset.num_users))  # (U, P, D)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_recovery_"))
    bank, report = write_bank(out / "bank", dataset, aux, profile_table, trained_user_ids=examples.user_ids,
                              lm=f"{args.lm}:{lm_path}", template=prompt_config.task_description)  # fmt: skip
    t_done = time.perf_counter()

    truth = dataset.truth.set_index("user_id").loc[np.arange(dataset.num_users)]
    codes = bank.lookup(np.arange(dataset.num_users))
    known = (codes >= 0).all(axis=1)
    figures: dict[str, float] = {}
    print(
        f"\nrecovery over {int(known.sum())} users "
        "(NMI / ARI; rows: learned profile IDs, columns: true factor)"
    )
    for p, name in enumerate(bank.profile_names):
        cells = []
        for factor in ("hobby", "background"):
            r = profile_recovery(codes[known, p], truth[factor].to_numpy()[known])
            cells.append(f"{factor} {r['nmi']:.3f} / {r['ari']:.3f}")
            if factor == name:
                figures[f"{name}_nmi"], figures[f"{name}_ari"] = r["nmi"], r["ari"]
        usage = report["profiles"][name]["users_per_code"]
        print(f"  {name:<11} {' | '.join(cells)}   users per code {usage}")
    # Diagnostic: k-means (not the trained codebook) on the same final profile embeddings.
    embeds = profile_table.numpy()[known]
    posthoc = {}
    for p, spec in enumerate(prompt_config.profiles):
        labels = KMeans(spec.codebook_size, n_init=10, random_state=args.seed).fit_predict(embeds[:, p])
        posthoc[spec.name] = profile_recovery(labels, truth[spec.name].to_numpy()[known])["nmi"]
    print(f"  k-means on the learned profile embeddings (diagnostic): "
          f"{', '.join(f'{k} {v:.3f}' for k, v in posthoc.items())}")  # fmt: skip
    hobby_truth = truth["hobby"].to_numpy()
    k_hobby = prompt_config.profiles[0].codebook_size
    bow = profile_recovery(kmeans_bow_codes(dataset, k_hobby, args.seed), hobby_truth)
    rnd = profile_recovery(random_codes(dataset.num_users, k_hobby, args.seed), hobby_truth)
    bg_truth = truth["background"].to_numpy()
    k_bg = prompt_config.profiles[1].codebook_size
    bow_bg = profile_recovery(kmeans_bow_codes(dataset, k_bg, args.seed), bg_truth)
    print(f"  k-means on bag-of-items (K={k_hobby}) vs hobby: {bow['nmi']:.3f} / {bow['ari']:.3f}; "
          f"(K={k_bg}) vs background: {bow_bg['nmi']:.3f} / {bow_bg['ari']:.3f}")  # fmt: skip
    print(f"  random IDs (K={k_hobby}) vs hobby: {rnd['nmi']:.3f} / {rnd['ari']:.3f}")
    print(f"\nbank {bank.version} + report in {out / 'bank'}; total {t_done - t0:.1f} s "
          f"(LM {t_fit - t_lm:.1f} s incl. loading, profile fit {result.seconds:.1f} s)")  # fmt: skip
    print(
        f"RESULT hobby_nmi={figures['hobby_nmi']:.4f} background_nmi={figures['background_nmi']:.4f} "
        f"hobby_ari={figures['hobby_ari']:.4f} background_ari={figures['background_ari']:.4f} "
        f"kmeans_bow_nmi={bow['nmi']:.4f} kmeans_bow_background_nmi={bow_bg['nmi']:.4f} "
        f"random_nmi={rnd['nmi']:.4f} posthoc_kmeans_hobby_nmi={posthoc['hobby']:.4f} "
        f"lm={args.lm} users={dataset.num_users} epochs={args.epochs} "
        f"without_vq={int(args.without_vq)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
