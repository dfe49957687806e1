"""The codebook package's named error and its codebook-size check (a module of their own, so that
``quantizer`` and ``residual`` both use them without importing each other in a circle)."""

from __future__ import annotations


class CodebookError(ValueError):
    """A codebook argument is invalid (size below 2, bad shape, unknown profile)."""


def check_codebook_size(size: int, where: str = "codebook_size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise CodebookError(
            f"{where}: a codebook needs at least 2 codes (one code carries no information), got {size!r}"
        )
    return size
