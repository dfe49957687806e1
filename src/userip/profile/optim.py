"""Row-wise (lazy) AdamW for the per-user soft-token table.

Why not dense Adam: its step touches every row (100k users: 2.7 s per step, DESIGN.md) and momentum keeps
moving
rows that are not in the batch. Why not ``torch.optim.SparseAdam``: it needs the table to be an
``nn.Embedding(sparse=True)`` parameter on the device where the gradient is computed, while our table may
stay on
CPU with the LM on GPU; it also uses one global step count, so the bias correction of a user seen once per
epoch is
wrong. This one keeps per-row moments and a per-row step count and only reads and writes the rows of a step:
cost O(rows in the batch), independent of the number of users.
"""

from __future__ import annotations

import torch


class RowAdam:
    def __init__(
        self,
        table: torch.Tensor,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.table = table  # (U, ...) fp32, updated in place
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avg = torch.zeros_like(table)
        self.exp_avg_sq = torch.zeros_like(table)
        self.row_steps = torch.zeros(table.shape[0], dtype=torch.int64, device=table.device)

    @torch.no_grad()
    def step(self, row_ids: torch.Tensor, grads: torch.Tensor) -> None:
        """``row_ids`` (R,) unique; ``grads`` (R, ...) their gradients (any device)."""
        device = self.table.device
        # non_blocking: a host index goes to the GPU without waiting for the device; a GPU gradient going to a
        # CPU table must be complete before it is read, so that copy blocks.
        row_ids = row_ids.to(device, non_blocking=True)
        grads = grads.to(device, torch.float32)
        beta1, beta2 = self.betas
        steps = self.row_steps[row_ids] + 1  # (R,)
        self.row_steps[row_ids] = steps
        shape = (-1,) + (1,) * (grads.dim() - 1)
        m = self.exp_avg[row_ids].mul_(beta1).add_(grads, alpha=1 - beta1)
        v = self.exp_avg_sq[row_ids].mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        self.exp_avg[row_ids] = m
        self.exp_avg_sq[row_ids] = v
        bias1 = (1 - beta1 ** steps.double()).float().view(shape)
        bias2 = (1 - beta2 ** steps.double()).float().view(shape)
        rows = self.table[row_ids]
        if self.weight_decay:
            rows.mul_(1 - self.lr * self.weight_decay)
        rows.addcdiv_(m / bias1, (v / bias2).sqrt_().add_(self.eps), value=-self.lr)
        self.table[row_ids] = rows

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "row_steps": self.row_steps}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in self.state_tensors().items():
            if tensors[name].shape != value.shape:
                raise ValueError(
                    f"RowAdam state {name!r}: shape {tuple(tensors[name].shape)}, "
                    f"expected {tuple(value.shape)}"
                )
            value.copy_(tensors[name])
