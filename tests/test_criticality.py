import pytest
import torch

from riftlab import Batches, adversarial_set, module_robust_criticality, weight_modules


@pytest.fixture(scope="module")
def adv(at_model, tiny_splits):
    source = Batches(tiny_splits.train.subset(256), 128)
    return adversarial_set(at_model, source, 8 / 255, 2 / 255, 5, seed=0)


def test_adversarial_set_is_fixed_and_valid(at_model, tiny_splits, adv):
    assert sum(len(y) for _, y in adv) == 256
    x_clean = tiny_splits.train.subset(256).float()
    x_adv = torch.cat([x for x, _ in adv])
    assert (x_adv - x_clean).abs().max() <= 8 / 255 + 1e-6
    again = adversarial_set(at_model, Batches(tiny_splits.train.subset(256), 128), 8 / 255, 2 / 255, 5, seed=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(adv, again))


def test_mrc_table_covers_every_module_within_the_ball(at_model, adv):
    table = module_robust_criticality(at_model, adv, eps=0.1, passes=2)
    names = [n for n, _ in weight_modules(at_model)]
    assert sorted(table["module"]) == sorted(names)
    assert list(table["mrc"]) == sorted(table["mrc"])
    assert (table["relative_change"] <= 0.1 + 1e-5).all()
    assert (table["mrc"] > 0).all()  # ascent raises the adversarial loss for every module
    sizes = dict((n, m.weight.numel()) for n, m in weight_modules(at_model))
    assert all(sizes[r.module] == r.params for r in table.itertuples())
    assert table["mrc"].iloc[-1] > 3 * table["mrc"].iloc[0]  # a real spread between modules
    assert (table["robust_acc_drop"] == table["robust_acc"] - table["perturbed_robust_acc"]).all()


def test_mrc_leaves_model_bit_identical(at_model, adv):
    at_model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in at_model.state_dict().items()}
    flags = [p.requires_grad for p in at_model.parameters()]
    module_robust_criticality(at_model, adv, passes=1, modules=["layer1.0.conv1", "linear"])
    assert all(torch.equal(v, before[k]) for k, v in at_model.state_dict().items())
    assert flags == [p.requires_grad for p in at_model.parameters()]
    assert all(p.grad is None for p in at_model.parameters())


def test_larger_ball_gives_larger_mrc(at_model, adv):
    small = module_robust_criticality(at_model, adv, eps=0.05, passes=2, modules=["layer3.0.conv2"])
    large = module_robust_criticality(at_model, adv, eps=0.2, passes=2, modules=["layer3.0.conv2"])
    assert large["mrc"].iloc[0] > small["mrc"].iloc[0] > 0
    zero = module_robust_criticality(at_model, adv, eps=0.0, passes=2, modules=["layer3.0.conv2"])
    assert zero["mrc"].iloc[0] == pytest.approx(0.0, abs=1e-6)


def test_zeroed_module_has_mrc_about_zero(at_model, adv):
    import copy

    model = copy.deepcopy(at_model)
    with torch.no_grad():
        dict(weight_modules(model))["layer4.1.conv2"].weight.zero_()
    table = module_robust_criticality(model, adv, passes=2).set_index("module")
    assert abs(table.loc["layer4.1.conv2", "mrc"]) < 1e-6
    # the conv feeding a zeroed conv is irrelevant too; every other module still matters
    assert abs(table.loc["layer4.1.conv1", "mrc"]) < 1e-6
    assert table["mrc"].drop(["layer4.1.conv1", "layer4.1.conv2"]).min() > 1e-4


def test_irrelevant_module_has_mrc_about_zero(at_model, adv):
    """A module whose output is multiplied by zero cannot change the loss, whatever its weights."""
    import copy

    model = copy.deepcopy(at_model)
    block = model.layer4[1]
    block.bn2.weight.data.zero_()
    block.bn2.bias.data.zero_()  # conv2's output is erased by its BatchNorm
    table = module_robust_criticality(model, adv, passes=2, modules=["layer4.1.conv2", "layer4.1.conv1"]).set_index("module")
    assert abs(table.loc["layer4.1.conv2", "mrc"]) < 1e-6
    assert abs(table.loc["layer4.1.conv1", "mrc"]) < 1e-6


def test_ranking_is_deterministic(at_model, adv):
    a = module_robust_criticality(at_model, adv, passes=1)
    b = module_robust_criticality(at_model, adv, passes=1)
    assert list(a["module"]) == list(b["module"])
    assert (a["mrc"].values == b["mrc"].values).all()


def test_unknown_module_lists_valid_names(at_model, adv):
    with pytest.raises(ValueError, match="valid modules: conv1, layer1.0.conv1"):
        module_robust_criticality(at_model, adv, modules=["layer9.conv"])
