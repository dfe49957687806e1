"""Benchmark: one epoch of DCN on 1,000,000 generated rows, ours vs DeepCTR-Torch's DCN, in the same run.

Data: user (20,000), item (5,000) and two small context fields (8 and 12 values) with a planted signal (user
and item biases, a user x item latent dot product, field effects and a field x item-group interaction). Both
sides train DCN (embedding 8, 3 cross layers, MLP (16, 16), dropout 0.2, Adam lr 1e-3, batch 4096, no L2) for
one epoch on the same rows and predict the same held-out rows with the same thread count; rounds alternate
ours / reference so machine load hits both alike. Speeds: each side's best round; AUC: the mean over rounds
(round r uses seed + r on both sides).

Reference: DeepCTR-Torch (``deepctr_torch.models.DCN``, its own ``fit`` and ``predict``) runs in a subprocess
under its own virtual environment, which must pin our torch (deepctr-torch 0.3.0 also imports ``requests``
without declaring it):

    python -m venv bench/.venv-deepctr
    bench/.venv-deepctr/bin/pip install torch==2.13.0 deepctr-torch requests

If that interpreter or package is missing, the bench says so and compares against a plain per-sample
``DataLoader`` loop over the same model instead (labelled ``ref=per-sample-dataloader``).

    python bench/bench_ctr.py [--rows 1000000] [--threads 1] [--rounds 2]

Ends with one line: ``RESULT ours_train_sps=... ours_infer_sps=... ref_train_sps=... ...``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_REF_PYTHON = Path(__file__).resolve().parent / ".venv-deepctr" / "bin" / "python"
FIELDS = ("user", "item", "ctx_a", "ctx_b")
CARDINALITY = {"user": 20_000, "item": 5_000, "ctx_a": 8, "ctx_b": 12}
MODEL = {"embedding_dim": 8, "num_cross_layers": 3, "hidden_units": (16, 16), "dropout": 0.2}
LR = 1e-3
JSON_MARK = "BENCH_JSON "


# ---------------------------------------------------------------------------------------------------- data
def generate(num_train: int, num_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Field indices 1..n (0 stays free as the unseen index) and 0/1 labels drawn from a planted logit."""
    rng = np.random.default_rng(seed)
    n = num_train + num_test
    cols = {f: rng.integers(0, CARDINALITY[f], n) for f in FIELDS}
    # Long-tailed popularity on users and items, as in real logs.
    cols["user"] = (rng.pareto(1.0, n) * 2000).astype(np.int64) % CARDINALITY["user"]
    cols["item"] = (rng.pareto(1.0, n) * 50).astype(np.int64) % CARDINALITY["item"]
    latent = 4
    user_vec = rng.normal(0, 0.6, (CARDINALITY["user"], latent))
    item_vec = rng.normal(0, 0.6, (CARDINALITY["item"], latent))
    user_bias = rng.normal(0, 0.8, CARDINALITY["user"])
    item_bias = rng.normal(0, 0.8, CARDINALITY["item"])
    a_effect = rng.normal(0, 0.5, CARDINALITY["ctx_a"])
    b_effect = rng.normal(0, 0.5, CARDINALITY["ctx_b"])
    ab_item = rng.normal(0, 0.7, (CARDINALITY["ctx_a"], 4))  # ctx_a x item group (item % 4)
    u, i, a, b = (cols[f] for f in FIELDS)
    logit = (
        user_bias[u]
        + item_bias[i]
        + np.einsum("nk,nk->n", user_vec[u], item_vec[i])
        + a_effect[a]
        + b_effect[b]
        + ab_item[a, i % 4]
        - 0.2
    )
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    x_ids = np.stack([cols[f] + 1 for f in FIELDS], axis=1).astype(np.int64)
    return {
        "x_train": x_ids[:num_train],
        "y_train": labels[:num_train],
        "x_test": x_ids[num_train:],
        "y_test": labels[num_train:],
    }


def vocab_sizes() -> list[int]:
    return [CARDINALITY[f] + 1 for f in FIELDS]


