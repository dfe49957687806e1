"""Benchmark (paper Table 6): inference time per 10,000 instances of DCN, UserIP + DCN and KAR + DCN.

Paper (Huawei data, hardware not given): DCN 0.93 s, KAR + DCN 4.78 s, UserIP + DCN 1.21 s per 10,000.

The design note's fair protocol (/work/shared/design/llm-baselines.md, KAR section (4)):

* the project's own modules at ML-100K scale (943 users, 1,682 items) with the experiment's settings: DCN
  (embedding 8, 3 cross layers, MLP (16, 16)) on (user, item); UserIP + DCN adds the two profile fields, whose
  codes come from a bank table; KAR + DCN adds KAR's two 32-d adaptor vectors from 576-d knowledge vectors
  (SmolLM2's width) through the hybrid-expert adaptor (2 shared + 6 specific experts per tower), timed
  twice: with the adaptor online (the Table 6 analogue) and with its outputs cached per user and item
  (``userip.baselines.kar.cache_adaptor``; numerically the same scores);
* weights are random (timing does not depend on them), fp32, ``eval()`` + ``inference_mode``; every score is
  calibrated as ``userip serve`` returns it (``Calibration.sigmoid``: scale and bias on the logit);
* each instance is a (user, item) pair held in memory as tensors on the device; every lookup happens
  inside the timed region: the profile codes ``codes[user]`` (+ 1, the CTR index rule) for UserIP, the
  knowledge rows ``U[user]``, ``I[item]`` for KAR;
* batches of 1,024 and of 10,000; the models run interleaved (one batch of each in turn), 10 warm-up rounds
  then ``--repeats`` timed rounds; median and p90 seconds per 10,000 instances; ``cuda.synchronize`` on GPU.

ReLLa scores every instance with one LLM forward, so it has no place in the same loop. ``--rella-cost
FILE`` reads an experiment's ``llm_baseline_cost.json`` and reports ReLLa's measured inference seconds per
10,000 test instances beside the rows (the device it ran on is in the file).

    python bench/bench_table6.py [--device cpu|cuda] [--threads N] [--repeats 30] [--rella-cost FILE]

Ends with ``RESULT dcn_s_per_10k=... userip_dcn_s_per_10k=... kar_dcn_s_per_10k=...
kar_cached_s_per_10k=... userip_ratio=... kar_ratio=... kar_cached_ratio=... [rella_s_per_10k=...]``
(medians at batch 1,024; ratios against DCN in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from userip.baselines.kar import (
    ITEM_KNOWLEDGE_FIELD,
    USER_KNOWLEDGE_FIELD,
    KARConfig,
    KARModel,
    cache_adaptor,
)
from userip.ctr.calibration import Calibration
from userip.ctr.features import FeatureMap, Field, FieldSource
from userip.ctr.models import build_model
from userip.feature_bank.base import ctr_field_index

NUM_USERS, NUM_ITEMS, KNOWLEDGE_DIM = 943, 1682, 576
CODEBOOK_SIZES = (4, 3)  # hobby, background: the paper's defaults
INSTANCES = 10_000
PAPER = {"dcn": 0.93, "kar_dcn": 4.78, "userip_dcn": 1.21}
DCN = {"embedding_dim": 8, "num_cross_layers": 3, "hidden_units": (16, 16)}
CALIBRATION = Calibration(scale=0.8, bias=-0.2)  # a fitted Platt calibration's cost (values do not matter)


def base_fields() -> tuple[Field, ...]:
    return (
        Field("user_id", NUM_USERS + 1, FieldSource.USER),
        Field("item_id", NUM_ITEMS + 1, FieldSource.ITEM),
    )


def build_scorers(device: torch.device, seed: int = 0) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> score(pairs (B, 2) of dataset ids) -> probs (B,), every lookup inside."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    fields = base_fields()
    dcn = build_model("dcn", FeatureMap(fields), **DCN)
    profile_fields = tuple(
        Field(name, k + 1, FieldSource.USER) for name, k in zip(("hobby", "background"), CODEBOOK_SIZES)
    )
    userip = build_model("dcn", FeatureMap(fields + profile_fields), **DCN)
    codes = np.stack([rng.integers(0, k, NUM_USERS) for k in CODEBOOK_SIZES], axis=1)  # (U, P), a bank
    field_codes = torch.from_numpy(ctr_field_index(codes)).to(device)  # (U, P)
    kar_map = FeatureMap(
        fields
        + (
            Field(USER_KNOWLEDGE_FIELD, NUM_USERS + 1, FieldSource.USER),
            Field(ITEM_KNOWLEDGE_FIELD, NUM_ITEMS + 1, FieldSource.ITEM),
        )
    )
    user_table = rng.standard_normal((NUM_USERS, KNOWLEDGE_DIM)).astype(np.float32)
    item_table = rng.standard_normal((NUM_ITEMS, KNOWLEDGE_DIM)).astype(np.float32)
    kar = KARModel(kar_map, user_table, item_table, KARConfig(), DCN).eval()
    kar_cached = cache_adaptor(kar)
    models = {"dcn": dcn, "userip_dcn": userip, "kar_dcn": kar, "kar_cached": kar_cached}
    for model in models.values():
        model.to(device).eval()

    # Dataset ids -> CTR field ids: + 1 (0 is the unknown index), as the encoder maps every known id.
    def plain(pairs: torch.Tensor) -> torch.Tensor:
        return CALIBRATION.sigmoid(dcn(pairs + 1))

    def with_profiles(pairs: torch.Tensor) -> torch.Tensor:
        return CALIBRATION.sigmoid(userip(torch.cat([pairs + 1, field_codes[pairs[:, 0]]], dim=1)))

    def with_knowledge(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        # KAR's knowledge tables are indexed by dataset id + 1 too (row 0: unknown).
        return lambda pairs: CALIBRATION.sigmoid(model(torch.cat([pairs + 1, pairs + 1], dim=1)))

    return {
        "dcn": plain,
        "userip_dcn": with_profiles,
        "kar_dcn": with_knowledge(kar),
        "kar_cached": with_knowledge(kar_cached),
    }


def time_interleaved(
    scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    pairs: torch.Tensor,
    batch_size: int,
    repeats: int,
    warmups: int = 10,
) -> dict[str, list[float]]:
    """Seconds per 10,000 instances of each scorer, one full pass each in turn per round."""
    sync = torch.cuda.synchronize if pairs.is_cuda else (lambda: None)
    batches = list(torch.split(pairs, batch_size))
    times: dict[str, list[float]] = {name: [] for name in scorers}
    with torch.inference_mode():
        for round_ in range(warmups + repeats):
            for name, score in scorers.items():
                sync()
                start = time.perf_counter()
                for batch in batches:
                    score(batch)
                sync()
                if round_ >= warmups:
                    times[name].append((time.perf_counter() - start) * INSTANCES / len(pairs))
    return times


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rella-cost", type=Path, help="an experiment's llm_baseline_cost.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scorers = build_scorers(device)
    gen = torch.Generator().manual_seed(1)
    pairs = torch.stack(
        [
            torch.randint(0, NUM_USERS, (INSTANCES,), generator=gen),
            torch.randint(0, NUM_ITEMS, (INSTANCES,), generator=gen),
        ],
        dim=1,
    ).to(device)
    with torch.inference_mode():  # the cached adaptor gives KAR's scores (same weights, lookups instead)
        gap = (scorers["kar_dcn"](pairs) - scorers["kar_cached"](pairs)).abs().max().item()
    assert gap < 1e-5, f"cached adaptor changes the scores by {gap}"

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | batch | median s / 10k | p90 s / 10k | x DCN | paper s / 10k |")
    print("|---|---|---|---|---|---|")
    result: dict[str, float] = {}
    for batch_size in (1024, INSTANCES):
        times = time_interleaved(scorers, pairs, batch_size, args.repeats)
        base = statistics.median(times["dcn"])
        for model, values in times.items():
            median = statistics.median(values)
            paper = PAPER.get(model, "")
            cells = [model, batch_size, f"{median:.4f}", f"{p90(values):.4f}", f"{median / base:.2f}", paper]
            print("| " + " | ".join(map(str, cells)) + " |")
            if batch_size == 1024:
                result[f"{model}_s_per_10k"] = median
    for model in ("userip_dcn", "kar_dcn", "kar_cached"):
        result[f"{model.removesuffix('_dcn')}_ratio"] = result[f"{model}_s_per_10k"] / result["dcn_s_per_10k"]
    if args.rella_cost:
        costs = json.loads(args.rella_cost.read_text())
        seeds = [c for k, c in costs.get("rella", {}).items() if k.startswith("seed")]
        if seeds:
            per_10k = [c["inference_seconds"] / c["inference_samples"] * INSTANCES for c in seeds]
            result["rella_s_per_10k"] = statistics.median(per_10k)
            where = seeds[0]["device"]
            same_device = f", {device.type}" in where  # a ratio only against DCN on the same kind of device
            ratio = f"{result['rella_s_per_10k'] / result['dcn_s_per_10k']:.0f}" if same_device else "-"
            per_10k = result["rella_s_per_10k"]
            print(f"| rella (LLM forward per instance; {where}) | - | {per_10k:.2f} | - | {ratio} | - |")
    print(
        "RESULT "
        + " ".join(f"{k}={v:.4g}" for k, v in result.items())
        + f" device={device.type} threads={torch.get_num_threads()} cpu_count={os.cpu_count()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
