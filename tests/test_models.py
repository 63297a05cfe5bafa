"""Model registry: shapes, reference parameter names and counts, in-model normalisation.

Forward passes use small widths (4 for the ResNets, 1 or 2 for the WideResNet) and tiny batches;
default-width models are only built, never run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from riftlab.models import Normalize, build_model, list_models, weight_modules

MODELS = ["preact_resnet18", "resnet18", "resnet34", "wrn34_10"]
RESNETS = ["resnet18", "resnet34", "preact_resnet18"]
SMALL = {"resnet18": 4, "resnet34": 4, "preact_resnet18": 4, "wrn34_10": 1}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two, and immune to the large
    slow-downs two threads suffer when other processes share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics calibrated on random
    images, so eval-mode BN is far from the identity, activations keep their scale through the
    depth, and logits depend clearly on the input (a wrong wiring changes them)."""
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
        cfg = model.riftlab_config
        model.train()(torch.rand(8, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
                m.running_mean.add_(0.05 * torch.randn(m.running_mean.shape, generator=g))
    return model.train(was_training)


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- registry


def test_registry_lists_the_four_models():
    # in a fresh interpreter: other test files register extra test models in this one
    import subprocess
    import sys

    listed = subprocess.run([sys.executable, "-c", "from riftlab.models import list_models; print(','.join(list_models()))"],
                            capture_output=True, text=True, check=True).stdout.strip().split(",")
    assert listed == MODELS
    assert set(MODELS) <= set(list_models())


def test_unknown_model_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError) as info:
        build_model("resnet50")
    msg = str(info.value)
    assert "resnet50" in msg
    for name in MODELS:
        assert name in msg


# ----------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "num_classes, channels, size",
    [(10, 3, 32), (100, 3, 32), (200, 3, 64), (10, 1, 28)],
    ids=["cifar10", "cifar100", "tinyimagenet", "fashionmnist"],
)
def test_logits_shape(name, num_classes, channels, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes, channels, size, width=SMALL[name]).eval()
    x = _images(3, channels, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_train_mode_forward_and_backward(name):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32, width=SMALL[name]).train()
    out = model(_images(4, 3, 32))
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert model.conv1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- reference names


def _keys(name: str, width: int | None = None, **kw) -> set[str]:
    return set(build_model(name, width=width, **kw).state_dict())


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_resnet_parameter_names(name):
    keys = _keys(name)
    expected = {
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
        "layer1.0.conv1.weight", "layer2.1.conv2.weight",
        "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight", "layer2.0.shortcut.1.bias",
        "layer2.0.shortcut.1.running_mean", "layer2.0.shortcut.1.running_var",
        "layer3.0.shortcut.0.weight", "layer4.0.shortcut.1.weight",
        "linear.weight", "linear.bias",
    }
    assert expected <= keys
    # stage 1 keeps the resolution and width: identity shortcut, as in the reference
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)
    assert not any(k.startswith(("normalize", "fc.")) for k in keys)


def test_resnet34_has_reference_block_counts():
    keys = _keys("resnet34")
    for layer, n in [("layer1", 3), ("layer2", 4), ("layer3", 6), ("layer4", 3)]:
        blocks = {int(k.split(".")[1]) for k in keys if k.startswith(layer + ".")}
        assert blocks == set(range(n)), layer


def test_preact_resnet18_parameter_names():
    keys = _keys("preact_resnet18")
    assert {"conv1.weight", "layer1.0.bn1.weight", "layer2.0.shortcut.0.weight", "layer2.1.conv2.weight",
            "linear.weight", "linear.bias"} <= keys
    # no top-level stem BN and no final BN before the classifier
    assert not any(k.startswith(("bn1.", "bn.", "bn2.")) for k in keys)
    # the shortcut is a bare 1x1 convolution: no BatchNorm in it
    assert [k for k in keys if ".shortcut." in k and k.startswith("layer2.0.")] == ["layer2.0.shortcut.0.weight"]
    assert not any(".shortcut.1." in k for k in keys)


