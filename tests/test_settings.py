"""Every setting checked before any work: one line naming the setting, the value and what is allowed; exit 2; the run
folder as it was. A property test over every field of RiftConfig (and every command-line option with a rule), then the
cases that once got through: real tiny runs for a checkpoint of another width, a truncated checkpoint, a loss that
diverges."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO
from riftlab.checkpoint import read_checkpoint
from riftlab.cli import OPTION_RULES, build_parser, main
from riftlab.engine.config import PROFILES, RULES, RiftConfig
from riftlab.engine.pipeline import RiftRun
from riftlab.engine.rules import Flag, Integer, Items, Number, OneOf, Pattern, SettingError, Text
from riftlab.engine.runner import RunDir, Stage

DATA = ["--synthetic-sizes", "600,200", "--val-size", "100", "--train-subset", "64", "--val-subset", "64", "--test-subset", "64"]
TINY = ["--dataset", "synthetic-cifar10", "--model", "resnet18", "--width", "4", *DATA, "--device", "cpu", "--no-progress"]
FIELDS = [f.name for f in dataclasses.fields(RiftConfig)]


# ----------------------------------------------------------------------------------------------
# Invalid values, derived from each rule (a new field with a rule of a known kind is covered as it is added)


def _none_unless_optional(rule):
    return [] if rule.optional else [st.none()]


def invalid(rule) -> st.SearchStrategy:
    """Values ``rule`` must refuse."""
    others = [st.text(max_size=8), st.booleans(), *_none_unless_optional(rule)]
    if isinstance(rule, Integer):
        bad = [st.floats(allow_nan=True).filter(lambda x: not (math.isfinite(x) and x.is_integer()))]
        if rule.low is not None:
            bad.append(st.integers(max_value=rule.low - 1))
        if rule.high is not None:
            bad.append(st.integers(min_value=rule.high + 1))
        return st.one_of(*bad, st.text(max_size=8), st.booleans(), *_none_unless_optional(rule))
    if isinstance(rule, Number):
        bad = [st.sampled_from([math.nan, math.inf, -math.inf])]
        if rule.low is not None:
            bad.append(st.floats(max_value=rule.low, exclude_max=not rule.low_open, allow_nan=False, allow_infinity=False))
        if rule.high is not None:
            bad.append(st.floats(min_value=rule.high, exclude_min=not rule.high_open, allow_nan=False, allow_infinity=False))
        return st.one_of(*bad, *others)
    if isinstance(rule, OneOf):
        return st.one_of(st.text(max_size=12).filter(lambda t: t not in rule.names()), st.integers(), *_none_unless_optional(rule))
    if isinstance(rule, Text):
        return st.one_of(st.sampled_from(["", "  "]), st.integers(), st.booleans(), *_none_unless_optional(rule))
    if isinstance(rule, Flag):
        return st.one_of(st.integers(), st.text(max_size=8), *_none_unless_optional(rule))
    if isinstance(rule, Pattern):
        return st.one_of(st.text(max_size=12).filter(lambda t: not re.fullmatch(rule.regex, t)), st.integers(),
                         *_none_unless_optional(rule))
    if isinstance(rule, Items):
        item = valid(rule.item)
        bad = [st.lists(invalid(rule.item), min_size=1, max_size=3).map(tuple),  # an item its rule refuses
               st.lists(item, min_size=1, max_size=3),  # a list, not a tuple
               st.integers(), st.text(max_size=8), *_none_unless_optional(rule)]
        if rule.length is not None:
            bad.append(st.lists(item, max_size=4).filter(lambda v: len(v) != rule.length).map(tuple))
        else:
            bad.append(st.lists(item, max_size=rule.min_length - 1).map(tuple)) if rule.min_length > 0 else None
        if rule.increasing:
            bad.append(st.lists(item, min_size=2, max_size=4).map(lambda v: tuple(sorted(v, reverse=True)))
                       .filter(lambda v: v[0] >= v[-1] and len(set(v)) < len(v) or v[0] > v[-1]))
        if rule.include is not None:
            bad.append(st.lists(item, min_size=1, max_size=4).filter(lambda v: rule.include not in v).map(tuple))
        return st.one_of(*[b for b in bad if b is not None])
    raise NotImplementedError(f"no strategy for invalid values of {type(rule).__name__}: add one here")


JUNK = st.sampled_from(["", " ", "x", "1.5e", "0x10", "--", "1,,2"])  # parses as no number at all


def invalid_text(rule) -> st.SearchStrategy:
    """Text typed after an option that ``rule`` (or argparse's type for the option) must refuse."""
    if isinstance(rule, Integer):
        bad = [JUNK, st.floats().filter(lambda x: not (math.isfinite(x) and x.is_integer())).map(str)]
        bad += [st.integers(max_value=rule.low - 1).map(str)] if rule.low is not None else []
        bad += [st.integers(min_value=rule.high + 1).map(str)] if rule.high is not None else []
        return st.one_of(*bad)
    if isinstance(rule, Number):
        return st.one_of(JUNK, invalid(rule).filter(lambda v: isinstance(v, float)).map(str))
    if isinstance(rule, (OneOf, Pattern)):
        return invalid(rule).filter(lambda v: isinstance(v, str))
    if isinstance(rule, Text):
        return st.sampled_from(["", "  "])
    if isinstance(rule, Items):
        item = valid(rule.item).map(str)
        bad = [JUNK, st.lists(invalid_text(rule.item), min_size=1, max_size=3).map(",".join)]
        if rule.length is not None:
            bad.append(st.lists(item, min_size=1, max_size=4).filter(lambda v: len(v) != rule.length).map(",".join))
        if rule.increasing:
            bad.append(st.lists(valid(rule.item), min_size=2, max_size=4).map(lambda v: sorted(v, reverse=True))
                       .filter(lambda v: v[0] >= v[-1]).map(lambda v: ",".join(map(str, v))))
        if rule.include is not None:
            bad.append(st.lists(valid(rule.item), min_size=1, max_size=4).filter(lambda v: rule.include not in v)
                       .map(lambda v: ",".join(map(str, v))))
        return st.one_of(*bad)
    raise NotImplementedError(f"no strategy for invalid text of {type(rule).__name__}: add one here")


def valid(rule) -> st.SearchStrategy:
    """Values an item rule accepts (for the items of an Items rule)."""
    if isinstance(rule, Integer):
        return st.integers(rule.low if rule.low is not None else -1000, rule.high if rule.high is not None else 1000)
    if isinstance(rule, Number):
        return st.floats(rule.low, rule.high, exclude_min=rule.low_open, exclude_max=rule.high_open, allow_nan=False, allow_infinity=False)
    raise NotImplementedError(f"no strategy for valid values of {type(rule).__name__}")


def test_every_setting_has_a_rule_and_every_profile_keeps_them():
    assert set(RULES) == set(FIELDS), "a RiftConfig field needs its rule in riftlab.engine.config.RULES"
    for name, values in PROFILES.items():
        RiftConfig(**values).resolved()  # a preset that breaks a rule would fail every command that uses it


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FIELDS).flatmap(lambda name: st.tuples(st.just(name), invalid(RULES[name]))))
def test_any_invalid_setting_is_refused_by_name_on_one_line(case):
    name, value = case
    with pytest.raises(SettingError) as info:
        RiftConfig(**{name: value}).resolved()
    assert info.value.name == name
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{name} must be ")


