"""Common corruptions: every one at every severity, on 1- and 3-channel images of 28, 32 and 64 pixels."""

import pytest
import torch
import torch.nn.functional as F

from riftlab.evaluation.corruptions import (ALL_CORRUPTIONS, CORRUPTION_GROUPS, CORRUPTIONS, EXTRA_CORRUPTIONS, PROTOCOLS,
                                 RANDOM_CORRUPTIONS, REFERENCE_CORRUPTIONS, SEVERITIES, corrupt, protocol_of,
                                 resolve_corruptions)


def natural_like(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Images with a natural-image-like spectrum (octaves of smooth noise, amplitude falling with
    frequency) and a few flat shapes with sharp edges, in [0.15, 0.85] before the shapes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, channels, size, size)
    for k in range(1, 6):
        grid = torch.randn(n, channels, 2 ** k + 1, 2 ** k + 1, generator=g)
        x += F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True) * 0.6 ** k
    low, high = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    x = 0.15 + 0.7 * (x - low) / (high - low)
    for _ in range(3):
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(size // 6, size // 2, (2,), generator=g).tolist()
        x[:, :, top:top + h, left:left + w] = torch.rand(n, channels, 1, 1, generator=g)
    return x


SHAPES = [(1, 28), (3, 32), (3, 64)]  # Fashion-MNIST, CIFAR, Tiny-ImageNet


@pytest.fixture(scope="module")
def images():
    return {shape: natural_like(4, *shape, seed=shape[1]) for shape in SHAPES}


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_every_corruption_at_every_severity(name, images):
    for (channels, size), x in images.items():
        distances = []
        for severity in SEVERITIES:
            y = corrupt(x, name, severity, seed=0)
            where = f"{name} severity {severity} on {channels}x{size}x{size}"
            assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device, where
            assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1, where
            assert torch.equal(y, corrupt(x, name, severity, seed=0)), f"{where}: not deterministic for a seed"
            other_seed = corrupt(x, name, severity, seed=1)
            if name in RANDOM_CORRUPTIONS:
                assert not torch.equal(y, other_seed), f"{where}: another seed gave the same images"
            else:
                assert torch.equal(y, other_seed), f"{where}: a deterministic corruption depends on the seed"
            distances.append((y - x).abs().mean().item())
        if name == "saturate" and channels == 1:
            assert distances == [0.0] * 5  # grey images have no saturation: documented as unchanged
            continue
        assert distances[0] > 0, f"{name} severity 1 leaves {channels}x{size}x{size} images unchanged"
        assert distances[0] < distances[-1], f"{name} on {channels}x{size}x{size}: severity 1 is farther from clean than 5 ({distances})"


def test_random_draws_differ_between_images_of_a_batch():
    x = natural_like(1, 3, 32).expand(2, 3, 32, 32).contiguous()  # two copies of one image
    for name in sorted(RANDOM_CORRUPTIONS):
        y = corrupt(x, name, 3, seed=0)
        assert not torch.equal(y[0], y[1]), name


def test_dtypes_are_kept_and_inputs_are_checked():
    x = natural_like(2, 3, 32)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        y = corrupt(x.to(dtype), "motion_blur", 2)
        assert y.dtype == dtype and y.shape == x.shape
    assert torch.allclose(corrupt(x.double(), "fog", 4, seed=3).float(), corrupt(x, "fog", 4, seed=3), atol=1e-5)
    assert corrupt(x[:0], "snow", 5).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown corruption 'blur'; valid corruptions: gaussian_noise"):
        corrupt(x, "blur", 1)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity must be an integer from 1"):
            corrupt(x, "fog", severity)
    with pytest.raises(ValueError, match=r"x.float\(\) / 255"):
        corrupt((x * 255).to(torch.uint8), "fog", 1)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        corrupt(torch.rand(2, 2, 32, 32), "fog", 1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        corrupt(torch.rand(3, 32, 32), "fog", 1)


def test_spatial_parameters_scale_with_image_size():
    """Blurring a 2x upsampled image is close to upsampling the blurred image: the kernel grows with the size."""
    small = natural_like(2, 3, 32, seed=4)
    big = F.interpolate(small, scale_factor=2, mode="bilinear", align_corners=False)
    for name in ("gaussian_blur", "defocus_blur", "zoom_blur"):
        blurred_big = corrupt(big, name, 5)
        upsampled = F.interpolate(corrupt(small, name, 5), scale_factor=2, mode="bilinear", align_corners=False)
        unscaled = F.interpolate(corrupt(F.interpolate(big, size=32, mode="area"), name, 5), scale_factor=2, mode="bilinear")
        mismatch = (blurred_big - upsampled).abs().mean()
        assert mismatch < 0.5 * (blurred_big - big).abs().mean(), name
        assert mismatch < (unscaled - blurred_big).abs().mean() + 0.01, name


def test_corruption_lists_and_protocols():
    assert CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                           "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                           "jpeg_compression")
    assert len(REFERENCE_CORRUPTIONS) == 18 and "glass_blur" not in REFERENCE_CORRUPTIONS
    assert set(REFERENCE_CORRUPTIONS) == set(CORRUPTIONS) - {"glass_blur"} | {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert set(ALL_CORRUPTIONS) == set(CORRUPTIONS) | set(EXTRA_CORRUPTIONS) == set(CORRUPTION_GROUPS)
    assert set(CORRUPTION_GROUPS.values()) == {"noise", "blur", "weather", "digital"}
    assert resolve_corruptions("standard") == ("standard-15", CORRUPTIONS)
    assert resolve_corruptions("reference") == ("reference-18", REFERENCE_CORRUPTIONS) == resolve_corruptions("reference-18")
    assert resolve_corruptions(list(reversed(CORRUPTIONS)))[0] == "standard-15"
    assert resolve_corruptions("fog, snow") == ("custom", ("fog", "snow"))
    assert resolve_corruptions("all")[1] == ALL_CORRUPTIONS
    assert protocol_of(PROTOCOLS["reference-18"]) == "reference-18" and protocol_of(["fog"]) == "custom"
    with pytest.raises(ValueError, match="unknown corruption\\(s\\) 'fgo'"):
        resolve_corruptions("fog,fgo")
    with pytest.raises(ValueError, match="duplicates"):
        resolve_corruptions(["fog", "fog"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_corruptions_stay_on_the_gpu():
    x = natural_like(3, 3, 32).cuda()
    for name in ALL_CORRUPTIONS:
        y = corrupt(x, name, 3, seed=0)
        assert y.device == x.device and torch.equal(y, corrupt(x, name, 3, seed=0)), name
