"""What only a GPU can show: riftlab's CUDA path agrees with fp32 and with eager mode.

Every test here skips without CUDA; ``benchmarks/gpu_check.py`` runs them on a GPU machine (and
records the outcome in its JSON). On the CPU the same code paths are tested in ``test_compute.py``.
"""

import copy

import pytest
import torch
import torch.nn as nn

from riftlab import Batches, adversarial_set, adversarial_train, build_model, evaluate, load_dataset, module_robust_criticality, pgd
from riftlab.compute import autocast_dtype, compiled, native_bf16, precision_name, to_device, use_precision
from riftlab.distributed import done_training
from riftlab.evaluation.sanity import gradient_masking_checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_setup():
    torch.backends.cudnn.benchmark = True
    splits = load_dataset("synthetic-cifar10", synthetic_sizes=(6000, 2000), val_size=1000)
    torch.manual_seed(0)
    model = to_device(build_model("resnet18", 10, 3, 32, 16, splits.info.mean, splits.info.std), "cuda")
    train = Batches(splits.train, 256, shuffle=True, augment=True, device="cuda")
    adversarial_train(model, train, None, epochs=4, lr=0.1, attack_steps=2, step=4 / 255, milestones=[3])
    return splits, model.eval()


def test_auto_precision_on_this_gpu():
    device = torch.device("cuda")
    expected = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    assert native_bf16(device) == (expected == "bf16") and precision_name(device) == expected


def test_channels_last_and_16_bit_agree_with_fp32(cuda_setup):
    splits, model = cuda_setup
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    test = Batches(splits.test, 500, device="cuda")
    with use_precision("fp32"):
        fp32 = evaluate(model, test, 8 / 255, 2 / 255, steps=5, seed=0)
    for precision in ("bf16", "fp16"):
        with use_precision(precision):
            low = evaluate(model, test, 8 / 255, 2 / 255, steps=5, seed=0)
        assert abs(low["clean_acc"] - fp32["clean_acc"]) <= 1.0, precision  # 2000 images: at most 20 flip
        assert abs(low["robust_acc"] - fp32["robust_acc"]) <= 2.0, precision
    assert fp32["robust_acc"] < fp32["clean_acc"]


def test_fp16_training_through_a_gradient_scaler(cuda_setup):
    splits, _ = cuda_setup
    torch.manual_seed(1)
    model = to_device(build_model("resnet18", 10, 3, 32, 8, splits.info.mean, splits.info.std), "cuda")
    train = Batches(splits.train, 256, shuffle=True, augment=True, device="cuda")
    with use_precision("fp16"):
        assert autocast_dtype("cuda") == torch.float16
        result = adversarial_train(model, train, None, epochs=2, lr=0.1, attack_steps=1, step=8 / 255, milestones=[1])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]


def test_compiled_attack_matches_eager_and_computes_no_weight_gradients(cuda_setup):
    splits, model = cuda_setup
    x, y = splits.test.float()[:256].cuda(), splits.test.labels[:256].cuda()
    fast = compiled(model, True)
    with torch.no_grad():
        assert torch.allclose(fast(x).float(), model(x).float(), atol=0.05, rtol=0.05)
    eager_adv = pgd(model, x, y, 8 / 255, 2 / 255, 5, generator=torch.Generator("cuda").manual_seed(0))
    fast_adv = pgd(fast, x, y, 8 / 255, 2 / 255, 5, generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        agree = (model(eager_adv).argmax(1) == model(fast_adv).argmax(1)).float().mean()
    assert agree > 0.95
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # weights untouched, flags restored


def test_mrc_on_cuda_ranks_like_the_whole_network(cuda_setup):
    splits, model = cuda_setup
    adv = adversarial_set(model, Batches(splits.train.subset(1024, seed=0), 256, device="cuda"), 8 / 255, 2 / 255, 5)
    cached = module_robust_criticality(model, adv, passes=2)
    whole = module_robust_criticality(model, adv, passes=2, reuse_activations=False)
    merged = cached.merge(whole, on="module", suffixes=("_cached", "_whole"))
    assert merged["mrc_cached"].rank().corr(merged["mrc_whole"].rank()) > 0.95
    assert (merged["mrc_cached"] - merged["mrc_whole"]).abs().max() <= 0.05 * merged["mrc_whole"].abs().max() + 1e-3


def test_eps_zero_equals_clean_exactly_on_cuda(cuda_setup):
    splits, model = cuda_setup
    checks = gradient_masking_checks(model, Batches(splits.test.subset(500, seed=0), 128, device="cuda"), 8 / 255, 2 / 255, 5)
    assert [c for c in checks if c.name == "eps_zero_is_clean"][0].passed


def test_sync_batchnorm_round_trip_keeps_the_weights(cuda_setup):
    _, model = cuda_setup
    copy_ = copy.deepcopy(model)
    nn.SyncBatchNorm.convert_sync_batchnorm(copy_)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in copy_.modules())
    done_training(copy_)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in copy_.modules())
    a, b = model.state_dict(), copy_.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
