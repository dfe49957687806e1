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
    through unchanged.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--lm: expected 'offline', 'random', a model folder or a hub id; got {spec!r}")
    spec = spec.strip()

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
            f"--lm {spec!r}: neither 'offline', 'random', an existing model folder, nor a valid hub id "
            "(such as 'gpt2' or 'meta-llama/Llama-2-7b-hf')"
        ) from None
    return spec  # a hub id: loaded (from the local HF cache when offline) by from_pretrained
