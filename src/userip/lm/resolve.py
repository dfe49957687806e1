"""``--lm`` values -> something ``AutoModelForCausalLM.from_pretrained`` accepts, and the one rule for
telling a local model path from a Hugging Face hub id."""

from __future__ import annotations

import os
from pathlib import Path

from userip.data.schema import Dataset
from userip.lm.gguf import SMOLLM2_SPEC, converted_folder, smollm2_gguf_path
from userip.lm.offline import default_cache_dir, load_or_build_random, load_or_pretrain
from userip.lm.offline_config import OFFLINE_SPEC, RANDOM_SPEC, OfflineLMConfig
from userip.prompts import PromptConfig
from userip.utils.config import ConfigError
from userip.utils.io import run_relative

NO_LM_SPEC = "none"  # --lm value: no LM at all (``userip.profile.no_lm``: the LLM's-share ablation)
# The built-in ``--lm`` values; anything else names a model folder, a ``.gguf`` file or a hub id.
BUILT_IN_LMS: dict[str, str] = {
    OFFLINE_SPEC: "a small LM pre-trained on the dataset's texts (cached in RUN/lm)",
    RANDOM_SPEC: "the offline LM's shape, untrained",
    SMOLLM2_SPEC: "SmolLM2 from its GGUF file, converted once",
    NO_LM_SPEC: "no LM: the profile stage trains the soft tokens by the surrogate + VQ loss alone",
}


def _built_ins() -> str:
    return ", ".join(repr(name) for name in BUILT_IN_LMS)


def is_no_lm(spec: object) -> bool:
    """Whether an ``lm.name_or_path`` / ``--lm`` value asks for no LM (``NO_LM_SPEC``): the one test of it."""
    return isinstance(spec, str) and spec.strip() == NO_LM_SPEC


def lm_as_recorded(spec: str, run_dir: str | os.PathLike[str]) -> str:
    """An ``lm.name_or_path`` as a run records it: ``none`` as it is (never a file of that name), else
    ``run_relative`` (relative to the run inside it: a copied run must not read the original's LM)."""
    return NO_LM_SPEC if is_no_lm(spec) else run_relative(spec, run_dir)


def looks_like_local_path(spec: str) -> bool:
    """Whether an LM name is meant as a local path (absolute, ``./``, ``~``, or with more than one ``/``)
    rather than a hub id (``gpt2``, ``org/name``); a path that does not exist is then an error, not a hub
    look-up."""
    return spec.startswith(("/", ".", "~")) or os.sep + os.sep in spec or spec.count("/") > 1


def resolve_lm(
    spec: str,
    dataset: Dataset | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    prompt_config: PromptConfig | None = None,
    config: OfflineLMConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> str:
    """Turn the CLI's ``--lm`` value into something ``AutoModelForCausalLM.from_pretrained`` accepts.

    ``offline`` (default): the cached pre-trained offline LM (built on first use). ``random``: the same shape,
    untrained (ablation). ``smollm2`` or a ``.gguf`` file: a GGUF model converted once to a plain model folder
    (``userip.lm.gguf``), cached by the file's SHA-256 in ``cache_dir`` or the user cache (shared by runs).
    Anything else is a local folder or a Hugging Face hub id (``gpt2``, ``meta-llama/Llama-2-7b-hf``) passed
    through unchanged. ``none`` names no model: only the profile stage accepts it (it branches before
    resolving); here it is a ``ConfigError``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--lm: expected {_built_ins()}, a model folder or a hub id; got {spec!r}")
    spec = spec.strip()
    if is_no_lm(spec):
        raise ConfigError(
            f"--lm {NO_LM_SPEC}: no LM to load; only the profile stage runs without one (its no-LM mode), "
            "this command needs an LM (offline, random, a model folder or a hub id)"
        )

    if spec == SMOLLM2_SPEC or spec.endswith(".gguf"):
        gguf_path = smollm2_gguf_path() if spec == SMOLLM2_SPEC else Path(spec).expanduser()
        return str(converted_folder(gguf_path, cache_dir if cache_dir is not None else default_cache_dir()))
    cache = cache_dir if cache_dir is not None else default_cache_dir(run_dir)
    if spec in (OFFLINE_SPEC, RANDOM_SPEC):
        if dataset is None:
            raise ConfigError(f"--lm {spec}: the {spec} LM is built from the dataset; none was given")
        if spec == OFFLINE_SPEC:
            return str(load_or_pretrain(dataset, prompt_config, config, cache, progress=progress))
        return str(load_or_build_random(dataset, prompt_config, config, cache))

    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"--lm {spec}: is a file; expected a model folder (with config.json)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--lm {spec}: folder has no config.json; expected a Hugging Face model folder "
                "(save_pretrained output)"
            )
        return str(path)
    if looks_like_local_path(spec):
        raise FileNotFoundError(f"--lm {spec}: no such model folder")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ConfigError(
            f"--lm {spec!r}: neither {_built_ins()}, an existing model folder, nor a valid hub id "
            "(such as 'gpt2' or 'meta-llama/Llama-2-7b-hf')"
        ) from None
    return spec  # a hub id: loaded (from the local HF cache when offline) by from_pretrained