def test_wrn34_10_parameter_names():
    keys = _keys("wrn34_10")
    assert {"conv1.weight", "block1.layer.3.conv2.weight", "block1.layer.4.bn1.running_var",
            "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
            "block3.layer.0.convShortcut.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
            "fc.weight", "fc.bias"} <= keys
    # depth 34: (34 - 4) / 6 = 5 blocks per stage
    for stage in ("block1", "block2", "block3"):
        assert {int(k.split(".")[2]) for k in keys if k.startswith(stage + ".")} == set(range(5))
    assert not any(k.startswith("sub_block1") for k in keys)
    assert not any(k.startswith("linear") for k in keys)
    assert not any("convShortcut" in k and ".layer.0." not in k for k in keys)


@pytest.mark.parametrize("name, width", [("resnet18", 4), ("resnet34", 4), ("preact_resnet18", 4),
                                         ("resnet18", 1), ("wrn34_10", 2)])
def test_small_width_has_identical_state_dict_keys(name, width):
    default, small = build_model(name).state_dict(), build_model(name, width=width).state_dict()
    assert list(small) == list(default)
    assert any(a.shape != b.shape for a, b in zip(small.values(), default.values()))


def test_wrn_width_one_has_identical_state_dict_keys():
    assert list(build_model("wrn34_10", width=1).state_dict()) == list(build_model("wrn34_10").state_dict())


# ------------------------------------------------------------------------------- parameter counts


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, num_classes, expected", [
    ("resnet18", 10, 11_173_962),
    ("resnet18", 100, 11_220_132),
    ("resnet34", 10, 21_282_122),
    ("preact_resnet18", 10, 11_171_146),
    ("wrn34_10", 10, 46_160_474),
])
def test_default_width_parameter_counts(name, num_classes, expected):
    assert _count(build_model(name, num_classes)) == expected


def test_wrn_parameter_count_by_hand():
    """Recount WRN-34-10 from its definition (convs, BNs, fc; no sub_block1)."""
    w, n = 10, 5
    ch = [16, 16 * w, 32 * w, 64 * w]
    total = 3 * 16 * 9  # conv1
    for i in range(3):
        cin, cout = ch[i], ch[i + 1]
        for b in range(n):
            c_in = cin if b == 0 else cout
            total += 2 * c_in + c_in * cout * 9 + 2 * cout + cout * cout * 9
            if c_in != cout:
                total += c_in * cout
    total += 2 * ch[3] + ch[3] * 10 + 10
    assert total == 46_160_474
    assert _count(build_model("wrn34_10")) == total


# ---------------------------------------------------------------------------- classifier input


@pytest.mark.parametrize("name", RESNETS)
@pytest.mark.parametrize("width", [None, 4])
def test_resnet_classifier_input_follows_reference_pooling(name, width):
    w = width or 64
    assert build_model(name, 10, 3, 32, width=width).linear.in_features == 8 * w
    assert build_model(name, 200, 3, 64, width=width).linear.in_features == 8 * w * 4  # 2x2 grid
    assert build_model(name, 10, 1, 28, width=width).linear.in_features == 8 * w


@pytest.mark.parametrize("width", [None, 1])
def test_wrn_classifier_input_follows_reference_pooling(width):
    w = width or 10
    assert build_model("wrn34_10", 10, 3, 32, width=width).fc.in_features == 64 * w
    assert build_model("wrn34_10", 200, 3, 64, width=width).fc.in_features == 64 * w * 4
    assert build_model("wrn34_10", 10, 1, 28, width=width).fc.in_features == 64 * w


# ----------------------------------------------------------- forward parity with the reference code
# Minimal copies of the reference networks (kuangliu pytorch-cifar ResNet / PreActResNet, TRADES
# WideResNet), parameterised by width. riftlab's weights are loaded into them *strictly*, so names
# and shapes must agree, and the logits must agree, so the wiring must too.