# ----------------------------------------------------------------------------------------------
# The same on the command line: any invalid value, exit 2, one line, the run folder untouched


def _commands() -> dict:
    """Each command's argparse parser."""
    return next(a for a in build_parser()._actions if a.dest == "command").choices


def _options_with_rules() -> list[tuple[str, str, str]]:
    """(command, option, dest) for every option that takes a value and has a rule of a kind :func:`invalid` knows, by the
    first command that offers it and the option's first spelling."""
    found = {}
    for command, parser in _commands().items():
        for action in parser._actions:
            rule = OPTION_RULES.get(action.dest, RULES.get(action.dest))
            if action.option_strings and action.nargs != 0 and isinstance(rule, (Integer, Number, OneOf, Text, Pattern, Items)):
                found.setdefault(action.dest, (command, action.option_strings[0], action.dest))
    return sorted(found.values())


CLI_OPTIONS = _options_with_rules()


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder`` with its size, modification time and bytes."""
    out = {".": ("dir", folder.stat().st_mtime_ns)}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        out[str(path.relative_to(folder))] = ("dir", stat.st_mtime_ns) if path.is_dir() else (stat.st_size, stat.st_mtime_ns, path.read_bytes())
    return out


def run_in_process(args: list[str]) -> tuple[int, str]:
    """``riftlab ARGS`` in this process: the exit code and what it wrote to stderr."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(args)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def kept_folder(tmp_path_factory):
    """A run folder with files in it (a lock file, a checkpoint-named file, a subfolder) that no refusal may touch."""
    folder = tmp_path_factory.mktemp("kept")
    (folder / "riftlab.lock").write_text(json.dumps({"riftlab_lock": 1, "stages": {}}))
    (folder / "at.pt").write_bytes(b"someone's bytes")
    (folder / "progress").mkdir()
    (folder / "progress" / "note.txt").write_text("kept")
    return folder


