"""BatchNorm folded into the convolution before it (riftlab.compute.fold_batchnorm, evaluate's fold_bn).

The folded copy is the eval-mode network up to rounding. Tolerances, fp32 on the CPU: logits within 1e-4 of the
logit scale (max(1, max |logit|); measured: about 1e-7), input gradients of the cross-entropy within 1e-4 relative
l2 distance (measured: about 3e-7), and PGD's per-image outcome different on at most one image of a batch (an image
whose margin is within rounding can flip; none did when measured). The pairs it folds are checked against the
dataflow of a real forward pass: a pair is a BatchNorm whose input is the very tensor a convolution returned.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from riftlab import Batches, ImageSet, build_model, evaluate, interpolation_curve, pgd
from riftlab.compute import fold_batchnorm
from riftlab.models import conv_bn_pairs

LOGIT_TOL = 1e-4  # times max(1, max |logit|)
GRAD_TOL = 1e-4  # relative l2 distance of the input gradients
FLIPS = 1  # images of a batch whose PGD outcome rounding may decide


def with_statistics(name: str, width: int, images: torch.Tensor, seed: int = 0, centred: bool = True) -> nn.Module:
    """``name`` at ``width`` with BatchNorm statistics and affine parameters far from their initial 0 / 1: random
    gamma and beta, running statistics from train-mode passes over ``images`` (float, (N, 3, 32, 32)); in eval mode.

    ``centred``: the classifier centred and scaled on the images' features, so that the predictions spread over the
    classes and a small PGD budget flips some of them (an untrained net gives every image one class: its pooled
    features vary across images by about 1/500 of their mean). That scaling multiplies the features' rounding by
    about 500 in the logits, so the logit and gradient tolerances are checked on the net as built (``centred=False``)."""
    torch.manual_seed(seed)
    model = build_model(name, 10, 3, 32, width)
    features = []
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    hook = classifier.register_forward_pre_hook(lambda m, a: features.append(a[0]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for chunk in images.split(len(images) // 3):
            model(chunk)
        model.eval()
        features.clear()
        model(images)
        f = features[0]
        if centred:
            classifier.weight.div_(f.std(0).clamp_min(1e-6))
            classifier.bias.copy_(-(classifier.weight @ f.mean(0)))
    hook.remove()
    return model


@pytest.fixture(scope="module")
def images(tiny_splits) -> torch.Tensor:
    """192 synthetic CIFAR-shaped test images, float in [0, 1]."""
    return tiny_splits.test.images[:192].float() / 255


def dataflow_pairs(model: nn.Module) -> set[tuple[str, str]]:
    """(conv, bn) names where, in a forward pass, the BatchNorm's input is the tensor the convolution returned and
    nothing else reads that tensor (counted on the autograd graph: the operations that take it as an input)."""
    outputs, inputs = {}, {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
              for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    logits = model(torch.rand(2, 3, 32, 32, requires_grad=True))
    for h in hooks:
        h.remove()
    readers: dict[int, int] = {}
    seen, todo = {id(logits.grad_fn): logits.grad_fn}, [logits.grad_fn]  # the nodes stay referenced, so ids stay theirs
    while todo:
        for parent, _ in todo.pop().next_functions:
            if parent is not None:
                readers[id(parent)] = readers.get(id(parent), 0) + 1
                if id(parent) not in seen:
                    seen[id(parent)] = parent
                    todo.append(parent)
    return {(c, b) for b, x in inputs.items() for c, out in outputs.items() if x is out and readers[id(out.grad_fn)] == 1}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, width, expected", [("resnet18", 8, 20), ("preact_resnet18", 8, 8), ("wrn34_10", 1, 16)])
def test_the_pairs_are_the_dataflow_of_each_block_type(name, width, expected):
    """ResNet-18: stem, two per block and three projection shortcuts (20); pre-activation ResNet-18: conv1 -> bn2 of
    each block (8; its stem's output also feeds the first block's identity shortcut); WRN-34: conv1 -> bn2 of its 15
    blocks and the stem -> the first block's bn1 (its shortcut is a projection of the pre-activated input)."""
    model = build_model(name, 10, 3, 32, width)
    pairs = conv_bn_pairs(model)
    assert len(pairs) == len(set(pairs)) == expected
    assert set(pairs) == dataflow_pairs(model)
    if name == "resnet18":
        assert {("conv1", "bn1"), ("layer1.0.conv2", "layer1.0.bn2"), ("layer2.0.shortcut.0", "layer2.0.shortcut.1")} <= set(pairs)
    if name == "preact_resnet18":
        assert ("layer1.0.conv1", "layer1.0.bn2") in pairs and not any(bn.endswith("bn1") for _, bn in pairs)


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
def test_folded_model_gives_the_same_logits_and_input_gradients(name, images):
    model = with_statistics(name, 8, images, centred=False)
    before = state(model)
    flags = [p.requires_grad for p in model.parameters()]
    folded = fold_batchnorm(model)
    assert folded is not model and folded.folded_batchnorms == len(conv_bn_pairs(model))
    remaining = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert remaining == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - folded.folded_batchnorms
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())

    x = images[:64]
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert (out - ref).abs().max() <= LOGIT_TOL * max(1.0, ref.abs().max().item())
    y = ref.argmax(1)
    grads = []
    for net in (model, folded):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(xg), y), xg)
        grads.append(g)
    assert grads[0].norm() > 0 and (grads[1] - grads[0]).norm() <= GRAD_TOL * grads[0].norm()

    after = model.state_dict()  # the original: bit for bit as it was, its flags and mode too
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_pgd_from_the_same_start_gives_the_same_outcome_per_image(images):
    """riftlab's PGD (same generator, so the same random start) on the model and on its folded copy: the same images
    survive, up to FLIPS of 64; labels are the clean predictions, so every image starts correct and the attack decides."""
    model = with_statistics("resnet18", 8, images)
    folded = fold_batchnorm(model)
    x = images[64:128]
    with torch.no_grad():
        y = model(x).argmax(1)
    survived = []
    for net in (model, folded):
        adv = pgd(net, x, y, 0.5 / 255, 0.125 / 255, 5, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            survived.append(net(adv).argmax(1) == y)
    assert 0 < int(survived[0].sum()) < len(y), "the attack must break some images and not others, or the check is empty"
    assert int((survived[0] != survived[1]).sum()) <= FLIPS


def test_refolding_into_the_copy_keeps_its_storage_and_follows_the_weights(images):
    model = with_statistics("resnet18", 4, images, centred=False)
    folded = fold_batchnorm(model)
    where = [t.data_ptr() for t in folded.parameters()]
    with torch.no_grad():
        model.layer1[0].bn1.running_var.mul_(4.0)
        model.linear.weight.mul_(-1.0)
    assert fold_batchnorm(model, out=folded) is folded and [t.data_ptr() for t in folded.parameters()] == where
    x = images[:16]
    with torch.no_grad():
        ref = model(x)
        assert (folded(x) - ref).abs().max() <= LOGIT_TOL * max(1.0, ref.abs().max().item())
    with pytest.raises(ValueError, match="same architecture"):
        fold_batchnorm(build_model("preact_resnet18", 10, 3, 32, 4), out=folded)


def test_the_folded_copy_refuses_train_mode(images):
    folded = fold_batchnorm(with_statistics("resnet18", 4, images))
    folded.train()
    with pytest.raises(RuntimeError, match="eval mode only"):
        folded(torch.rand(2, 3, 32, 32))


def test_a_model_without_known_blocks_is_copied_unfolded():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    net(torch.rand(2, 3, 8, 8))
    folded = fold_batchnorm(net.eval())
    assert folded.folded_batchnorms == 0 and isinstance(folded[1], nn.BatchNorm2d)
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(folded(x), net(x))


@pytest.fixture(scope="module")
def labelled(tiny_splits, images):
    """A resnet18 (width 8) with BatchNorm statistics and 128 test images labelled mostly by its own predictions
    (every third label left as the data's), so that clean accuracy is high and PGD breaks part of it."""
    model = with_statistics("resnet18", 8, images, seed=3)
    with torch.no_grad():
        predicted = model(images[:128]).argmax(1)
    labels = torch.where(torch.arange(128) % 3 == 0, tiny_splits.test.labels[:128], predicted)
    return model, ImageSet(tiny_splits.test.images[:128], labels)


def test_evaluate_with_folding_reports_the_unfolded_numbers(labelled):
    """evaluate(..., fold_bn=True) against the reference path on the same batches and seed: the same clean images
    right, the robust ones equal up to FLIPS images; the model itself untouched."""
    model, data = labelled
    before = state(model)
    batches = Batches(data, 64)
    ref = evaluate(model, batches, 0.5 / 255, 0.125 / 255, steps=3, seed=0, per_image=True)
    out = evaluate(model, batches, 0.5 / 255, 0.125 / 255, steps=3, seed=0, per_image=True, fold_bn=True)
    assert 0 < ref["robust_acc"] < ref["clean_acc"]
    assert torch.equal(out["clean_correct"], ref["clean_correct"])
    assert int((out["robust_correct"] != ref["robust_correct"]).sum()) <= FLIPS
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_the_interpolation_curve_folds_each_alpha_from_its_own_weights(labelled):
    """Per alpha the folded copy is refreshed from theta(alpha): the curve is the unfolded curve (up to FLIPS images a
    point), and the architecture model gets its own weights back."""
    model, data = labelled
    theta_at = state(model)
    other = with_statistics("resnet18", 8, data.float(), seed=4)
    theta_ft = {k: theta_at[k] if k.startswith("layer") else v for k, v in state(other).items()}  # stem and classifier differ
    batches = Batches(data, 128)
    args = (model, theta_at, theta_ft, batches, 0.5 / 255, 0.125 / 255, 2, 1, (0.0, 0.5, 1.0))
    ref, ref_masks = interpolation_curve(*args, per_image=True)
    out, masks = interpolation_curve(*args, per_image=True, fold_bn=True)
    assert ref["clean_acc"].nunique() > 1, "the alphas must differ, or the refresh is untested"
    for a, b in zip(ref_masks, masks):
        assert torch.equal(a["clean"], b["clean"]) and int((a["robust"] != b["robust"]).sum()) <= FLIPS
    assert all(torch.equal(model.state_dict()[k], v) for k, v in theta_at.items())
