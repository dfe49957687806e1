"""Throughput of a profile-training step vs a naive reference step, and achieved FLOP/s vs a plain matmul.

For each model (stories260K when ../shared exists; a GPT-2-124M-shaped model built from GPT2Config; with
``--models``, also the SmolLM2-135M and Llama-2-7B shapes, random weights from their configs):
  ours   ProfileTrainer._step: frozen LM, length-bucketed batches, row-wise Adam, logits only where needed
         (fp32, and bf16 weights cast once)
  naive  standard HF forward/backward with labels=..., every LM parameter requiring grad, dense Adam on the
         whole table, random (unbucketed) batches, fp32
Tokens/s counts real (non-padding) tokens. Peak memory: CUDA max allocated on GPU; on CPU the peak RSS growth
during the measured steps (sampled). FLOPs of our step: 4 * P * T (frozen: forward + input-gradient backward,
no weight gradients; P = matmul parameters incl. the LM head, T = padded tokens) + attention 12 * layers *
L * D
per token; compared with a (B*L, D) x (D, 4D) matmul timed in the same process and dtype, and (``mfu``)
with the card's bf16 matmul rate (an 8192^3 bf16 product on CUDA, 1024^3 on CPU) measured in the same
process: model-FLOPs utilisation (the recompute of ``--activation-checkpointing`` is not counted as work).

Usage: python bench/bench_profile.py [--batch-size 8] [--seq-len 128] [--steps 3] [--device cpu]
       python bench/bench_profile.py --device cuda --models gpt2,smollm2,llama2-7b --batch-size 64 \
           --seq-len 256 --no-naive --activation-checkpointing llama2-7b
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from userip.lm.tokenizer import build_tokenizer
from userip.profile.lm import freeze, load_causal_lm, use_tf32
from userip.profile.model import ProfileModel, SoftTokenTable
from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer, plan_batches
from userip.prompts import ExampleSet, PromptBuilder, PromptConfig, collate

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "stories260K"

# Shapes built from configs with random weights (the timings do not depend on the values).
SHAPES = {
    "gpt2": lambda seq_len: GPT2Config(n_positions=max(1024, seq_len)),  # 124M: 12 x 768, vocab 50257
    # SmolLM2-135M-Instruct (userip.lm.gguf): Llama architecture, 30 x 576, GQA 9/3 heads, vocab 49152, tied
    "smollm2": lambda seq_len: LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=max(2048, seq_len),
        tie_word_embeddings=True,
    ),
    # Llama-2-7B: 32 x 4096, MLP 11008, vocab 32000 (LlamaConfig's defaults)
    "llama2-7b": lambda seq_len: LlamaConfig(max_position_embeddings=max(4096, seq_len)),
    # CI: seconds on a CPU
    "tiny": lambda seq_len: LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(256, seq_len),
    ),
}


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


def random_lm(config, dtype: torch.dtype, device: str):
    """A frozen LM with random weights built directly on ``device`` in ``dtype`` (a 7B model is neither
    initialised on the CPU nor held there in fp32)."""
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return freeze(lm)


def peak_matmul_flops(device, dtype=torch.bfloat16) -> float:
    """The card's matmul rate in ``dtype``: a large square product (8192^3 on CUDA, 1024^3 on CPU)."""
    size = 8192 if torch.device(device).type == "cuda" else 1024
    repeats = 10 if torch.device(device).type == "cuda" else 3
    for _ in range(2):
        rate = matmul_flops(size, size, dtype, device, repeats, width=size)
    return rate