# ---------------------------------------------------------------------------------------------------- ours
def run_ours(data: dict[str, np.ndarray], threads: int, batch_size: int, infer_batch: int, seed: int) -> dict:
    import torch

    from userip.ctr.data import SplitTensors
    from userip.ctr.features import FeatureMap, Field
    from userip.ctr.models import build_model
    from userip.ctr.trainer import CTRTrainerConfig, Trainer, predict_probs
    from userip.evaluation import auc

    torch.set_num_threads(threads)
    feature_map = FeatureMap(tuple(Field(f, v) for f, v in zip(FIELDS, vocab_sizes())))
    torch.manual_seed(seed)
    model = build_model("dcn", feature_map, **MODEL)
    config = CTRTrainerConfig(lr=LR, batch_size=batch_size, max_epochs=1, seed=seed, num_threads=threads)
    trainer = Trainer(model, config)
    train = SplitTensors(torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"]))
    x_test = torch.from_numpy(data["x_test"])
    start = time.perf_counter()
    trainer.fit(train, None)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    probs = predict_probs(trainer.model, x_test, infer_batch)
    infer_s = time.perf_counter() - start
    start = time.perf_counter()
    probs_big = predict_probs(trainer.model, x_test, config.eval_batch_size)
    infer_big_s = time.perf_counter() - start
    assert np.allclose(probs, probs_big, atol=1e-6)
    return {
        "train_sps": len(train) / train_s,
        "infer_sps": len(x_test) / infer_s,
        "infer_sps_default_batch": len(x_test) / infer_big_s,
        "auc": auc(data["y_test"], probs),
    }


# ------------------------------------------------------------------------------------------------ reference
def deepctr_worker(folder: Path, threads: int, batch_size: int, infer_batch: int, seed: int) -> None:
    """Runs under the DeepCTR-Torch venv: its DCN, its ``fit`` and ``predict``; prints one JSON line."""
    import types

    # deepctr_torch's import starts a thread asking PyPI for newer versions; this machine is offline.
    sys.modules.setdefault("requests", types.SimpleNamespace(get=None, codes=None))  # type: ignore[arg-type]
    import torch
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DCN
    from sklearn.metrics import roc_auc_score

    torch.set_num_threads(threads)
    data = {k: np.load(folder / f"{k}.npy") for k in ("x_train", "y_train", "x_test", "y_test")}
    columns = [SparseFeat(f, v, embedding_dim=MODEL["embedding_dim"]) for f, v in zip(FIELDS, vocab_sizes())]
    model = DCN(
        columns,
        columns,
        cross_num=MODEL["num_cross_layers"],
        dnn_hidden_units=MODEL["hidden_units"],
        dnn_dropout=MODEL["dropout"],
        l2_reg_linear=0.0,
        l2_reg_embedding=0.0,
        l2_reg_cross=0.0,
        seed=seed,
        device="cpu",
    )
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy")
    train_input = {f: data["x_train"][:, j] for j, f in enumerate(FIELDS)}
    test_input = {f: data["x_test"][:, j] for j, f in enumerate(FIELDS)}
    start = time.perf_counter()
    model.fit(train_input, data["y_train"], batch_size=batch_size, epochs=1, verbose=0)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    probs = model.predict(test_input, batch_size=infer_batch).ravel()
    infer_s = time.perf_counter() - start
    result = {
        "train_sps": len(data["y_train"]) / train_s,
        "infer_sps": len(data["y_test"]) / infer_s,
        "auc": float(roc_auc_score(data["y_test"], probs)),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    print(JSON_MARK + json.dumps(result), flush=True)


def run_deepctr(ref_python: Path, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [str(ref_python), str(Path(__file__).resolve()), "--worker", str(folder)]
    cmd += ["--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    cmd += ["--infer-batch-size", str(args.infer_batch_size), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(JSON_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"DeepCTR-Torch worker failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(JSON_MARK) :])


def deepctr_available(ref_python: Path) -> str | None:
    """None if the reference interpreter imports deepctr_torch on our torch; else the reason it cannot."""
    if not ref_python.exists():
        return f"{ref_python} not found (create the venv: see this file's docstring)"
    probe = (
        "import sys, types; sys.modules['requests'] = types.SimpleNamespace(get=None, codes=None); "
        "import torch, deepctr_torch; print(torch.__version__, deepctr_torch.__version__)"
    )
    proc = subprocess.run([str(ref_python), "-c", probe], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return f"deepctr_torch does not import: {proc.stderr.strip().splitlines()[-1:]}"
    return None


def run_dataloader_reference(data: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    """Fallback reference: the same model fed by a per-sample Dataset + default collate, as DeepCTR does."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from userip.ctr.features import FeatureMap, Field
    from userip.ctr.models import build_model
    from userip.evaluation import auc

    class Rows(Dataset):
        def __init__(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
            self.x, self.y = torch.from_numpy(x), None if y is None else torch.from_numpy(y)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int):
            return self.x[i] if self.y is None else (self.x[i], self.y[i])

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model("dcn", FeatureMap(tuple(Field(f, v) for f, v in zip(FIELDS, vocab_sizes()))), **MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = DataLoader(Rows(data["x_train"], data["y_train"]), batch_size=args.batch_size, shuffle=True)
    start = time.perf_counter()
    model.train()
    for x_ids, labels in loader:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x_ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_s = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        probs = torch.cat(
            [torch.sigmoid(model(x)) for x in DataLoader(Rows(data["x_test"]), args.infer_batch_size)]
        )
    infer_s = time.perf_counter() - start
    return {
        "train_sps": len(data["y_train"]) / train_s,
        "infer_sps": len(data["y_test"]) / infer_s,
        "auc": auc(data["y_test"], probs.numpy()),
    }


# ---------------------------------------------------------------------------------------------------- main
def _speeds(run: dict) -> str:
    return f"train {run['train_sps']:,.0f}/s infer {run['infer_sps']:,.0f}/s AUC {run['auc']:.4f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="training rows (one epoch)")
    p.add_argument("--test-rows", type=int, default=200_000)
    # 1 by default: with other jobs on the cores, 2+ intra-op threads stall each other (measured 10x slower).
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--infer-batch-size", type=int, default=4096, help="inference batch for both sides")
    p.add_argument("--rounds", type=int, default=2, help="alternating ours/reference rounds; best of each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-python", type=Path, default=DEFAULT_REF_PYTHON)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        deepctr_worker(args.worker, args.threads, args.batch_size, args.infer_batch_size, args.seed)
        return 0

    data = generate(args.rows, args.test_rows, args.seed)
    print(
        f"data: {args.rows} train / {args.test_rows} test rows, fields {CARDINALITY}, "
        f"positive rate {data['y_train'].mean():.3f}; threads {args.threads}, batch {args.batch_size}"
    )
    reason = deepctr_available(args.ref_python)
    ref_name = "deepctr-torch" if reason is None else "per-sample-dataloader"
    if reason is not None:
        print(f"DeepCTR-Torch unavailable ({reason}); reference = per-sample DataLoader loop over our DCN")
    ours_runs: list[dict] = []
    ref_runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_ctr_") as tmp:
        folder = Path(tmp)
        for name, array in data.items():
            np.save(folder / f"{name}.npy", array)
        for r in range(args.rounds):
            # Each round draws a new init / shuffle seed on both sides, so the AUC gap is averaged over seeds.
            round_args = argparse.Namespace(**{**vars(args), "seed": args.seed + r})
            ours_runs.append(
                run_ours(data, args.threads, args.batch_size, args.infer_batch_size, args.seed + r)
            )
            ref_runs.append(
                run_deepctr(args.ref_python, folder, round_args)
                if reason is None
                else run_dataloader_reference(data, round_args)
            )
            o, f = ours_runs[-1], ref_runs[-1]
            print(
                f"round {r + 1}: ours {_speeds(o)} (default batch {o['infer_sps_default_batch']:,.0f}/s)"
                f" | {ref_name} {_speeds(f)} | ratios train {o['train_sps'] / f['train_sps']:.2f}x"
                f" infer {o['infer_sps'] / f['infer_sps']:.2f}x"
            )
    ours_train, ref_train = (max(r["train_sps"] for r in runs) for runs in (ours_runs, ref_runs))
    ours_infer, ref_infer = (max(r["infer_sps"] for r in runs) for runs in (ours_runs, ref_runs))
    auc_ours, auc_ref = (float(np.mean([r["auc"] for r in runs])) for runs in (ours_runs, ref_runs))
    print(
        f"RESULT ref={ref_name} ours_train_sps={ours_train:.0f} ours_infer_sps={ours_infer:.0f} "
        f"ref_train_sps={ref_train:.0f} ref_infer_sps={ref_infer:.0f} "
        f"train_speedup={ours_train / ref_train:.2f} infer_speedup={ours_infer / ref_infer:.2f} "
        f"auc_ours={auc_ours:.4f} auc_ref={auc_ref:.4f} auc_gap={auc_ours - auc_ref:+.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