def test_the_command_line_covers_every_setting_it_offers():
    offered = {d for _, _, d in CLI_OPTIONS}
    assert {"width", "at_lr", "at_attack_steps", "at_attack_step", "threshold", "ft_lr", "alphas", "seed", "autoattack", "k"} <= offered
    for command, sub in _commands().items():
        for action in sub._actions:  # every option that takes a value is checked by a rule or by argparse's choices
            if action.option_strings and action.nargs != 0 and action.dest != "help" and command not in ("download", "list"):
                assert action.choices is not None or action.dest in RULES or action.dest in OPTION_RULES, (command, action.dest)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(CLI_OPTIONS).flatmap(lambda c: st.tuples(st.just(c), invalid_text(OPTION_RULES.get(c[2], RULES.get(c[2]))))))
def test_any_invalid_option_exits_2_with_one_line_and_an_untouched_folder(kept_folder, case):
    (command, option, dest), text = case
    before = snapshot(kept_folder)
    base = [] if command in ("demo", "reproduce") else [*TINY, "--epochs" if command == "train-at" else "--eval-steps", "1"]
    code, err = run_in_process([command, *base, "--out", str(kept_folder), f"{option}={text}"])
    assert code == 2, (command, option, text, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"riftlab {command}: error: ") and option in err, (option, err)
    assert snapshot(kept_folder) == before


def test_a_fine_tuning_rate_of_zero_stays_allowed():
    """lr 0 fine-tuning is a control (the weight stays as it is); the AT rate of 0 is not."""
    assert RiftConfig(ft_lr=0.0).resolved().ft_lr == 0.0
    with pytest.raises(SettingError, match="at_lr must be a finite number > 0, got 0.0"):
        RiftConfig(at_lr=0.0).resolved()


# ----------------------------------------------------------------------------------------------
# The cases of the issue, each as the user typed it


