"""userip.ctr.extend: an extended model starts as its base model, and only the new part learns."""

import pytest
import torch

from userip.ctr.data import SplitTensors
from userip.ctr.extend import ExtensionError, extend_model
from userip.ctr.features import FeatureMap, Field, FieldSource
from userip.ctr.models import build_model
from userip.ctr.trainer import CTRTrainerConfig, Trainer

BASE_FIELDS = (Field("user_id", 31, FieldSource.USER), Field("item_id", 17, FieldSource.ITEM))
NEW_FIELDS = (Field("hobby", 5, FieldSource.PROFILE), Field("background", 4, FieldSource.PROFILE))
SMALL = {"embedding_dim": 4}
EXTENDABLE = {
    "dcn": {"num_cross_layers": 2, "hidden_units": (8,)},
    "dcnv2": {"num_cross_layers": 2, "hidden_units": (8,)},
    "dcnv2_stacked": {"num_cross_layers": 2, "hidden_units": (8,), "structure": "stacked"},
    "dcnv2_mix": {"num_cross_layers": 1, "hidden_units": (8,), "low_rank": 2, "num_experts": 2},
    "dcn_cross_only": {"num_cross_layers": 2, "hidden_units": ()},
    "fm": {},
    "deepfm": {"hidden_units": (8,)},
    "lr": {},
}


def rows(fields: tuple[Field, ...], n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f.vocab_size, (n,), generator=g) for f in fields], dim=1)


def build(name: str, fields: tuple[Field, ...], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model_name = name.split("_")[0]
    kwargs = {**EXTENDABLE[name], **({} if model_name == "lr" else SMALL)}
    return build_model(model_name, FeatureMap(fields), **kwargs)


def perturb(model: torch.nn.Module) -> None:
    """Give every parameter (zero-initialised biases included) a value, as training would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("name", sorted(EXTENDABLE))
def test_extended_model_starts_as_its_base(name):
    base = build(name, BASE_FIELDS, seed=0)
    perturb(base)
    model = build(name, BASE_FIELDS + NEW_FIELDS, seed=1)
    x_ids = rows(BASE_FIELDS + NEW_FIELDS, 256, seed=2)
    masks = extend_model(base, model, x_ids[:8])
    base.eval(), model.eval()
    with torch.no_grad():  # rows never seen by the check inside extend_model
        torch.testing.assert_close(model(x_ids[8:]), base(x_ids[8:, :2]), atol=1e-5, rtol=1e-5)
    base_params = dict(base.named_parameters())
    for param_name, param in model.named_parameters():
        # Every base entry is somewhere in the extended parameter, exactly once.
        assert int(masks[param_name].sum()) == base_params[param_name].numel(), param_name
        assert torch.equal(
            param[masks[param_name]].sort().values, base_params[param_name].flatten().sort().values
        )


def test_only_the_new_entries_learn_and_the_start_competes_as_epoch0():
    base = build("dcn", BASE_FIELDS, seed=0)
    perturb(base)
    fields = BASE_FIELDS + NEW_FIELDS
    model = build("dcn", fields, seed=1)
    x_train = rows(fields, 512, seed=3)
    y_train = (x_train[:, 2] % 2).float()  # the label is carried by a new field only
    masks = extend_model(base, model, x_train[:64])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    config = CTRTrainerConfig(lr=0.05, batch_size=64, max_epochs=3, patience=3, embedding_weight_decay=0.01)
    fit = Trainer(model, config, masks).fit(
        SplitTensors(x_train, y_train), SplitTensors(x_train, y_train), start_is_candidate=True
    )
    assert fit.history[0].epoch == 0 and fit.history[0].train_loss is None
    assert fit.best_epoch >= 1 and fit.best_valid_auc > fit.history[0].valid_auc + 0.2
    for name, param in model.named_parameters():
        fixed = masks[name]
        assert torch.equal(param[fixed], before[name][fixed]), name  # weight decay included
        if (~fixed).any():
            assert not torch.equal(param[~fixed], before[name][~fixed]), name


def test_start_is_kept_when_no_epoch_beats_it_on_validation():
    fields = BASE_FIELDS + NEW_FIELDS
    torch.manual_seed(0)
    model = build_model("dcn", FeatureMap(fields), embedding_dim=4)
    x = rows(fields, 512, seed=4)
    y = (x[:, 2] % 2).float()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Validation labels are the training labels flipped: every epoch that learns the training rule loses.
    fit = Trainer(model, CTRTrainerConfig(lr=0.05, batch_size=64, max_epochs=3, patience=3)).fit(
        SplitTensors(x, y), SplitTensors(x, 1.0 - y), start_is_candidate=True
    )
    assert fit.best_epoch == 0 and all(r.valid_auc < fit.best_valid_auc for r in fit.history[1:])
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_extension_refuses_what_it_cannot_preserve():
    base = build("dcn", BASE_FIELDS, seed=0)
    x = rows(BASE_FIELDS + NEW_FIELDS, 16, seed=5)
    with pytest.raises(ExtensionError, match="PNN does not support"):
        extend_model(
            build_model("pnn", FeatureMap(BASE_FIELDS), embedding_dim=4),
            build_model("pnn", FeatureMap(BASE_FIELDS + NEW_FIELDS), embedding_dim=4),
            x,
        )
    with pytest.raises(ExtensionError, match="cannot extend a DCN into a FM"):
        extend_model(base, build("fm", BASE_FIELDS + NEW_FIELDS, seed=0), x)
    reordered = (BASE_FIELDS[1], BASE_FIELDS[0], *NEW_FIELDS)
    with pytest.raises(ExtensionError, match="followed by at least one new field"):
        extend_model(base, build("dcn", reordered, seed=0), x)
    with pytest.raises(ExtensionError, match="followed by at least one new field"):
        extend_model(base, build("dcn", BASE_FIELDS, seed=0), x[:, :2])
