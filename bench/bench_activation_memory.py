"""Activation memory a frozen Llama-shaped LM keeps for the input-gradient backward, per token and layer.

The memory math of ``ProfileModel.set_activation_checkpointing`` (a Llama-2-7B shape at batch 64 x 256 needs
activation checkpointing on an 80 GB card) rests on this number: the bytes autograd saves (saved-tensor
hooks; parameters and buffers excluded, each storage once) with 2 layers minus with 1, per token, in bf16, at
the 7B's MLP/width ratio (11008 / 4096) and two widths, to show it scales with D. Runs on a CPU in seconds.
Note: CPU attention keeps its probabilities (heads x L per token); the GPU's memory-efficient kernel does not.

Usage: python bench/bench_activation_memory.py [--seq-len 256]
Ends with: RESULT d_values_per_token_layer=... kb_per_token_layer_7b=... gb_7b_64x256=...
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from userip.profile.lm import freeze

LLAMA2_7B = {"hidden": 4096, "mlp": 11008, "layers": 32}


def saved_bytes(hidden: int, mlp: int, layers: int, seq_len: int) -> int:
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=max(512, seq_len),
    )
    lm = freeze(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa"))
    weights = {t.untyped_storage().data_ptr() for t in [*lm.parameters(), *lm.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(1, seq_len, hidden, dtype=torch.bfloat16, requires_grad=True)  # soft tokens lead in
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm(inputs_embeds=x, logits_to_keep=1, use_cache=False)
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    ratio = LLAMA2_7B["mlp"] / LLAMA2_7B["hidden"]
    per_d = []
    for hidden in (256, 512):
        mlp = round(hidden * ratio)
        per_layer = saved_bytes(hidden, mlp, 2, args.seq_len) - saved_bytes(hidden, mlp, 1, args.seq_len)
        per_token = per_layer / args.seq_len
        per_d.append(per_token / (2 * hidden))
        print(
            f"D={hidden} MLP={mlp}: {per_token:.0f} bytes per token and layer = {per_d[-1]:.2f} D bf16 values"
        )
    kb_7b = per_d[-1] * 2 * LLAMA2_7B["hidden"] / 1e3
    gb = kb_7b * 1e3 * LLAMA2_7B["layers"] * 64 * 256 / 1e9
    print(
        f"Llama-2-7B shape: {kb_7b:.0f} kB per token and layer; batch 64 x 256 keeps {gb:.1f} GB "
        "(CPU attention)"
    )
    print(
        f"RESULT d_values_per_token_layer={per_d[-1]:.2f} kb_per_token_layer_7b={kb_7b:.0f} "
        f"gb_7b_64x256={gb:.1f}"
    )


if __name__ == "__main__":
    main()