class _RefBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class _RefPreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class _RefResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes, in_channels, width, grid, preact):
        super().__init__()
        self.preact = preact
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], 2)
        self.linear = nn.Linear(8 * width * grid * grid, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        return self.linear(out)


class _RefWideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride,
                                                                padding=0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class _RefNetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[_RefWideBlock(i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1)
                                     for i in range(int(nb_layers))])

    def forward(self, x):
        return self.layer(x)


class _RefWideResNet(nn.Module):
    def __init__(self, depth=34, num_classes=10, widen_factor=10):
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) / 6
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = _RefNetworkBlock(n, ch[0], ch[1], 1)
        self.sub_block1 = _RefNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = _RefNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = _RefNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x):
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.view(-1, self.nChannels)
        return self.fc(out)


def _reference_resnet(name, num_classes, channels, width, grid):
    if name == "resnet18":
        return _RefResNet(_RefBasicBlock, [2, 2, 2, 2], num_classes, channels, width, grid, preact=False)
    if name == "resnet34":
        return _RefResNet(_RefBasicBlock, [3, 4, 6, 3], num_classes, channels, width, grid, preact=False)
    return _RefResNet(_RefPreActBlock, [2, 2, 2, 2], num_classes, channels, width, grid, preact=True)


@pytest.mark.parametrize("name", RESNETS)
@pytest.mark.parametrize("num_classes, channels, size, grid", [(10, 3, 32, 1), (200, 3, 64, 2), (10, 1, 28, 1)],
                         ids=["32px", "64px", "28px"])
def test_resnet_logits_match_reference_network(name, num_classes, channels, size, grid):
    torch.manual_seed(0)
    model = _randomize_bn(build_model(name, num_classes, channels, size, width=4)).eval()
    ref = _reference_resnet(name, num_classes, channels, 4, grid).eval()
    ref.load_state_dict(model.state_dict())  # strict: same names and shapes
    x = _images(2, channels, size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_wrn_logits_match_reference_network():
    torch.manual_seed(0)
    model = _randomize_bn(build_model("wrn34_10", 10, 3, 32, width=2)).eval()
    ref = _RefWideResNet(34, 10, widen_factor=2).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(k.startswith("sub_block1.") for k in missing)  # only the reference's unused block
    x = _images(2, 3, 32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- weight_modules


def test_weight_modules_resnet18():
    model = build_model("resnet18", width=4)
    mods = weight_modules(model)
    names = [n for n, _ in mods]
    assert len(mods) == 21  # conv1 + 16 block convs + 3 shortcut convs + linear
    assert names[0] == "conv1" and names[-1] == "linear"
    assert sum(".shortcut.0" in n for n in names) == 3
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in mods)
    assert all(dict(model.named_modules())[n] is m for n, m in mods)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name, width, count", [("resnet18", 4, 21), ("resnet34", 4, 37), ("preact_resnet18", 4, 21),
                                                ("wrn34_10", 2, 35)])
def test_weight_modules_covers_every_conv_and_linear(name, width, count):
    model = build_model(name, width=width)
    names = [n for n, _ in weight_modules(model)]
    every = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == every
    assert len(names) == count
    # each of them takes part in a forward pass exactly once
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.append(n)) for n, m in weight_modules(model)]
    with torch.no_grad():
        model.eval()(_images(1, 3, 32))
    for h in hooks:
        h.remove()
    assert sorted(seen) == sorted(names)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_weight_modules_in_forward_order(name):
    model = build_model(name, width=4).eval()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.append(n)) for n, m in weight_modules(model)]
    with torch.no_grad():
        model(_images(1, 3, 32))
    for h in hooks:
        h.remove()
    assert seen == [n for n, _ in weight_modules(model)]


# ------------------------------------------------------------------------------ in-model normalise


