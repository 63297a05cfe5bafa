import pytest
import torch

from riftlab import Batches, finetune_module


@pytest.fixture(scope="module")
def train_batches(tiny_splits):
    return Batches(tiny_splits.train.subset(512), 64, shuffle=True, augment=True, seed=0)


def test_only_the_chosen_weight_changes(at_model, train_batches, tiny_splits):
    before = {k: v.clone() for k, v in at_model.state_dict().items()}
    result = finetune_module(at_model, "layer2.1.conv2", train_batches, epochs=2, lr=0.01)
    after = result.model.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed == ["layer2.1.conv2.weight"]
    # the input model is untouched
    assert all(torch.equal(v, before[k]) for k, v in at_model.state_dict().items())
    assert result.module == "layer2.1.conv2" and len(result.history) == 2


def test_reference_bn_behaviour_lets_every_bn_statistic_drift(at_model, train_batches):
    before = at_model.state_dict()
    result = finetune_module(at_model, "layer2.1.conv2", train_batches, epochs=1, lr=0.01, update_bn_stats=True)
    after = result.model.state_dict()
    drifted = [k for k in after if k.endswith("running_mean") and not torch.equal(after[k], before[k])]
    assert "bn1.running_mean" in drifted and "layer4.1.bn2.running_mean" in drifted
    params = dict(result.model.named_parameters())
    assert [n for n in params if not torch.equal(params[n], before[n])] == ["layer2.1.conv2.weight"]


def test_exact_name_match_not_substring(at_model, train_batches):
    result = finetune_module(at_model, "conv1", train_batches, epochs=1, lr=0.01)
    before = at_model.state_dict()
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["conv1.weight"]  # not layer1.0.conv1, layer2.0.conv1, ...


def test_unknown_module_lists_valid_names(at_model, train_batches):
    with pytest.raises(ValueError, match=r"unknown module 'layer2\.1\.conv9'; valid modules: conv1, layer1\.0\.conv1, .*linear"):
        finetune_module(at_model, "layer2.1.conv9", train_batches, epochs=1)
    with pytest.raises(ValueError, match="unknown module 'layer2.1.bn1'"):
        finetune_module(at_model, "layer2.1.bn1", train_batches, epochs=1)  # BN has no conv/linear weight


def test_best_validation_epoch_is_kept(at_model, train_batches, tiny_splits):
    val = Batches(tiny_splits.val, 250)
    result = finetune_module(at_model, "linear", train_batches, val, epochs=3, lr=0.05)
    accs = [h["val_clean_acc"] for h in result.history]
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    assert result.best_epoch == max(range(1, 4), key=lambda i: (accs[i], -i))  # epoch 0 is the AT model: not a candidate
    from riftlab import accuracy

    assert accuracy(result.model, val) == pytest.approx(max(accs[1:]))


def test_clean_finetuning_improves_clean_training_loss(at_model, train_batches):
    import torch.nn.functional as F

    x, y = next(iter(Batches(train_batches_data(train_batches), 512)))
    with torch.no_grad():
        loss_before = F.cross_entropy(at_model(x), y).item()
    tuned = finetune_module(at_model, "linear", train_batches, epochs=3, lr=0.05).model
    with torch.no_grad():
        loss_after = F.cross_entropy(tuned(x), y).item()
    assert loss_after < loss_before


def train_batches_data(batches):
    from riftlab import ImageSet

    return ImageSet(batches.images, batches.labels)
