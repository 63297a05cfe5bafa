"""The scale study's committed results are tied to the code: the checkpoints still give the stored numbers, every
reported difference is what the stored counts give, and the study script itself runs end to end (at tiny sizes)."""

import json
import subprocess
import sys

import pytest
import torch

from riftlab import book
from riftlab.evaluation.stats import over_seeds, paired_difference

from conftest import REPO

STUDY = REPO / "results" / "scale_study" / "study.json"


@pytest.fixture(scope="module")
def study():
    assert STUDY.is_file(), f"{STUDY} is missing: the book's intro and 'RiFT at scale' load it (benchmarks/scale_study.py summarize)"
    return book.study_results(STUDY)


def _pairs(gained: int, lost: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two per-image results with exactly these discordant counts (the concordant images split arbitrarily)."""
    a = torch.zeros(n, dtype=torch.bool)
    b = torch.zeros(n, dtype=torch.bool)
    b[:gained] = True
    a[gained:gained + lost] = True
    return a, b


def test_every_reported_difference_is_what_its_counts_give(study):
    runs = list(study["trend"]) + list(study["headline"]["runs"] if study["headline"] else [])
    assert runs
    for run in runs:
        test = run["test"]
        for kind in ("clean", "robust"):
            d = test["difference"][kind]
            assert d["diff"] == pytest.approx(test["rift"][f"{kind}_acc"] - test["at"][f"{kind}_acc"], abs=1e-9)
            again = paired_difference(*_pairs(d["gained"], d["lost"], d["n"]))
            assert (again["diff"], again["ci_low"], again["ci_high"]) == pytest.approx((d["diff"], d["ci_low"], d["ci_high"]), abs=1e-9)
            assert d["ci_low"] <= d["diff"] <= d["ci_high"] and d["n"] == 10000  # the full Fashion-MNIST test split
        for row in run["variants"]:
            for kind in ("clean", "robust"):
                assert row[f"test_{kind}_ci_low"] <= row[f"test_{kind}_change"] <= row[f"test_{kind}_ci_high"]
                again = paired_difference(*_pairs(row[f"test_{kind}_gained"], row[f"test_{kind}_lost"], 10000))
                assert again["ci_low"] == pytest.approx(row[f"test_{kind}_ci_low"], abs=1e-9)


def test_the_headline_follows_its_rule_and_its_seeds(study):
    block = study["headline"]
    assert block is not None and block["pick"]["rule"]
    seeds = [r["seed"] for r in block["runs"]]
    assert seeds == sorted(set(block["seeds_planned"]) - set(block["seeds_missing"])) and seeds[0] == 0
    if len(seeds) >= 2:
        if block["pick"]["setting"] == "rift":
            for kind in ("clean", "robust"):
                again = over_seeds([r["test"]["difference"][kind]["diff"] for r in block["runs"]], seeds)
                assert again["mean"] == pytest.approx(block["over_seeds"][kind]["mean"])
                assert again["ci_low"] == pytest.approx(block["over_seeds"][kind]["ci_low"])
    # The rule read RiFT as defined on the grid it names, once those runs were done (later runs cannot move it).
    trend = book.study_trend(study)
    considered = trend[[[w, n] in block["considered"] for w, n in zip(trend["width"], trend["training images"])]]
    assert len(considered) == len(block["considered"])
    winners = [v for v in considered["verdict"] if v == "gain"]
    assert ("no configuration wins" in block["pick"]["rule"]) == (not winners)


def test_a_table3_win_on_seed_0_is_confirmed_on_the_other_seeds_as_reported(study):
    """Every Table 3 variant that won on seed 0 has its confirmation; each reported mean and interval is what its rows
    and counts give (a confirmation that has not run yet is absent from the rows, not invented)."""
    block = study["headline"]
    threshold = study["provenance"]["threshold"]
    table3 = [v for v in block["runs"][0]["variants"] if v["setting"] == "table3" and v["variant"] in ("most", "last", "all")]
    won = [v["variant"] for v in table3 if v["test_clean_ci_low"] > 0 and v["test_robust_change"] >= -threshold - 1e-9]
    found = block.get("confirmations", [])
    assert [c["variant"] for c in found] == won
    for c in found:
        first = next(r for r in c["rows"] if r["seed"] == 0)
        assert first["test_clean_change"] == next(v for v in table3 if v["variant"] == c["variant"])["test_clean_change"]
        assert set(c["seeds"]) <= set(block["seeds_planned"])
        for seed_row in c["rows"]:
            if seed_row["seed"] != 0:
                run = next(r for r in block["runs"] if r["seed"] == seed_row["seed"])
                assert any(v["setting"] == f"confirm-{c['variant']}" for v in run["variants"])
        if "pooled" in c:
            for kind in ("clean", "robust"):
                again = over_seeds([r[f"test_{kind}_change"] for r in c["rows"]], c["seeds"])
                assert again["mean"] == pytest.approx(c["over_seeds"][kind]["mean"]) and again["ci_low"] == pytest.approx(c["over_seeds"][kind]["ci_low"])
                d = c["pooled"][kind]
                assert d["n"] == 10000 * len(c["seeds"])
                assert d["gained"] == sum(r[f"test_{kind}_gained"] for r in c["rows"]) and d["lost"] == sum(r[f"test_{kind}_lost"] for r in c["rows"])
                again = paired_difference(*_pairs(d["gained"], d["lost"], d["n"]))
                assert (again["ci_low"], again["ci_high"]) == pytest.approx((d["ci_low"], d["ci_high"]), abs=1e-9)
    assert book.study_confirmation_sentence(study).endswith(".") or not found


def test_the_confirmation_jobs_follow_seed_0s_table3(tmp_path):
    """The planner repeats exactly the Table 3 variants that win on seed 0 (not RiFT's own rows, not a loser)."""
    script = _script_module()
    run0 = tmp_path / script.run_name(8, 10000, 0)
    run0.mkdir()
    header = "variant,params,test_clean_change,test_clean_ci_low,test_clean_ci_high,test_robust_change,test_robust_ci_low,test_robust_ci_high\n"
    (run0 / "table3.csv").write_text(header + "least,576,0.5,0.1,0.9,0.0,-0.2,0.2\nmost,576,0.4,-0.1,0.9,0.0,-0.2,0.2\n")
    (run0 / "table3b.csv").write_text(header + "last,640,0.32,0.06,0.56,0.21,-0.08,0.49\nall,175048,0.3,0.01,0.6,-0.5,-0.8,-0.2\n")
    pick = {"width": 8, "train": 10000, "setting": "rift"}
    names = [j.name for j in script.confirmations(tmp_path, pick)]
    assert names == ["w8-n10k-s1:confirm-last", "w8-n10k-s2:confirm-last"]  # 'all' lost robust accuracy; 'least' is RiFT's own
    job = script.confirmations(tmp_path, pick)[0]
    assert job.deps == ["w8-n10k-s1"] and job.args[job.args.index("--variants") + 1] == "last" and "--seed" in job.args


def test_autoattack_sits_beside_pgd_on_the_same_images(study):
    from riftlab.evaluation.sanity import autoattack_checks

    aa = study["headline"]["autoattack"]
    same = aa["pgd_same_images"]
    assert aa["n"] == same["n"] == 1000 and aa["a"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for tag in ("a", "b"):
        assert aa[tag]["robust_acc"] <= aa[tag]["clean_acc"]
        again = [c.to_dict() for c in autoattack_checks(same[tag]["pgd_robust_acc"], aa[tag]["robust_acc"], aa["n"])]
        assert same[tag]["checks"] == again  # the reported checks are what the stored numbers give
    d = aa["robust"]
    again = paired_difference(*_pairs(d["gained"], d["lost"], d["n"]))
    assert (again["diff"], again["ci_low"], again["ci_high"]) == pytest.approx((d["diff"], d["ci_low"], d["ci_high"]), abs=1e-9)
    assert d["diff"] == pytest.approx(aa["b"]["robust_acc"] - aa["a"]["robust_acc"], abs=1e-9)


def test_provenance_names_commands_commit_machine_and_wall_times(study):
    provenance = study["provenance"]
    assert provenance["runs"] and all(len(r["commit"]) == 40 and r["machine"]["cpu"] for r in provenance["runs"])
    assert provenance["threads_per_job"] >= 1
    for run in study["trend"]:
        assert run["commands"][run["name"]][:2] == ["riftlab", "rift"] and "--profile" in run["commands"][run["name"]]
        assert run["wall_s"][run["name"]] > 0


@pytest.mark.slow
def test_committed_checkpoints_still_give_the_stored_numbers(study):
    """The headline AT and fine-tuned weights (fp16, committed) re-evaluated on the first test images with the stored
    attack must give the stored numbers, within 2 images (another CPU may round an image or two differently)."""
    table = book.study_tie_check(study)
    assert len(table) == 6 and table["agrees (within 2 images)"].all(), table.to_string()  # AT, AT+RiFT, fine-tuned


@pytest.mark.slow
def test_the_study_script_runs_end_to_end_at_tiny_sizes(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "results"
    for args in (["run", "--jobs", "2"], ["summarize", "--out", str(out), "--tie-images", "50"]):
        proc = subprocess.run([sys.executable, "benchmarks/scale_study.py", *args, "--smoke", "--root", str(root)], cwd=REPO,
                              capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "study.json").read_text())
    assert [r["width"] for r in summary["trend"]] == [4, 8] and len(summary["headline"]["runs"]) == 3
    assert summary["checkpoints"]["tie_check"]["images"] == 50 and (out / "checkpoints").is_dir()
    compared = json.loads((root / "w8-n1k-s0" / "compare-at-rift-test.json").read_text())["autoattack"]
    same = summary["headline"]["autoattack"]["pgd_same_images"]  # from the run's per-image results; compare's own figure agrees
    assert {tag: same[tag]["pgd_robust_acc"] for tag in ("a", "b")} == compared["pgd_robust_acc"] and same["n"] == compared["n"] == 20
    loaded = book.study_results(out / "study.json")
    assert book.study_tie_check(loaded)["agrees (within 2 images)"].all()
    assert len(book.study_trend(loaded)) == 2 and book.study_summary_sentence(loaded).endswith(".")
    _continuing_after_lost_runs(tmp_path, root, out)
    _the_gpu_row_joins_the_committed_trend(tmp_path, out)


def _continuing_after_lost_runs(tmp_path, root, out):
    """A machine that lost some runs continues the committed study: `run --only` does just the jobs it names, and
    `summarize --carry` takes the missing runs from the committed study.json, refusing (by name) a run that disagrees."""
    import shutil

    def script(*args, cwd_root):
        return subprocess.run([sys.executable, "benchmarks/scale_study.py", *args, "--smoke", "--root", str(cwd_root)], cwd=REPO,
                              capture_output=True, text=True, timeout=1500)

    committed = json.loads((out / "study.json").read_text())
    kept = tmp_path / "kept"
    shutil.copytree(root, kept)
    for name in ("w4-n1k-s0", "w8-n1k-s1", "w8-n1k-s2"):  # lost with their machine
        shutil.rmtree(kept / name)
    proc = script("summarize", "--out", str(tmp_path / "merged"), "--tie-images", "50", "--carry", str(out / "study.json"), cwd_root=kept)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = json.loads((tmp_path / "merged" / "study.json").read_text())
    plain = lambda run: {k: v for k, v in run.items() if k not in ("carried_from", "reproduces")}  # noqa: E731
    assert [plain(r) for r in merged["trend"]] == [plain(r) for r in committed["trend"]]
    assert [plain(r) for r in merged["headline"]["runs"]] == [plain(r) for r in committed["headline"]["runs"]]
    assert merged["headline"]["pooled"] == committed["headline"]["pooled"]
    assert merged["headline"]["over_seeds"] == committed["headline"]["over_seeds"]
    assert merged["headline"]["confirmations"] == committed["headline"]["confirmations"]
    assert "carried_from" in merged["trend"][0] and "reproduces" in merged["trend"][1]  # w4 carried, w8 seed 0 re-checked
    assert merged["provenance"]["carried"]["summarized_at_commit"] == committed["provenance"]["summarized_at_commit"]

    tampered = json.loads(json.dumps(committed))
    tampered["trend"][1]["alpha"] = 0.123  # w8-n1k-s0 in the trend only: the carried file contradicts itself
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    proc = script("summarize", "--out", str(tmp_path / "refused"), "--carry", str(tmp_path / "tampered.json"), cwd_root=kept)
    assert proc.returncode != 0 and "w8-n1k-s0 has two disagreeing records" in proc.stderr and "'alpha'" in proc.stderr, proc.stderr[-2000:]
    tampered["headline"]["runs"][0]["alpha"] = 0.123  # and among the seeds: a result the runs here do not reproduce
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    proc = script("summarize", "--out", str(tmp_path / "refused"), "--carry", str(tmp_path / "tampered.json"), cwd_root=kept)
    assert proc.returncode != 0 and "w8-n1k-s0 does not reproduce" in proc.stderr and "'alpha'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "refused" / "study.json").exists()

    fresh = tmp_path / "only"
    proc = script("run", "--only", "w4-n1k-s0", cwd_root=fresh)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in fresh.iterdir() if p.is_dir()) == ["logs", "w4-n1k-s0"]
    again = json.loads((fresh / "w4-n1k-s0" / "results.json").read_text())
    assert again["test"] == committed["trend"][0]["test"]  # the same job, rerun alone, reproduces its numbers
    proc = script("run", "--only", "w4-n1k-s0,nosuch", cwd_root=fresh)
    assert proc.returncode != 0 and "no job named nosuch" in proc.stderr


def _the_gpu_row_joins_the_committed_trend(tmp_path, out):
    """The GPU row's prepared command (benchmarks/scale_study.py's docstring), at the smoke sizes on the CPU: the row
    alone in its own root, with PGD-10 AT; then `summarize --gpu --carry` appends it to the committed trend and leaves
    every other row and the headline as they were."""
    gpu_root, merged_out = tmp_path / "gpu", tmp_path / "with-gpu"
    for args in (["run", "--gpu", "--phase", "1", "--only", "w16-n1k-s0", "--jobs", "1", "--threads", "1"],
                 ["summarize", "--gpu", "--out", str(merged_out), "--carry", str(out / "study.json")]):
        proc = subprocess.run([sys.executable, "benchmarks/scale_study.py", *args, "--smoke", "--root", str(gpu_root)], cwd=REPO,
                              capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in gpu_root.iterdir() if p.is_dir()) == ["logs", "w16-n1k-s0"]  # the row alone, not the grid
    committed = json.loads((out / "study.json").read_text())
    merged = json.loads((merged_out / "study.json").read_text())
    plain = lambda run: {k: v for k, v in run.items() if k != "carried_from"}  # noqa: E731
    assert [plain(r) for r in merged["trend"][:-1]] == [plain(r) for r in committed["trend"]]
    assert [plain(r) for r in merged["headline"]["runs"]] == [plain(r) for r in committed["headline"]["runs"]]
    assert merged["headline"]["pick"] == committed["headline"]["pick"] and merged["checkpoints"] == committed["checkpoints"]
    row = merged["trend"][-1]
    assert (row["name"], row["width"], row["train"]) == ("w16-n1k-s0", 16, 1000)
    assert (row["at"]["attack_steps"], row["at"]["attack_step"]) == (10, 0.025)  # PGD-10 AT, where the CPU rows ran PGD-3
    assert all(r["at"]["attack_steps"] == 3 for r in merged["trend"][:-1])
    assert row["commands"]["w16-n1k-s0"][:2] == ["riftlab", "rift"] and row["wall_s"]["w16-n1k-s0"] > 0
    assert any("--gpu" in s["command"] for s in merged["provenance"]["runs"])  # the GPU runner's session is in the provenance
    table = book.study_models(book.study_results(merged_out / "study.json"))
    assert list(table["AT"]) == ["PGD-3, 1 epoch (cpu)"] * 2 + ["PGD-10, 1 epoch (cpu)"]


def test_the_gpu_rows_committed_run_files_give_its_reported_numbers(study):
    """Each GPU row (no checkpoint committed: 22 MB in fp16) is tied to its committed run files instead: the per-image
    test results give the reported accuracies and paired intervals, and the MRC table, curve and chosen module and
    alpha are the run's own."""
    import csv

    from riftlab.checkpoint import read_checkpoint

    gpu_rows = [r for r in study["trend"] if r["at"]["device"] == "cuda"]
    assert gpu_rows, "the study has no GPU row (results/scale_study/gpu_runs holds the width-64 run)"
    for row in gpu_rows:
        run = REPO / "results" / "scale_study" / "gpu_runs" / row["name"]
        saved = read_checkpoint(run / "test_correct.pt")
        for kind in ("clean", "robust"):
            a, b = saved["at"][kind], saved["rift"][kind]
            assert len(a) == len(b) == 10000
            assert row["test"]["at"][f"{kind}_acc"] == pytest.approx(100 * int(a.sum()) / len(a), abs=1e-9)
            assert row["test"]["rift"][f"{kind}_acc"] == pytest.approx(100 * int(b.sum()) / len(b), abs=1e-9)
            again, d = paired_difference(a, b), row["test"]["difference"][kind]
            assert (again["gained"], again["lost"]) == (d["gained"], d["lost"])
            assert (again["ci_low"], again["ci_high"]) == pytest.approx((d["ci_low"], d["ci_high"]), abs=1e-9)
        results = json.loads((run / "results.json").read_text())
        assert (results["module"], results["alpha"]) == (row["module"], row["alpha"])
        with open(run / "mrc.csv") as fh:
            assert [r["module"] for r in csv.DictReader(fh)][0] == row["mrc"]["least"] == row["module"]
        with open(run / "interpolation.csv") as fh:
            assert [float(r["alpha"]) for r in csv.DictReader(fh)] == [p["alpha"] for p in row["curve"]]
        assert results["config"]["device"] == "cuda" and results["config"]["at_attack_steps"] == row["at"]["attack_steps"] == 10


def _script_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_study", REPO / "benchmarks" / "scale_study.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["scale_study"] = script  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    return script


def test_the_decomposition_plans_one_labelled_job_per_setting_and_names_a_longer_at(tmp_path):
    script = _script_module()
    assert script.run_name(8, 10000, 0, 40) == "w8-n10k-e40-s0" and script.run_name(8, 10000, 0, 10) == "w8-n10k-s0"
    jobs = {j.name: j for j in script.decomposition_jobs(tmp_path, (10, 40))}
    settings = ["reference", "bn-only", "reference-paper", "frozen-bn"]
    assert list(jobs) == [f"w8-n10k-s0:{s}" for s in settings] + ["w8-n10k-e40-s0"] + [f"w8-n10k-e40-s0:{s}" for s in settings]
    # further seeds: their AT chains first, then only the authors' protocol and its BatchNorm control
    seeded = [j.name for j in script.decomposition_jobs(tmp_path, (40,), (0, 1, 2))]
    assert seeded == ["w8-n10k-e40-s0", "w8-n10k-e40-s1", "w8-n10k-e40-s2", *[f"w8-n10k-e40-s0:{s}" for s in settings],
                      *[f"w8-n10k-e40-s{seed}:{s}" for seed in (1, 2) for s in ("reference", "bn-only")]]
    at_study_length = [j.name for j in script.decomposition_jobs(tmp_path, (10,), (0, 1))]
    assert at_study_length == [*[f"w8-n10k-s0:{s}" for s in settings], "w8-n10k-s1:reference", "w8-n10k-s1:bn-only"]
    longer = jobs["w8-n10k-e40-s0"].args
    assert longer[:2] == ["rift", "--profile"] and longer[longer.index("--at-epochs") + 1] == "40"  # the study's run is a grid job
    assert jobs["w8-n10k-e40-s0:reference"].deps == ["w8-n10k-e40-s0"] and "--at-epochs" not in jobs["w8-n10k-e40-s0:reference"].args
    paper = jobs["w8-n10k-s0:reference-paper"].args
    assert paper[paper.index("--module") + 1] == "layer2.1.conv2" and paper[paper.index("--variants") + 1] == "module"
    assert {"--protocol", "--bn-recalibration-only"} <= set(jobs["w8-n10k-s0:bn-only"].args)
    assert "--report-test-selection" in jobs["w8-n10k-s0:frozen-bn"].args and "--protocol" not in jobs["w8-n10k-s0:frozen-bn"].args
    core, extra = script.phase1(tmp_path, big=False)
    assert not any(":" in j.name and j.name.split(":")[1] in settings for j in core + extra)  # opt-in: the study is unchanged


@pytest.mark.slow
def test_the_decomposition_runs_at_tiny_sizes(tmp_path):
    """`run --decomposition` at the smoke sizes (AT of 1 and 2 epochs), then `summarize --decomposition`: every setting's
    row, beside what choosing on test reports; BatchNorm recalibration alone leaves every weight as AT left it."""
    from riftlab.checkpoint import read_checkpoint

    root, out = tmp_path / "runs", tmp_path / "results"
    settings = ["reference", "bn-only", "reference-paper", "frozen-bn"]
    names = ["w8-n1k-s0", "w8-n1k-e2-s0"]
    seeded = ["w8-n1k-e2-s1", "w8-n1k-e2-s1:reference", "w8-n1k-e2-s1:bn-only"]  # a further seed, at the longer AT only
    only = ",".join([*names, *(f"{n}:{s}" for n in names for s in settings), *seeded])
    for args in (["run", "--decomposition", "--jobs", "2", "--only", only, "--decomposition-seeds", "0,1"],
                 ["summarize", "--decomposition", "--out", str(out), "--decomposition-seeds", "0,1"]):
        proc = subprocess.run([sys.executable, "benchmarks/scale_study.py", *args, "--smoke", "--root", str(root)], cwd=REPO,
                              capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    blocks = json.loads((out / "study.json").read_text())["decomposition"]
    assert [(b["name"], b["at_epochs"]) for b in blocks] == [("w8-n1k-s0", 1), ("w8-n1k-e2-s0", 2)]  # two AT lengths
    for block in blocks:
        rows = {r["setting"]: r for r in block["settings"]}
        assert list(rows) == settings and rows["reference-paper"]["modules"] == "layer2.1.conv2" and rows["bn-only"]["params"] == 0
        assert rows["reference"]["modules"] == rows["frozen-bn"]["modules"] == block["module"]  # MRC's least critical module
        frozen = rows["frozen-bn"]  # riftlab's default again, as an ablation: the run's own fine-tuning and choice
        assert frozen["alpha"] == block["alpha"] and frozen["validation_selected"]["clean"]["diff"] == block["rift"]["clean"]["diff"]
        for row in rows.values():
            chosen = row["test_selected"]
            assert chosen["alpha"] in chosen["alphas"] and chosen["clean_gain"] >= 0 and chosen["null"]["permutations"] == 200
            assert chosen["alphas"] == [round(0.1 * i, 1) for i in range(11)]  # the reference code's test curve
        run = root / block["name"]
        assert len(json.loads((run / "results.json").read_text())["config"]["alphas"]) == 3  # the smoke's own grid ...
        with open(run / "reference" / "least" / "interpolation.csv") as fh:
            assert len(fh.read().splitlines()) == 1 + 11  # ... but the reference protocol's validation curve is on the 0.1 grid
        assert block["regime"]["epochs"] == block["at_epochs"]
        assert block["regime"]["gap"] == round(block["regime"]["train_robust"] - block["regime"]["val_robust"], 2)
        for row in rows.values():  # the fine-tuned end point is the validation curve's alpha-1 point
            assert row["end_point"]["clean"]["diff"] == row["curve"][-1]["clean_change"] and row["curve"][-1]["alpha"] == 1.0
        at = read_checkpoint(run / "at.pt")["model_state"]
        alone = read_checkpoint(run / "bn-only" / "finetune" / "least" / "ft.pt")["model_state"]
        statistics = [k for k in at if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert all(torch.equal(alone[k], at[k]) for k in at if k not in statistics)  # every weight bit-identical to AT's
        assert any(not torch.equal(alone[k], at[k]) for k in statistics)  # and the statistics moved
    # the further seed: at the longer AT only, the authors' protocol and BatchNorm alone, each over both seeds
    assert [r["seed"] for r in blocks[0]["runs"]] == [0] and not blocks[0]["over_seeds"]
    longer = blocks[1]
    assert [r["seed"] for r in longer["runs"]] == [0, 1]
    assert [s["setting"] for s in longer["runs"][1]["settings"]] == ["reference", "bn-only"]
    pooled = {p["setting"]: p for p in longer["over_seeds"]}
    assert list(pooled) == ["rift", "reference", "bn-only"]
    for setting, p in pooled.items():
        if setting == "rift":
            values = [r["rift"]["clean"]["diff"] for r in longer["runs"]]
        else:
            values = [s["validation_selected"]["clean"]["diff"] for r in longer["runs"] for s in r["settings"] if s["setting"] == setting]
        assert p["seeds"] == [0, 1] and p["clean"]["over_seeds"]["values"] == values
        assert p["clean"]["pooled"]["n"] == 2 * 200  # both seeds' test images
    # export: the finished runs copied to results, from which the same summary is rebuilt (what the committed files do)
    proc = subprocess.run([sys.executable, "benchmarks/scale_study.py", "export", "--decomposition", "--decomposition-seeds", "0,1",
                           "--smoke", "--root", str(root), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    script = _script_module()
    script.MIDDLE, script.AT_EPOCHS = (8, 1000), 1  # the smoke's sizes, as --smoke sets them
    exported = out / "decomposition_runs"
    assert sorted(p.name for p in exported.iterdir() if p.is_dir()) == ["w8-n1k-e2-s0", "w8-n1k-e2-s1", "w8-n1k-s0"]
    assert not list(exported.rglob("ft.pt"))  # the fine-tuned weights stay behind
    again = script._decomposition_summary(exported, (1, 2), json.loads((exported / "jobs.json").read_text()), (0, 1))
    assert json.loads(json.dumps(again)) == blocks


def test_the_decomposition_is_what_its_committed_run_files_give(study):
    """The decomposition block the book reads is rebuilt from the committed run files (each run's results, AT history,
    curves, ablation rows and test-selection reports, and the runner's ledger): the same summary, number for number;
    and each setting's test change is what its gained and lost images give."""
    from riftlab.evaluation.stats import difference_from_counts

    blocks = study.get("decomposition")
    assert blocks, "study.json has no decomposition: benchmarks/scale_study.py summarize --decomposition"
    root = REPO / "results" / "scale_study" / "decomposition_runs"
    script = _script_module()
    lengths = tuple(dict.fromkeys(b["at_epochs"] for b in blocks))  # each configuration's AT lengths, in order
    seeds = tuple(sorted({r["seed"] for b in blocks for r in b["runs"]}))
    again = script._decomposition_summary(root, lengths, json.loads((root / "jobs.json").read_text()), seeds)
    assert json.loads(json.dumps(again)) == blocks
    for block in blocks:
        for run in block["runs"]:
            for s in run["settings"]:
                for kind in ("clean", "robust"):
                    c, d = s["counts"][kind], s["validation_selected"][kind]
                    redone = difference_from_counts(c["gained"], c["lost"], c["n"])
                    assert (redone["ci_low"], redone["ci_high"]) == pytest.approx((d["ci_low"], d["ci_high"]), abs=1e-6)
                    assert 100 * (c["gained"] - c["lost"]) / c["n"] == pytest.approx(d["diff"], abs=1e-6)


def test_the_decomposition_at_a_wider_configuration_plans_its_own_run_once_and_joins_the_summary(tmp_path):
    """--decomposition-at 16,10000: the wider configuration's 10-epoch run is planned with its folders (without --big,
    which plans it as the grid's job, it would be missing; with it, it is not planned twice); summarize keeps a carried
    configuration's blocks that this root lacks, in the configurations' order; export merges into what is committed."""
    script = _script_module()
    script.DECOMPOSITION_AT = (16, 10000)
    try:
        jobs = [j.name for j in script.decomposition_jobs(tmp_path, (40, 10))]
        assert jobs[0] == "w16-n10k-e40-s0" and jobs.index("w16-n10k-s0") < jobs.index("w16-n10k-s0:reference")
        planned = {j.name: j.args for j in script.decomposition_jobs(tmp_path, (40, 10))}
        assert all("--no-report-test-selection" in planned[f"w16-n10k-s0:{s}"] for s in ("reference", "bn-only", "frozen-bn"))
        assert "--report-test-selection" not in planned["w16-n10k-s0:frozen-bn"]
        assert "--protocol" in planned["w16-n10k-e40-s0:bn-only"] and "--bn-recalibration-only" in planned["w16-n10k-e40-s0:bn-only"]
        for big in (False, True):
            core, extra = script.phase1(tmp_path, big=big, decomposition=(40, 10))
            names = [j.name for j in core + extra]
            assert names.count("w16-n10k-s0") == 1 and names.count("w16-n10k-e40-s0") == 1
    finally:
        script.DECOMPOSITION_AT = None
    assert script.decomposition_configurations()[:2] == [(8, 10000), (16, 10000)]  # the book's lead first
    block = lambda w, e, tag: {"width": w, "train": 10000, "at_epochs": e, "tag": tag}  # noqa: E731
    fresh = [block(16, 40, "new"), block(16, 10, "new")]
    before = [block(8, 40, "old"), block(8, 10, "old"), block(16, 40, "old"), {"at_epochs": 40, "tag": "no width"}]
    merged = script._with_carried_blocks(fresh, before)
    assert [(b["width"], b["at_epochs"], b["tag"]) for b in merged] == [(8, 40, "old"), (8, 10, "old"), (16, 40, "new"), (16, 10, "new")]
    # export from a second root (its own threads) into a destination that already holds the first root's runs
    for root, threads, width in ((tmp_path / "cpu", 1, 8), (tmp_path / "gpu", 4, 16)):
        run = root / script.run_name(width, 10000, 0, 40)
        run.mkdir(parents=True)
        (run / "results.json").write_text("{}")
        script._write_json(root / "jobs.json", {"_threads": threads, "_sessions": [{"root": root.name}],
                                                run.name: {"command": ["riftlab", "rift"], "wall_s_total": 1.0}})
        assert script.export_decomposition(root, tmp_path / "out", (40,), (0,)) == [run.name]
    ledger = json.loads((tmp_path / "out" / "jobs.json").read_text())
    assert ledger["_threads"] == 1 and ledger["_sessions"] == [{"root": "cpu"}, {"root": "gpu"}]
    assert "threads" not in ledger["w8-n10k-e40-s0"] and ledger["w16-n10k-e40-s0"]["threads"] == 4
    assert (tmp_path / "out" / "w8-n10k-e40-s0" / "results.json").is_file()  # the first root's run is still there


def test_only_runs_the_named_jobs_in_the_order_given(tmp_path):
    """`run --only b,a` starts b's folders before a's when both are ready: the order given, not the plan's; jobs not
    named are left out, and a folder still waits for its run (its dependency) whatever its place."""
    script = _script_module()
    plan = script.decomposition_jobs(tmp_path, (40,), (0, 1))
    names = [j.name for j in plan]
    assert names.index("w8-n10k-e40-s0:reference") < names.index("w8-n10k-e40-s1:reference")  # the plan's own order
    only = ["w8-n10k-e40-s1:reference", "w8-n10k-e40-s0:bn-only", "w8-n10k-e40-s0:reference"]
    chosen = script.selected(plan, only)
    assert [j.name for j in chosen] == only
    assert chosen[0].deps == ["w8-n10k-e40-s1"]


def test_status_names_a_job_whose_process_runs(tmp_path, capsys):
    """`status` says running for a job whose pid file names a live riftlab process (one a runner started, even a
    stopped runner), waiting for one not started, and started for one that ran and stopped before the end."""
    script = _script_module()
    (tmp_path / "logs").mkdir()
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "riftlab"])
    try:
        (tmp_path / "logs" / "w8-n10k-s0.pid").write_text(str(job.pid))
        script._write_json(tmp_path / "jobs.json", {"w4-n10k-s0": {"wall_s_total": 60.0}})
        script.status(tmp_path, big=False)
        lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
        assert (lines["w8-n10k-s0"], lines["w4-n10k-s0"], lines["w8-n5k-s0"]) == ("running", "started", "waiting")
    finally:
        job.kill()
        job.wait()
    script.status(tmp_path, big=False)  # the process ended without its done file: not running any more
    assert "w8-n10k-s0                   waiting" in capsys.readouterr().out


def test_a_carried_run_agrees_when_only_the_last_bits_of_a_float_differ():
    """`summarize --carry` refuses a rerun that does not reproduce the committed numbers, but not one whose accuracy is
    the same number written as acc_a + 100 * (gained - lost) / n (83.53999999999999 for 83.54)."""
    script = _script_module()
    record = {"clean": {"acc_b": 83.54, "gained": 11, "lost": 12}, "alphas": [0.0, 0.6], "module": "layer1.0.conv1"}
    assert script._agree(record, {**record, "clean": {**record["clean"], "acc_b": 83.55 - 0.01}})
    assert not script._agree(record, {**record, "clean": {**record["clean"], "acc_b": 83.55}})
    assert not script._agree(record, {**record, "clean": {**record["clean"], "lost": 13}})
    assert not script._agree(record, {**record, "alphas": [0.0, 0.6, 1.0]}) and not script._agree(record, {**record, "module": "fc"})
    assert not script._agree({"a": 1.0}, {"a": "1.0"}) and not script._agree({"a": 1.0}, {"a": 1.0, "b": 2})