@pytest.mark.parametrize("name", MODELS)
def test_normalisation_inside_model_is_equivalent_to_normalised_input(name):
    torch.manual_seed(0)
    normed = _randomize_bn(build_model(name, 10, 3, 32, width=SMALL[name], mean=CIFAR_MEAN, std=CIFAR_STD)).eval()
    plain = build_model(name, 10, 3, 32, width=SMALL[name]).eval()
    plain.load_state_dict(normed.state_dict())  # strict: the normalisation is not in the state dict
    x = _images(2, 3, 32)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        a, b, raw = normed(x), plain((x - mean) / std), plain(x)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a, raw, rtol=1e-2, atol=1e-2)  # the normalisation does change the logits


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_has_no_normalize_entries(name):
    model = build_model(name, width=SMALL[name], mean=CIFAR_MEAN, std=CIFAR_STD)
    assert not any("normalize" in k or k.endswith((".mean", ".std")) for k in model.state_dict())
    # but the buffers exist and follow the model
    buffers = dict(model.named_buffers())
    torch.testing.assert_close(buffers["normalize.mean"].flatten(), torch.tensor(CIFAR_MEAN))
    torch.testing.assert_close(buffers["normalize.std"].flatten(), torch.tensor(CIFAR_STD))


def test_default_normalisation_is_identity():
    model = build_model("resnet18", 10, 1, 28, width=4)
    assert isinstance(model.normalize, Normalize)
    x = _images(2, 1, 28)
    assert torch.equal(model.normalize(x), x)
    assert model.normalize.mean.shape == (1, 1, 1, 1)


def test_normalize_module():
    norm = Normalize([0.5, 0.25], [2.0, 0.5])
    x = torch.ones(1, 2, 3, 3)
    out = norm(x)
    assert torch.allclose(out[0, 0], torch.full((3, 3), 0.25))
    assert torch.allclose(out[0, 1], torch.full((3, 3), 1.5))
    assert list(norm.state_dict()) == []


def test_riftlab_config_records_build_arguments():
    model = build_model("preact_resnet18", 100, 3, 64, width=4, mean=CIFAR_MEAN, std=CIFAR_STD)
    cfg = model.riftlab_config
    assert {k: cfg[k] for k in ("model", "num_classes", "in_channels", "image_size", "width")} == {
        "model": "preact_resnet18", "num_classes": 100, "in_channels": 3, "image_size": 64, "width": 4}
    assert cfg["mean"] == pytest.approx(CIFAR_MEAN, abs=1e-6)
    assert cfg["std"] == pytest.approx(CIFAR_STD, abs=1e-6)
    assert all(type(v) is float for v in cfg["mean"] + cfg["std"])  # plain JSON-able floats

    grey = build_model("wrn34_10", 10, 1, 28, width=1).riftlab_config
    assert grey["model"] == "wrn34_10" and grey["in_channels"] == 1 and grey["image_size"] == 28
    assert grey["mean"] == [0.0] and grey["std"] == [1.0]


def test_riftlab_config_rebuilds_an_equivalent_model():
    model = build_model("resnet18", 10, 3, 32, width=4, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    cfg = model.riftlab_config
    again = build_model(cfg["model"], cfg["num_classes"], cfg["in_channels"], cfg["image_size"], cfg["width"],
                        cfg["mean"], cfg["std"]).eval()
    again.load_state_dict(model.state_dict())
    x = _images(2, 3, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


# ------------------------------------------------------------------------------------ BatchNorm


@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_is_deterministic_and_uses_running_stats(name):
    torch.manual_seed(0)
    model = _randomize_bn(build_model(name, 10, 3, 32, width=SMALL[name])).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(4, 3, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[:1])
    assert torch.equal(a, b)
    # running statistics, not batch statistics: a sample's logits do not depend on its batch
    torch.testing.assert_close(single, a[:1], rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_mode_uses_batch_statistics():
    torch.manual_seed(0)
    model = _randomize_bn(build_model("resnet18", 10, 3, 32, width=4)).train()
    x = _images(4, 3, 32)
    tracked = model.bn1.num_batches_tracked.item()
    running = model.bn1.running_mean.clone()
    with torch.no_grad():
        a = model(x)
        single_in_batch = model(torch.cat([x[:1], _images(3, 3, 32, seed=7)]))
    assert not torch.allclose(a[:1], single_in_batch[:1], atol=1e-4)
    assert model.bn1.num_batches_tracked.item() == tracked + 2
    assert not torch.equal(model.bn1.running_mean, running)
