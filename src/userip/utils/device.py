"""Host-to-device copies that do not make the host wait for the device."""

from __future__ import annotations

import numpy as np
import torch


def host_to_device(
    array: np.ndarray, device: torch.device | str, dtype: np.dtype | type | None = None
) -> torch.Tensor:
    """A host numpy array (cast to ``dtype`` if given) on ``device`` without waiting for the device.

    ``non_blocking``: the host buffer is staged at once (pageable memory is copied into a staging buffer
    before the call returns, so ``array`` may be freed), and later kernels are ordered after the copy on the
    same stream. A plain ``.to(device)`` would synchronise the stream. On the CPU it is ``torch.from_numpy``.
    """
    host = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))
    return host.to(device, non_blocking=True)
