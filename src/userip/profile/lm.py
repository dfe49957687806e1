"""Loading and freezing the causal LM (any ``AutoModelForCausalLM``: GPT-2, Llama, ... or one built from a
config)."""

from __future__ import annotations

import dataclasses
import enum
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from userip.lm.resolve import looks_like_local_path
from userip.utils.artifacts import check_recorded_folder
from userip.utils.config import ConfigError, check_device, check_fields, choice

log = logging.getLogger(__name__)


class DType(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"

    @property
    def torch(self) -> torch.dtype:
        return {DType.FP32: torch.float32, DType.BF16: torch.bfloat16}[self]


class AttnImpl(enum.Enum):
    AUTO = "auto"  # eager for bf16 on CPU (measured faster there, DESIGN.md), else sdpa
    EAGER = "eager"
    SDPA = "sdpa"


class LMLoadError(ValueError):
    """The model path or name does not give a causal LM; the message says which and why."""


AUTO_TABLE_DEVICE = "auto"
# ``table_device: auto`` keeps the soft-token table and its RowAdam state (3 fp32 copies + row steps) on the
# LM's GPU when they take at most this share of its free memory; else on the CPU (100k users x 3 slots x
# 4096 dims x 3 copies = 14.7 GB stays on the host of an 80 GB card holding a 7B LM).
AUTO_TABLE_MAX_FREE_SHARE = 0.25


@dataclasses.dataclass
class LMConfig:
    """Which frozen LM to load and where it runs.

    ``table_device`` holds the per-user soft-token table and its optimizer state: ``auto`` (default) puts
    them on the LM's device when they fit (``AUTO_TABLE_MAX_FREE_SHARE`` of its free memory), so a GPU step
    gathers and updates rows without host copies; ``cpu`` or ``cuda[:N]`` force a place.
    ``tf32``: fp32 matmuls on CUDA use TF32 tensor cores (measured 46k -> 85k tokens/s for a GPT-2 shape on
    an H100; 10-bit mantissa inputs, fp32 accumulation); no effect on CPU.
    """

    name_or_path: str = ""
    dtype: DType = DType.FP32
    device: str = "cpu"
    table_device: str = AUTO_TABLE_DEVICE
    attn_implementation: AttnImpl = AttnImpl.AUTO
    tf32: bool = True

    def __post_init__(self) -> None:
        self.dtype = choice(DType, self.dtype, "lm.dtype")  # type: ignore[assignment]
        self.attn_implementation = choice(AttnImpl, self.attn_implementation, "lm.attn_implementation")  # type: ignore[assignment]
        check_fields(self, flags=("tf32",), where="lm")
        check_device(self.device, "lm.device")
        if self.table_device != AUTO_TABLE_DEVICE:
            try:
                check_device(self.table_device, "lm.table_device")
            except ConfigError as e:
                raise ConfigError(f"{e} (or '{AUTO_TABLE_DEVICE}')") from None

    def resolved_table_device(self, num_users: int, num_slots: int, hidden_size: int) -> str:
        """Where the (num_users, num_slots, hidden_size) table and its RowAdam state live (see the class)."""
        if self.table_device != AUTO_TABLE_DEVICE:
            return self.table_device
        return auto_table_device(self.device, num_users * num_slots * hidden_size)

    def resolved_attn(self) -> str:
        if self.attn_implementation is not AttnImpl.AUTO:
            return self.attn_implementation.value
        return "eager" if self.dtype is DType.BF16 and torch.device(self.device).type == "cpu" else "sdpa"


def auto_table_device(lm_device: str | torch.device, table_elements: int) -> str:
    """``table_device: auto``: the LM's device when it is a GPU and the table + RowAdam state (3 fp32 copies
    and an int64 step per row) fit in ``AUTO_TABLE_MAX_FREE_SHARE`` of its free memory; else ``cpu``."""
    device = torch.device(lm_device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    free, _ = torch.cuda.mem_get_info(device)
    needed = 3 * 4 * table_elements
    if needed <= AUTO_TABLE_MAX_FREE_SHARE * free:
        return str(device)
    log.info("soft-token table + optimizer state (%.1f GB) stay on the CPU: over %.0f%% of the GPU's "
             "free %.1f GB", needed / 1e9, 100 * AUTO_TABLE_MAX_FREE_SHARE, free / 1e9)  # fmt: skip
    return "cpu"


def use_tf32(enabled: bool) -> None:
    """fp32 matmuls (and convolutions) on CUDA through TF32 tensor cores, or not (a process-wide switch)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No weight gradient is ever computed (cuts forward+backward ~31%, DESIGN.md); eval mode disables
    dropout."""
    model.requires_grad_(False)
    model.eval()
    return model


def load_causal_lm(
    source: str | Path | PretrainedConfig,
    dtype: DType | str = DType.FP32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    tf32: bool = True,
) -> PreTrainedModel:
    """Load (name/path) or build (config) a causal LM, cast it once to ``dtype``, move it and freeze it.
    On CUDA, ``tf32`` sets the TF32 switch for fp32 matmuls (``use_tf32``)."""
    dtype = choice(DType, dtype, "dtype")
    check_device(str(device), "device")
    if torch.device(device).type == "cuda":
        use_tf32(tf32)
    if isinstance(source, PretrainedConfig):
        try:
            model = AutoModelForCausalLM.from_config(source, attn_implementation=attn_implementation)
        except ValueError as e:
            raise LMLoadError(f"config of type {type(source).__name__} is not a causal LM config: {e}") from e
    else:
        model = _from_pretrained(str(source), attn_implementation)
    model.to(device=device, dtype=dtype.torch)
    return freeze(model)


def _from_pretrained(name_or_path: str, attn_implementation: str) -> PreTrainedModel:
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or looks_like_local_path(name_or_path)
    if looks_local and not path.exists():
        raise LMLoadError(f"LM path {name_or_path!r} does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        raise LMLoadError(f"LM path {name_or_path!r} has no config.json; not a Hugging Face model folder")
    if path.is_dir():
        verify_lm_folder(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path) if looks_local else name_or_path, attn_implementation=attn_implementation
        )
    except SafetensorError as e:  # truncated or corrupt weights: name the folder, not only the reader's error
        raise LMLoadError(f"{name_or_path}: LM weights are not a readable safetensors file ({e})") from e
    except ValueError as e:  # transformers: "Unrecognized configuration class ... for AutoModelForCausalLM"
        reason = str(e).split("Model type should be")[0].strip()  # drop transformers' list of 200 classes
        raise LMLoadError(f"{name_or_path!r} is not a causal language model ({reason})") from e
    except OSError as e:  # not on disk and not in the hub cache (no network here)
        raise LMLoadError(
            f"could not load LM {name_or_path!r}: not a local model folder and not available from "
            f"the Hugging Face Hub or its cache ({e})"
        ) from e


def verify_lm_folder(path: Path) -> None:
    """A folder userip wrote (the offline / random LM, a converted GGUF: its manifest holds every file's
    SHA-256) is checked against those hashes before it is loaded, on every path that loads it (profile stage,
    ``--new-users``, ``explain``, the LLM baselines): a flipped, noised or truncated file is a
    ``CorruptArtifactError`` naming the file, never a silently different model. Other folders (a local
    Hugging Face model) record no hashes and are loaded as they are."""
    from userip.lm.gguf import CONVERTED_MANIFEST
    from userip.lm.offline import LM_MANIFEST  # the cache modules name their manifests

    for manifest in (LM_MANIFEST, CONVERTED_MANIFEST):
        if (path / manifest).is_file():
            check_recorded_folder(path, manifest, "LM folder")


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The LM's tokenizer. A missing pad token is fine: ``PromptBuilder.pad_token_id`` falls back to
    eos/unk."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise LMLoadError(f"could not load a tokenizer from {str(name_or_path)!r} ({e})") from e
    if tokenizer.pad_token_id is None:
        log.info(
            "tokenizer has no pad token; padding uses eos/unk ids (padding is masked and never labelled)"
        )
    return tokenizer