def matmul_flops(rows: int, dim: int, dtype, device, repeats: int = 10, width: int | None = None) -> float:
    width = width or 4 * dim
    a = torch.randn(rows, dim, dtype=dtype, device=device)
    b = torch.randn(dim, width, dtype=dtype, device=device)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * rows * dim * width * repeats / (time.perf_counter() - t0)


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
    # 2D weights are matmuls, except lookup tables: positions, and an input embedding that is not also the
    # LM head (a tied one is counted once, as the head)
    lookups = {id(lm.get_input_embeddings().weight)} - {id(lm.get_output_embeddings().weight)}
    matmul_params = sum(
        p.numel()
        for n, p in lm.named_parameters()
        if p.dim() == 2 and "wpe" not in n and id(p) not in lookups
    )

    if args.no_naive:
        results["naive_tok_s"] = float("nan")
    else:
        naive_reference(lm, builder, examples, num_users, D, args, results, name)
    # ------------------------------------------------------------------ ours
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype_name in args.skip:
            continue
        freeze(lm).to(dtype)
        if dtype is torch.bfloat16 and torch.device(device).type == "cpu":
            lm.config._attn_implementation = "eager"  # measured faster than SDPA in bf16 on CPU (DESIGN.md)
        table = SoftTokenTable(num_users, builder.config.num_slots, D, device=args.table_device or "cpu")
        model = ProfileModel(lm, table, builder.config)
        checkpointing = name in args.activation_checkpointing or "all" in args.activation_checkpointing
        config = ProfileTrainConfig(
            batch_size=B,
            progress=False,
            checkpoint_every=0,
            pad_to_multiple_of=args.pad_to_multiple_of,
            activation_checkpointing=checkpointing,
        )
        trainer = ProfileTrainer(model, examples, config)
        batches = plan_batches(examples.lengths, B, seed=0, epoch=0)
        stats = {"tokens": [], "padded": []}
        pad = trainer.pad_to_multiple_of

        def our_step(i, trainer=trainer, batches=batches, stats=stats, pad=pad):
            _, tokens, _ = trainer._step([batches[i]])
            if i:
                stats["tokens"].append(tokens)
                longest = -(-int(examples.lengths[batches[i]].max()) // pad) * pad
                stats["padded"].append(len(batches[i]) * longest)

        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        dt, mem = measure(our_step, steps, device)
        tok_s = np.mean(stats["tokens"]) / dt
        T, Lb = np.mean(stats["padded"]), np.mean(stats["padded"]) / B
        flops = T * (4 * matmul_params + 12 * n_layer * Lb * D)
        mm = matmul_flops(B * L, D, dtype, device)
        results[f"ours_{dtype_name}_tok_s"] = tok_s
        results[f"ours_{dtype_name}_mem_mb"] = mem
        results[f"speedup_{dtype_name}"] = tok_s / results["naive_tok_s"]
        results[f"matmul_frac_{dtype_name}"] = flops / dt / mm
        results[f"mfu_{dtype_name}"] = flops / dt / args.peak_bf16
        print(
            f"[{name}] ours {dtype_name}: {dt * 1e3:.0f} ms/step, {tok_s:.0f} tokens/s "
            f"({tok_s / results['naive_tok_s']:.2f}x naive), peak +{mem:.0f} MB, "
            f"{flops / dt / 1e9:.1f} GFLOP/s = {flops / dt / mm:.0%} of matmul ({mm / 1e9:.1f} GFLOP/s), "
            f"{flops / dt / args.peak_bf16:.0%} of the bf16 matmul rate"
            + (" (activation checkpointing)" if checkpointing else "")
        )
    return results


def naive_reference(lm, builder, examples, num_users, D, args, results, name) -> None:
    """Standard HF forward/backward with labels=, every LM parameter requiring grad, dense Adam, fp32."""
    device, B, steps = args.device, args.batch_size, args.steps
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--models",
        default="stories,gpt2",
        help=f"comma-separated: stories (../shared/models/stories260K) and shapes {', '.join(SHAPES)}",
    )
    parser.add_argument("--skip", nargs="*", default=[], help="fp32 / bf16 / stories / gpt2")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference (a 7B cannot)")
    parser.add_argument(
        "--activation-checkpointing",
        nargs="*",
        default=[],
        help="models (or 'all') whose steps recompute the decoder layers in the backward pass",
    )
    parser.add_argument("--pad-to-multiple-of", type=int, default=0, help="train.pad_to_multiple_of")
    parser.add_argument("--table-device", default="", help="default: the LM's device on CUDA, else cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":
        use_tf32(True)  # as load_causal_lm does for lm.tf32 (the default)
        args.table_device = args.table_device or args.device
    torch.manual_seed(0)
    args.peak_bf16 = peak_matmul_flops(args.device)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}"
        + (
            f" ({torch.cuda.get_device_name(args.device)})"
            if torch.device(args.device).type == "cuda"
            else ""
        )
        + f", B={args.batch_size} L={args.seq_len} steps={args.steps}, load {os.getloadavg()[0]:.1f}, "
        f"bf16 matmul {args.peak_bf16 / 1e12:.1f} TFLOP/s"
    )
    summary = {"peak_bf16_tflops": args.peak_bf16 / 1e12}
    for name in [m for m in args.models.split(",") if m and m not in args.skip]:
        if name == "stories":
            if not STORIES.exists():
                print(f"stories260K skipped: {STORIES} not found")
                continue
            tok = AutoTokenizer.from_pretrained(STORIES)
            r = bench_model("stories260K", lambda: load_causal_lm(STORIES, device=args.device), tok, args)
            summary.update({f"stories_{k}": v for k, v in r.items()})
            continue
        if name not in SHAPES:
            parser.error(f"--models: unknown {name!r} (stories or one of {', '.join(SHAPES)})")
        config = SHAPES[name](args.seq_len)
        label = "gpt2-124M" if name == "gpt2" else name
        r = bench_model(
            label, lambda config=config: random_lm(config, torch.float32, args.device), word_tokenizer(), args
        )
        summary.update({f"{name.replace('-', '_')}_{k}": v for k, v in r.items()})
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
