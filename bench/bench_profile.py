"""Throughput of a profile-training step vs a naive reference step, and achieved FLOP/s vs a plain matmul.

For each model (stories260K when ../shared exists; a GPT-2-124M-shaped model built from GPT2Config):
  ours   ProfileTrainer._step: frozen LM, length-bucketed batches, row-wise Adam, logits only where needed
         (fp32, and bf16 weights cast once)
  naive  standard HF forward/backward with labels=..., every LM parameter requiring grad, dense Adam on the
         whole table, random (unbucketed) batches, fp32
Tokens/s counts real (non-padding) tokens. Peak memory: CUDA max allocated on GPU; on CPU the peak RSS growth
during the measured steps (sampled). FLOPs of our step: 4 * P * T (frozen: forward + input-gradient backward,
no weight gradients; P = matmul parameters incl. the LM head, T = padded tokens) + attention 12 * layers *
L * D
per token; compared with a (B*L, D) x (D, 4D) matmul timed in the same process and dtype.

Usage: python bench/bench_profile.py [--batch-size 8] [--seq-len 128] [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2Config, PreTrainedTokenizerFast

from userip.lm.tokenizer import build_tokenizer
from userip.profile.lm import freeze, load_causal_lm
from userip.profile.model import ProfileModel, SoftTokenTable
from userip.profile.trainer import ProfileTrainer, TrainConfig, plan_batches
from userip.prompts import ExampleSet, PromptBuilder, PromptConfig, collate

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "stories260K"


class PeakRSS:
    """Samples VmRSS every 5 ms (CPU peak memory of a region, relative to its start)."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that knows the template's words (targets are random ids, so nothing else)."""
    return build_tokenizer(
        [], vocab_size=64, required_texts=[PromptConfig().task_description, *TEMPLATE_WORDS]
    )


TEMPLATE_WORDS = [p.phrase for p in PromptConfig().profiles]


def make_examples(builder: PromptBuilder, num: int, seq_len: int, vocab: int, seed: int) -> ExampleSet:
    """``num`` users with random target ids; lengths spread over [seq_len/4, seq_len] as in real histories."""
    rng = np.random.default_rng(seed)
    budget = seq_len - builder.prefix_length
    lengths = rng.integers(budget // 4, budget + 1, size=num)
    offsets = np.zeros(num + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    targets = rng.integers(3, vocab, size=int(offsets[-1])).astype(np.int32)
    return ExampleSet(builder, np.arange(num, dtype=np.int64), offsets, targets, np.zeros(0, dtype=np.int64))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, steps: int, device) -> tuple[float, float]:
    """(seconds per step, peak memory MB) over ``steps`` calls after one warm-up call."""
    fn(0)
    sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i + 1)
        sync(device)
        dt = (time.perf_counter() - t0) / steps
    mem = (
        (torch.cuda.max_memory_allocated() - base) / 2**20
        if torch.device(device).type == "cuda"
        else rss.delta_mb
    )
    return dt, mem


def matmul_flops(rows: int, dim: int, dtype, device, repeats: int = 10) -> float:
    a = torch.randn(rows, dim, dtype=dtype, device=device)
    b = torch.randn(dim, 4 * dim, dtype=dtype, device=device)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * rows * dim * 4 * dim * repeats / (time.perf_counter() - t0)


