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


def _runner_epochs(splits, graphs: bool, lrs=(0.05, 0.01, 0.002)):
    """Three epochs of GraphedPGDTraining (graphs on or off) from one start, on 5 full batches and a short one, fp32."""
    from riftlab.steps._graph import GraphedPGDTraining

    torch.manual_seed(3)
    model = to_device(build_model("resnet18", 10, 3, 32, 8, splits.info.mean, splits.info.std), "cuda").train()
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=0.9, weight_decay=5e-4)
    runner = GraphedPGDTraining(model, opt, 8 / 255, 2 / 255, 3)
    runner.graphs.enabled = graphs
    train = Batches(splits.train.subset(5 * 128 + 40, seed=1), 128, shuffle=True, augment=True, device="cuda", seed=0)
    stats = []
    for epoch, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr  # a new learning rate between epochs: the graph reads it from its tensor
        train.set_epoch(epoch)
        stats.append(runner.epoch(train, torch.Generator("cuda").manual_seed(epoch)))
    return model, stats, runner.graphs


def test_graph_replays_take_the_eager_step(cuda_setup):
    """One CUDA graph per batch shape (two eager warm-up calls of a shape, then capture): the full batches from the
    third, the short last batch from the third epoch; a learning rate changed between epochs: the same weights and
    losses as the same step run eagerly, to fp32 rounding."""
    splits, _ = cuda_setup
    # deterministic convolutions: a graph replays the kernels it recorded, and PGD's signs would amplify the run-to-run
    # noise of nondeterministic ones into differences that are not the graph's
    with use_precision("fp32"), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        eager, eager_stats, eager_graphs = _runner_epochs(splits, graphs=False)
        graphed, graphed_stats, graphs = _runner_epochs(splits, graphs=True)
    assert eager_graphs.replays == 0 and graphs.replays == 3 + 5 + 6 and len(graphs.graphs) == 2
    for e, g in zip(eager_stats, graphed_stats):
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-3) and abs(g["acc"] - e["acc"]) <= 1.0 and g["first_bad_step"] == -1
    a, b = eager.state_dict(), graphed.state_dict()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4), k


def test_graphed_adversarial_training_matches_eager_in_bf16(cuda_setup):
    """adversarial_train with CUDA graphs on against eager, bf16 autocast, three epochs with an lr drop and a short last
    batch (captured in the third epoch): the losses and what the two models learn agree."""
    from riftlab.graphs import use_cuda_graphs

    splits, _ = cuda_setup
    results = {}
    for graphs in (False, True):
        torch.manual_seed(2)
        model = to_device(build_model("resnet18", 10, 3, 32, 16, splits.info.mean, splits.info.std), "cuda")
        train = Batches(splits.train, 256, shuffle=True, augment=True, device="cuda")  # 5000 images: a short last batch of 136
        with use_cuda_graphs(graphs):
            history = adversarial_train(model, train, None, epochs=3, lr=0.1, attack_steps=2, step=4 / 255, milestones=[2]).history
            results[graphs] = (history, evaluate(model.eval(), Batches(splits.test, 500, device="cuda"), 8 / 255, 2 / 255, steps=5, seed=0))
    (h_eager, eager), (h_graph, graphed) = results[False], results[True]
    assert all(abs(e["train_loss"] - g["train_loss"]) < 0.05 for e, g in zip(h_eager, h_graph))
    # Rounding differences grow over three epochs as between two seeds' runs: what the models learn is compared (as
    # test_compute's compiled-against-eager training); the step itself is compared exactly above.
    assert abs(eager["clean_acc"] - graphed["clean_acc"]) <= 5.0 and abs(eager["robust_acc"] - graphed["robust_acc"]) <= 5.0


def test_graphed_evaluation_matches_eager(cuda_setup):
    """evaluate with CUDA graphs on: each bucket shape of the attacked batches captured at its second call, later calls
    replay; the accuracies are eager's within bf16's tolerance (the same kernels, the same starts)."""
    from riftlab.evaluation.robust import survives_attack
    from riftlab.graphs import graphed_for, use_cuda_graphs

    splits, model = cuda_setup
    test = Batches(splits.test, 500, device="cuda")
    eager = evaluate(model, test, 8 / 255, 2 / 255, steps=5, restarts=2, seed=0)
    with use_cuda_graphs():
        first = evaluate(model, test, 8 / 255, 2 / 255, steps=5, restarts=2, seed=0)
        second = evaluate(model, test, 8 / 255, 2 / 255, steps=5, restarts=2, seed=0)
        graphs = graphed_for(model, survives_attack, (8 / 255, 2 / 255, 5))
    assert graphs.replays > 0 and len(graphs.graphs) >= 1
    for result in (first, second):
        assert result["clean_acc"] == eager["clean_acc"]
        assert abs(result["robust_acc"] - eager["robust_acc"]) <= 0.5  # 2000 images: at most 10 flip


