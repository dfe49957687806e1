"""Extend a trained CTR model with new fields without letting them cost anything: a function-preserving start.

``extend_model(base, model)`` copies a trained ``base`` (fields ``user_id``, ``item_id``) into ``model``, the
same architecture over those fields plus new ones appended after them (profile IDs, user attributes), so that
``model`` computes exactly ``base``'s logits. The new fields' embedding rows start at zero: a zero input adds
nothing to a concatenation read by linear layers or to a cross/FM interaction, while the weights that read it
stay random, so gradients reach the new rows. It returns a mask per parameter of the copied (base) entries,
which ``Trainer`` keeps fixed: only what reads the new fields learns, and the start is validation epoch 0. So
the extended model's validation AUC can only go up from the base model's; a field that carries nothing the
base lacks costs nothing, which joint training from scratch cannot promise (on sparse ML-100K every
user-level field, even the true attributes, lowered DCN's AUC when trained jointly).

Models declare ``extendable = True`` when their parameters that read the flattened field embeddings hold the
base fields' entries in a leading slice (new fields are appended), and name any parameter that does not in
``base_placements`` (DCN's combination layer reads ``[cross (F * D), deep (H)]``, so its deep columns move).
``extend_model`` checks the result numerically, so a model whose layout breaks the rule fails loudly.
"""

from __future__ import annotations

import torch

from userip.ctr.layers import OffsetEmbedding
from userip.ctr.models.base import CTRModel


class ExtensionError(ValueError):
    """The base model cannot be extended into this model (architecture, fields or layout differ)."""


def extend_model(base: CTRModel, model: CTRModel, check_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Load ``base`` into ``model`` so both give the same logits; returns {parameter name: bool mask of the
    entries copied from ``base``} (the entries to keep fixed).

    ``check_ids``: (N, F_model) rows of ``model``'s fields, used to verify that the extended model's logits
    equal the base model's on ``check_ids[:, :F_base]`` (within 1e-5).
    """
    if type(base) is not type(model):
        raise ExtensionError(f"cannot extend a {type(base).__name__} into a {type(model).__name__}")
    if not getattr(model, "extendable", False):
        raise ExtensionError(f"{type(model).__name__} does not support extension with new fields")
    base_fields, fields = base.feature_map.fields, model.feature_map.fields
    if fields[: len(base_fields)] != base_fields or len(fields) == len(base_fields):
        raise ExtensionError(
            f"the model's fields {model.feature_map.names} must be the base's {base.feature_map.names} "
            "(same vocabularies) followed by at least one new field"
        )
    base_params = dict(base.named_parameters())
    placements = model.base_placements(base)
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            old = base_params.get(name)
            if old is None:
                raise ExtensionError(f"parameter {name!r} has no counterpart in the base model")
            index = placements.get(name) or tuple(slice(0, n) for n in old.shape)  # leading slice
            if param[index].shape != old.shape:
                raise ExtensionError(
                    f"parameter {name!r}: base {tuple(old.shape)} does not fit {param.shape}"
                )
            param[index] = old
            mask = torch.zeros_like(param, dtype=torch.bool)
            mask[index] = True
            masks[name] = mask
        # New fields' rows start at zero (their vocabularies follow the base's in every offset table).
        base_rows = sum(f.vocab_size for f in base_fields)
        for module in model.modules():
            if isinstance(module, OffsetEmbedding):
                module.weight[base_rows:] = 0.0
        base_was, model_was = base.training, model.training
        base.eval(), model.eval()
        expected = base(check_ids[:, : len(base_fields)])
        got = model(check_ids)
        base.train(base_was), model.train(model_was)
    if not torch.allclose(expected, got, atol=1e-5, rtol=1e-5):
        diff = float((expected - got).abs().max())
        raise ExtensionError(
            f"{type(model).__name__}: the extended model's logits differ from the base model's by up to "
            f"{diff:.2e}; its layout does not keep the base fields' entries where extend_model puts them"
        )
    return masks