@pytest.mark.parametrize("args, message", [
    (["train-at", "--width", "0"], "--width must be an integer >= 1 (first-stage channels or widen factor), got 0"),
    (["train-at", "--width", "-4"], "--width must be an integer >= 1 (first-stage channels or widen factor), got -4"),
    (["rift", "--at-attack-steps", "-1"], "--at-attack-steps must be an integer >= 0 (0: standard training), got -1"),
    (["rift", "--at-lr", "nan"], "--at-lr must be a finite number > 0, got nan"),
    (["train-at", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["rift", "--at-attack-step", "nan"], "--at-attack-step must be a number in (0, 1] (pixel units), got nan"),
    (["interpolate", "--threshold", "nan"], "--threshold must be a finite number >= 0 (points of validation robust accuracy), got nan"),
    (["interpolate", "--threshold", "-1"], "--threshold must be a finite number >= 0 (points of validation robust accuracy), got -1.0"),
    (["evaluate", "--autoattack", "0"], "--autoattack must be an integer >= 1 (images), got 0"),
    (["train-at", "--milestones", "5,3"], "--milestones must be increasing epochs in [1, at_epochs), got (5, 3)"),
    (["train-at", "--epochs", "4", "--milestones", "2,4"], "--milestones must be increasing epochs in [1, at_epochs) = [1, 4), got (2, 4)"),
    (["train-at", "--method", "trades", "--attack-steps", "0"], "--attack-steps must be an integer >= 1 with at_method 'trades'"),
    (["train-at", "--width", "x"], "argument --width: invalid int value: 'x'"),
])
def test_the_reported_bad_values_are_refused_before_any_work(kept_folder, args, message):
    before = snapshot(kept_folder)
    code, err = run_in_process([args[0], *TINY, "--out", str(kept_folder), *args[1:]])
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert snapshot(kept_folder) == before


def test_an_output_folder_inside_a_file_is_refused_before_the_data(tmp_path):
    (tmp_path / "file").write_text("a regular file")
    code, err = run_in_process(["train-at", *TINY, "--out", str(tmp_path / "file" / "run")])
    assert code == 2 and err.count("\n") == 1, err
    assert f"--out must be a folder riftlab can create and write, got '{tmp_path / 'file' / 'run'}' ({tmp_path / 'file'} is a file" in err
    assert (tmp_path / "file").read_text() == "a regular file"


def test_an_output_folder_without_write_permission_is_refused():
    """As an ordinary user (root writes anywhere: as root, the command drops to nobody after its imports)."""
    top = Path(tempfile.mkdtemp(prefix="riftlab-read-only-"))  # outside pytest's own folders, which only their owner can enter
    try:
        top.chmod(0o755)
        folder = top / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        drop = "os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else "pass"
        results = []
        for out in (folder, folder / "run"):
            code = (f"import os, sys\nfrom riftlab.cli import main\n{drop}\n"
                    f"sys.exit(main(['train-at', *{TINY!r}, '--out', {str(out)!r}]))")
            results.append(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300))
        inside, below = results
        assert inside.returncode == 2 and f"({folder} is not writable)" in inside.stderr and inside.stderr.count("\n") == 1, inside.stderr
        assert below.returncode == 2 and f"(cannot create it: {folder} is not writable)" in below.stderr, below.stderr
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(top)