def test_graphed_mrc_ranks_like_eager(cuda_setup):
    """MRC with CUDA graphs on: the adversarial set's attacks as replays give the eager set's predictions, and each
    module's passes as replays (on the same set) give the eager table within bf16's tolerance, the same ranking."""
    from riftlab.graphs import use_cuda_graphs

    splits, model = cuda_setup
    source = Batches(splits.train.subset(1024, seed=0), 256, device="cuda")
    adv = adversarial_set(model, source, 8 / 255, 2 / 255, 5)
    eager = module_robust_criticality(model, adv, passes=3)
    with use_cuda_graphs():
        graphed_adv = adversarial_set(model, source, 8 / 255, 2 / 255, 5)
        graphed = module_robust_criticality(model, adv, passes=3)
    with torch.no_grad():
        agree = torch.cat([(model(a).argmax(1) == model(g).argmax(1)) for (a, _), (g, _) in zip(adv, graphed_adv)]).float().mean()
    assert agree > 0.95 and all((g - x).abs().max() <= 8 / 255 + 1e-6 for (g, _), (x, _) in zip(graphed_adv, source))
    merged = eager.merge(graphed, on="module", suffixes=("_eager", "_graph"))
    assert merged["mrc_eager"].rank().corr(merged["mrc_graph"].rank()) > 0.95
    assert (merged["mrc_eager"] - merged["mrc_graph"]).abs().max() <= 0.05 * merged["mrc_eager"].abs().max() + 1e-3


def test_folded_evaluation_agrees_with_the_unfolded_model(cuda_setup):
    """evaluate(..., fold_bn=True) on CUDA: in fp32 the outcome of at most a few images in 2000 moves (rounding only);
    in bf16, whose rounding the fold changes (the folded weights are rounded to bf16, not the convolution's output
    before an fp32 BatchNorm), within the tolerance the graphed path has; with CUDA graphs on, the folded copy is
    replayed, and its graphs are reused by the next evaluation of the same model (the copy is refreshed in place)."""
    from riftlab.evaluation.robust import _FOLDED, survives_attack
    from riftlab.graphs import graphed_for, use_cuda_graphs

    splits, model = cuda_setup
    test = Batches(splits.test, 500, device="cuda")
    with use_precision("fp32"):
        ref = evaluate(model, test, 8 / 255, 2 / 255, steps=5, seed=0, per_image=True)
        folded = evaluate(model, test, 8 / 255, 2 / 255, steps=5, seed=0, per_image=True, fold_bn=True)
    assert int((ref["clean_correct"] != folded["clean_correct"]).sum()) <= 2
    assert int((ref["robust_correct"] != folded["robust_correct"]).sum()) <= 4
    eager = evaluate(model, test, 8 / 255, 2 / 255, steps=5, seed=0)
    with use_cuda_graphs():
        first = evaluate(model, test, 8 / 255, 2 / 255, steps=5, seed=0, fold_bn=True)
        second = evaluate(model, test, 8 / 255, 2 / 255, steps=5, seed=0, fold_bn=True)
        graphs = graphed_for(_FOLDED[model], survives_attack, (8 / 255, 2 / 255, 5))
    assert graphs.replays > 0
    for result in (first, second):
        assert abs(result["clean_acc"] - eager["clean_acc"]) <= 0.5 and abs(result["robust_acc"] - eager["robust_acc"]) <= 1.0


def test_the_memory_sized_evaluation_batch_fits_and_runs():
    """eval_batch_size_for on a GPU of 40 GiB or more, ResNet-18 (width 64) at 32x32: at least 512 images (the H200
    peaked at 1.2 GiB at batch 512), a power of two; one evaluation at that size runs, within the memory it was given."""
    from riftlab.evaluation.robust import eval_batch_size_for

    free, total = torch.cuda.mem_get_info()
    if total < 40 * 2**30:
        pytest.skip(f"needs a GPU of 40 GiB or more, this one has {total / 2**30:.0f} GiB")
    splits = load_dataset("synthetic-cifar10", synthetic_sizes=(5000, 100), val_size=100)
    torch.manual_seed(0)
    model = to_device(build_model("resnet18", 10, 3, 32, 64, splits.info.mean, splits.info.std), "cuda").eval()
    size = eval_batch_size_for(model, (3, 32, 32), "cuda")
    assert 512 <= size <= 4096 and size & (size - 1) == 0, size
    images = splits.train.subset(min(size, len(splits.train)), seed=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = evaluate(model, Batches(images, size, device="cuda"), 8 / 255, 2 / 255, steps=2, seed=0)
    peak = torch.cuda.max_memory_allocated() - before
    assert result["n"] == len(images) and peak <= 0.5 * free, (size, peak / 2**30, free / 2**30)