def bench_model(name, make_lm, tokenizer, args) -> dict[str, float]:
    device, B, L, steps = args.device, args.batch_size, args.seq_len, args.steps
    builder = PromptBuilder(tokenizer, PromptConfig(max_target_tokens=L))
    num_users = B * (steps + 1) * 4
    results: dict[str, float] = {}
    lm = make_lm()
    vocab, D = lm.get_input_embeddings().weight.shape
    examples = make_examples(builder, num_users, L, min(vocab, len(tokenizer) + 400), seed=0)
    cfg = lm.config
    n_layer = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    # 2D weights are matmuls (a tied input embedding is counted once: as the LM head); position tables are not
    matmul_params = sum(p.numel() for n, p in lm.named_parameters() if p.dim() == 2 and "wpe" not in n)

    # ------------------------------------------------------------------ naive reference (fp32)
    lm.float().requires_grad_(True)
    table = torch.nn.Parameter(torch.randn(num_users, builder.config.num_slots, D, device=device) * 0.02)
    opt = torch.optim.Adam([table], lr=1e-3)
    rng = np.random.default_rng(1)
    naive_batches = [rng.choice(num_users, B, replace=False) for _ in range(steps + 1)]
    naive_tokens = []

    def naive_step(i):
        batch = collate([examples[int(j)] for j in naive_batches[i]], builder.pad_token_id).to(device)
        embeds = lm.get_input_embeddings()(batch.input_ids)
        slot = batch.soft_slot_ids.clamp(min=0)[..., None].expand(-1, -1, D)
        embeds = torch.where(
            (batch.soft_slot_ids >= 0)[..., None], table[batch.user_ids.to(device)].gather(1, slot), embeds
        )
        out = lm(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            labels=batch.labels,
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm.zero_grad(set_to_none=True)
        if i:
            naive_tokens.append(batch.num_tokens)

    dt, mem = measure(naive_step, steps, device)
    results["naive_tok_s"] = np.mean(naive_tokens) / dt
    results["naive_mem_mb"] = mem
    print(
        f"[{name}] naive fp32: {dt * 1e3:.0f} ms/step, {results['naive_tok_s']:.0f} tokens/s, peak "
        f"+{mem:.0f} MB"
    )

    # ------------------------------------------------------------------ ours
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype_name in args.skip:
            continue
        freeze(lm).to(dtype)
        if dtype is torch.bfloat16 and torch.device(device).type == "cpu":
            lm.config._attn_implementation = "eager"  # measured faster than SDPA in bf16 on CPU (DESIGN.md)
        table = SoftTokenTable(num_users, builder.config.num_slots, D)
        model = ProfileModel(lm, table, builder.config)
        trainer = ProfileTrainer(
            model, examples, TrainConfig(batch_size=B, progress=False, checkpoint_every=0)
        )
        batches = plan_batches(examples.lengths, B, seed=0, epoch=0)
        stats = {"tokens": [], "padded": []}

        def our_step(i, trainer=trainer, batches=batches, stats=stats):
            _, tokens, _ = trainer._step([batches[i]])
            if i:
                stats["tokens"].append(tokens)
                stats["padded"].append(len(batches[i]) * int(examples.lengths[batches[i]].max()))

        dt, mem = measure(our_step, steps, device)
        tok_s = np.mean(stats["tokens"]) / dt
        T, Lb = np.mean(stats["padded"]), np.mean(stats["padded"]) / B
        flops = T * (4 * matmul_params + 12 * n_layer * Lb * D)
        mm = matmul_flops(B * L, D, dtype, device)
        results[f"ours_{dtype_name}_tok_s"] = tok_s
        results[f"ours_{dtype_name}_mem_mb"] = mem
        results[f"speedup_{dtype_name}"] = tok_s / results["naive_tok_s"]
        results[f"matmul_frac_{dtype_name}"] = flops / dt / mm
        print(
            f"[{name}] ours {dtype_name}: {dt * 1e3:.0f} ms/step, {tok_s:.0f} tokens/s "
            f"({tok_s / results['naive_tok_s']:.2f}x naive), peak +{mem:.0f} MB, "
            f"{flops / dt / 1e9:.1f} GFLOP/s = {flops / dt / mm:.0%} of matmul ({mm / 1e9:.1f} GFLOP/s)"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", nargs="*", default=[], help="fp32 / bf16 / stories / gpt2")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
        f"B={args.batch_size} L={args.seq_len} steps={args.steps}, load {os.getloadavg()[0]:.1f}"
    )
    summary = {}
    if STORIES.exists() and "stories" not in args.skip:
        tok = AutoTokenizer.from_pretrained(STORIES)
        r = bench_model("stories260K", lambda: load_causal_lm(STORIES, device=args.device), tok, args)
        summary.update({f"stories_{k}": v for k, v in r.items()})
    elif "stories" not in args.skip:
        print(f"stories260K skipped: {STORIES} not found")
    if "gpt2" not in args.skip:
        gpt2 = GPT2Config(n_positions=max(1024, args.seq_len))  # 124M shape: 12 x 768, vocab 50257
        r = bench_model(
            "gpt2-124M",
            lambda: load_causal_lm(gpt2, device=args.device, attn_implementation="sdpa"),
            word_tokenizer(),
            args,
        )
        summary.update({f"gpt2_{k}": v for k, v in r.items()})
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