def test_python_entry_points_check_the_same_rules_and_the_folder(tmp_path):
    with pytest.raises(SettingError, match="width must be an integer >= 1"):
        RiftRun(RiftConfig(dataset="synthetic-cifar10", width=0), tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SettingError, match="run directory must be a folder riftlab can create and write"):
        RiftRun(RiftConfig(dataset="synthetic-cifar10"), tmp_path / "file" / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Real tiny runs: a checkpoint that does not fit, a damaged one, a loss that diverges


@pytest.fixture(scope="module")
def at_run(tmp_path_factory):
    """A run folder holding a width-4 AT model, one epoch on 64 images (seconds)."""
    out = tmp_path_factory.mktemp("at-run")
    assert main(["train-at", *TINY, "--epochs", "1", "--attack-steps", "1", "--out", str(out)]) == 0
    return out


EVAL = ["--steps", "1", "--restarts", "1", *DATA, "--no-progress", "--device", "cpu"]


def test_a_checkpoint_of_another_width_leaves_the_folder_as_it_was(at_run, tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    before = snapshot(kept)
    for out in (kept, tmp_path / "new"):
        code, err = run_in_process(["evaluate", "--checkpoint", str(at_run / "at.pt"), "--width", "8", "--out", str(out), *EVAL])
        assert code == 2 and "has shape (4, 3, 3, 3) in the checkpoint but (8, 3, 3, 3) in the model" in err and err.count("\n") == 1, err
    assert snapshot(kept) == before and not (tmp_path / "new").exists()
    # the corrected command then runs into the same folder, no --resume needed
    code, err = run_in_process(["evaluate", "--checkpoint", str(at_run / "at.pt"), "--out", str(kept), *EVAL])
    assert code == 0, err
    assert json.loads((kept / "riftlab.lock").read_text())["stages"]["evaluate/at-test"]["status"] == "done"


def test_a_checkpoint_that_is_a_folder_truncated_or_foreign_says_so(at_run, tmp_path):
    data = (at_run / "at.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 10])  # torch's own error here was "OSError: [Errno 22] Invalid argument"
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    cases = [(at_run, "(it is a directory, not a checkpoint file)"),
             (tmp_path / "cut.pt", "(it is truncated or damaged: a zip archive, PyTorch's format, without its table of contents"),
             (tmp_path / "notes.pt", "(it is not a PyTorch checkpoint (neither a zip archive nor a pickle))"),
             (tmp_path / "absent.pt", "(it does not exist)")]
    for path, message in cases:
        code, err = run_in_process(["evaluate", "--checkpoint", str(path), "--out", str(tmp_path / "out"), *EVAL])
        assert code == 2 and f"--checkpoint must be a PyTorch checkpoint file, got '{path}' {message}" in err, err
    # the run folder's own at.pt, truncated: the step commands read it before any data
    run = tmp_path / "run"
    run.mkdir()
    (run / "at.pt").write_bytes(data[: len(data) // 2])
    code, err = run_in_process(["mrc", "--out", str(run), *DATA, "--no-progress"])
    assert code == 2 and f"checkpoint {run / 'at.pt'}: it is truncated or damaged" in err, err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in run.iterdir()) == ["at.pt"]


def test_a_diverging_loss_stops_with_one_line_and_leaves_no_nan_weights(tmp_path):
    """An lr of 1e30 with one batch per epoch: the first epoch's weights are huge but finite, the second's loss is not."""
    out = tmp_path / "run"
    code, err = run_in_process(["train-at", *TINY, "--lr", "1e30", "--epochs", "2", "--attack-steps", "1", "--batch-size", "64",
                                "--out", str(out)])
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("riftlab train-at: error: stage at: adversarial training: ") and "at batch 1 of epoch 2" in err, err
    assert "learning rate 1e+30" in err and "Lower the learning rate" in err
    assert not (out / "at.pt").exists()
    for path in out.rglob("*.pt"):  # the progress kept (epoch 1) holds only finite numbers
        tensors = [t for t in _tensors(read_checkpoint(path)) if t.is_floating_point()]
        assert tensors and all(torch.isfinite(t).all() for t in tensors), path


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_a_stage_that_fails_before_saving_anything_is_not_left_started(tmp_path):
    def fails(ctx):
        raise ValueError("refused before any work")

    def saves_then_fails(ctx):
        ctx.state.save({"done": 1})
        raise KeyboardInterrupt

    fresh = tmp_path / "fresh" / "run"
    with pytest.raises(ValueError):
        RunDir(fresh).run(Stage("s", {"x": 1}, fails, outputs=("s.json",)))
    assert not (tmp_path / "fresh").exists()  # the folders it would have created are not left behind
    def writes(ctx):
        ctx.write_json("a.json", {})
        return {}

    used = tmp_path / "used"
    RunDir(used).run(Stage("a", {}, writes, outputs=("a.json",)))
    before = snapshot(used)
    with pytest.raises(ValueError):
        RunDir(used).run(Stage("s", {"x": 1}, fails, outputs=("s.json",)))
    assert snapshot(used) == before  # not a byte, not a modification time
    # work that saved progress is kept as started, for --resume
    with pytest.raises(KeyboardInterrupt):
        RunDir(used).run(Stage("s", {"x": 1}, saves_then_fails, outputs=("s.json",)))
    assert json.loads((used / "riftlab.lock").read_text())["stages"]["s"]["status"] == "started"
