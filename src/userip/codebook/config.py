"""Configuration of profile quantization + surrogate recommender (the ``quantization:`` section of a recipe).

Keys equal the arguments of ``userip.codebook.objective.build_joint_objective``. The learning rate and the
user batch size of Algorithm 1 belong to the profile trainer's config (the trainer optimizes these modules
with the soft tokens); paper values: AdamW, lr 1e-3, batch 128.
"""

from __future__ import annotations

import dataclasses
import math

from userip.codebook.quantizer import CodebookInit
from userip.utils.config import ConfigError, check_fields, choice


@dataclasses.dataclass
class QuantizationConfig:
    loss_weight: float = 0.001  # lambda of eq. 7: L = L_LM + lambda * (L_VQ + L_rec)
    beta: float = 0.001  # commitment weight of eq. 5
    without_vq: bool = False  # ablation: surrogate on continuous (projected) profiles, no codebook loss
    codebook_init: CodebookInit = CodebookInit.KMEANS
    dead_code_threshold: int = 20  # training steps without a hit before a code is revived; 0 = never
    kmeans_init_samples: int = (
        256  # profiles buffered before the k-means init (capped at the number of users)
    )
    kmeans_iters: int = 20
    # Final IDs: per-code offsets (ProfileQuantizer.fit_balance) so every code holds >= this share of the
    # users; 0 = plain nearest code. Must be < 1/K for a codebook of K codes (checked where K is known).
    balance_min_share: float = 0.05
    interactions_per_user: int = 8  # training interactions sampled per user and mini-batch for L_rec
    surrogate_proj_dim: int = 8  # width each profile vector is projected to before the DCN
    surrogate_embed_dim: int = 8
    surrogate_cross_layers: int = 3
    surrogate_mlp_dims: tuple[int, ...] = (16, 16)
    surrogate_dropout: float = 0.0
    use_user_features: bool = False  # add the dataset's observable user columns (e.g. age, gender) to the DCN
    seed: int = 0
    # Residual quantization (``userip.codebook.residual``): codes per profile; level l > 0 quantizes what the
    # levels before it leave, and its codes are the extra bank / CTR field ``<profile>_r<l>``. 1 = one code.
    num_levels: int = 1
    # Codebook sizes of levels 1 .. num_levels - 1 (the same for every profile); empty = each level the size
    # of its profile's codebook.
    residual_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.codebook_init = choice(CodebookInit, self.codebook_init, "quantization.codebook_init")  # type: ignore[assignment]
        self.surrogate_mlp_dims = tuple(self.surrogate_mlp_dims)
        self.residual_sizes = tuple(self.residual_sizes)
        check_fields(
            self,
            nonnegative_numbers=("loss_weight", "beta"),
            counts=(
                "dead_code_threshold",
                "kmeans_iters",
                "surrogate_cross_layers",
            ),  # threshold 0: no revival
            int_ranges={"kmeans_init_samples": (2, None), "num_levels": (1, None)},
            positive_ints=("interactions_per_user", "surrogate_proj_dim", "surrogate_embed_dim"),
            fractions=("surrogate_dropout",),
            where="quantization",
        )
        if not (_is_real(self.balance_min_share) and 0.0 <= self.balance_min_share < 0.5):
            raise ConfigError(
                "quantization.balance_min_share must be in [0, 1/K) for the smallest codebook of K >= 2 "
                f"codes (0 disables balancing), got {self.balance_min_share!r}"
            )
        if not all(d >= 1 for d in self.surrogate_mlp_dims):
            raise ConfigError(
                f"quantization.surrogate_mlp_dims: every width must be >= 1, got {self.surrogate_mlp_dims!r}"
            )
        self.balance_min_share = float(self.balance_min_share)
        if self.residual_sizes and (
            len(self.residual_sizes) != self.num_levels - 1
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in self.residual_sizes)
        ):
            raise ConfigError(
                f"quantization.residual_sizes: one codebook size >= 2 per level after the first "
                f"({self.num_levels - 1} for num_levels {self.num_levels}), or empty; "
                f"got {list(self.residual_sizes)}"
            )
        if self.without_vq and self.num_levels > 1:
            raise ConfigError(
                "quantization.num_levels > 1 quantizes residuals of codebooks; without_vq has none (set "
                "num_levels: 1)"
            )

    def check_distributed(self) -> None:
        """What the distributed profile stage (``userip.profile.distributed``) cannot do yet: refused before
        any work, with a ``ConfigError``."""
        if self.num_levels > 1:
            raise ConfigError(
                f"quantization.num_levels: num_levels > 1 is single-process only for now (got "
                f"{self.num_levels}); run the profile stage without --distributed / torchrun, or set "
                "num_levels: 1"
            )

    def check_codebook_sizes(self, sizes: list[int]) -> None:
        """``balance_min_share`` against the codebooks (every level's): every code >= share needs
        share < 1/K."""
        too_big = [k for k in sizes if self.balance_min_share >= 1.0 / k]
        if too_big:
            raise ConfigError(
                f"quantization.balance_min_share: must be < 1/K for a codebook of K codes; "
                f"{self.balance_min_share!r} >= 1/{max(too_big)}"
            )

    def for_codebook_sizes(self, main_sizes: list[int], sizes: list[int]) -> QuantizationConfig:
        """This config for codebooks of ``sizes`` instead of ``main_sizes`` (a codebook-size sweep, profile
        by profile). The balance floor is kept where every size allows it (< 1/K); where a size does not (a
        5% floor and 27 or 81 codes), it becomes the fraction of the uniform share 1/K that it is of the main
        codebooks' (share * K_main / K, the tightest profile), instead of failing after the stage trained.
        The sweeps of the paper's figures run 3 to 81 codes with one config."""
        if not self.balance_min_share or all(self.balance_min_share < 1.0 / k for k in sizes):
            return self
        share = self.balance_min_share * min(k0 / k for k0, k in zip(main_sizes, sizes, strict=True))
        return dataclasses.replace(self, balance_min_share=share)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
