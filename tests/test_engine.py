"""The run engine (riftlab.engine.runner): stages reused, resumed or refused by their fingerprints."""

import json

import pytest

from riftlab.engine.runner import FileState, RunDir, Stage, StageMismatch, UnfinishedStage, fingerprint, plain


def _counting(calls, name, value, fail_after=None):
    """A stage body that writes ``<name>.txt`` with ``value`` and counts its calls; it can die half-way."""

    def compute(ctx):
        calls.append(name)
        done = (ctx.state.load() or {}).get("done", 0)
        for i in range(done, 3):  # three units of work, each saved
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt
            ctx.state.save({"done": i + 1})
        ctx.write_json(f"{name}.txt", {"value": value, "resumed_from": done})
        return {"value": value, "resumed_from": done}

    return compute


def test_a_finished_stage_with_the_same_settings_is_reused(tmp_path):
    calls = []
    run = RunDir(tmp_path)
    first = run.run(Stage("a", {"lr": 0.1, "epochs": [1, 2]}, _counting(calls, "a", 1), outputs=("a.txt",)))
    again = RunDir(tmp_path).run(Stage("a", {"lr": 0.1, "epochs": (1, 2)}, _counting(calls, "a", 2), outputs=("a.txt",)))
    assert calls == ["a"] and first == again == {"value": 1, "resumed_from": 0}
    record = json.loads((tmp_path / "riftlab.lock").read_text())["stages"]["a"]
    assert record["status"] == "done" and record["params"] == {"lr": 0.1, "epochs": [1, 2]} and set(record["outputs"]) == {"a.txt"}
    assert not (tmp_path / "progress" / "a.pt").exists()  # a finished stage's progress is cleared


def test_other_settings_are_refused_by_name_with_both_values(tmp_path):
    calls = []
    RunDir(tmp_path).run(Stage("ft", {"module": "layer1.0.conv1", "lr": 0.001}, _counting(calls, "ft", 1), outputs=("ft.txt",)))
    with pytest.raises(StageMismatch, match=r"stage ft .*module: 'layer1\.0\.conv1' there, 'layer2\.0\.conv1' now.*--overwrite"):
        RunDir(tmp_path, resume=True).run(Stage("ft", {"module": "layer2.0.conv1", "lr": 0.001}, _counting(calls, "ft", 2), outputs=("ft.txt",)))
    assert calls == ["ft"] and json.loads((tmp_path / "ft.txt").read_text())["value"] == 1  # nothing lost or mislabelled
    # --overwrite redoes it, under the new settings.
    RunDir(tmp_path, overwrite=True).run(Stage("ft", {"module": "layer2.0.conv1", "lr": 0.001}, _counting(calls, "ft", 2), outputs=("ft.txt",)))
    assert calls == ["ft", "ft"] and json.loads((tmp_path / "ft.txt").read_text())["value"] == 2


def test_a_redone_input_makes_its_dependants_refuse_to_be_reused(tmp_path):
    calls = []
    up = lambda lr, v: Stage("up", {"lr": lr}, _counting(calls, "up", v), outputs=("up.txt",))  # noqa: E731
    down = Stage("down", {"alpha": 0.5}, _counting(calls, "down", 1), inputs=("up",), outputs=("down.txt",))
    RunDir(tmp_path).run(up(0.1, 1))
    RunDir(tmp_path).run(down)
    RunDir(tmp_path, overwrite=True).run(up(0.2, 2))  # the input is redone with another setting
    with pytest.raises(StageMismatch, match="computed from an earlier result of stage up"):
        RunDir(tmp_path).run(down)
    RunDir(tmp_path, overwrite=True).run(down)
    assert calls == ["up", "down", "up", "down"]


def test_an_unfinished_stage_needs_resume_and_continues_where_it_stopped(tmp_path):
    calls = []
    stage = lambda fail: Stage("long", {"n": 3}, _counting(calls, "long", 7, fail_after=fail), outputs=("long.txt",))  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        RunDir(tmp_path).run(stage(2))  # killed after two of three units
    assert json.loads((tmp_path / "riftlab.lock").read_text())["stages"]["long"]["status"] == "started"
    with pytest.raises(UnfinishedStage, match="unfinished stage long.*pass --resume"):
        RunDir(tmp_path).run(stage(None))
    assert RunDir(tmp_path, resume=True).run(stage(None)) == {"value": 7, "resumed_from": 2}
    # A resume with other settings is refused, not continued.
    with pytest.raises(KeyboardInterrupt):
        RunDir(tmp_path / "b").run(Stage("long", {"n": 3}, _counting(calls, "long", 7, fail_after=1), outputs=("long.txt",)))
    with pytest.raises(StageMismatch, match="n: 3 there, 4 now"):
        RunDir(tmp_path / "b", resume=True).run(Stage("long", {"n": 4}, _counting(calls, "long", 7), outputs=("long.txt",)))


def test_changed_missing_and_foreign_files_are_refused(tmp_path):
    calls = []
    stage = Stage("a", {"x": 1}, _counting(calls, "a", 1), outputs=("a.txt",))
    RunDir(tmp_path).run(stage)
    (tmp_path / "a.txt").write_text("edited by hand")
    with pytest.raises(StageMismatch, match="a.txt has changed since stage a wrote it"):
        RunDir(tmp_path).run(stage)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(FileNotFoundError, match="a.txt is missing, but stage a"):
        RunDir(tmp_path).run(stage)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("not riftlab's")
    with pytest.raises(FileExistsError, match="has no record of the stage a"):
        RunDir(other).run(stage)
    assert (other / "a.txt").read_text() == "not riftlab's"


def test_adopted_stages_are_reused_whatever_their_settings(tmp_path):
    calls = []
    RunDir(tmp_path).run(Stage("at", {"epochs": 110}, _counting(calls, "at", 1), outputs=("at.txt",)))
    adopted = RunDir(tmp_path, overwrite=True).run(Stage("at", {"source": "existing"}, _counting(calls, "at", 2), outputs=("at.txt",), adopt=True))
    assert calls == ["at"] and adopted["value"] == 1


def test_a_stage_writes_only_what_it_declares(tmp_path):
    def sneaky(ctx):
        ctx.write_json("other.txt", {})

    with pytest.raises(RuntimeError, match="does not declare"):
        RunDir(tmp_path).run(Stage("s", {}, sneaky, outputs=("s.txt",)))


def test_fingerprints_follow_the_settings_not_their_spelling():
    assert fingerprint({"a": (1, 2), "b": 0.1}) == fingerprint({"b": 0.1, "a": [1, 2]})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert plain({"x": (1, float("nan"))}) == {"x": [1, "nan"]}


def test_file_state_children_and_clear(tmp_path):
    state = FileState(tmp_path / "p.pt")
    assert state.load() is None
    state.save({"a": 1})
    child = state.child("c")
    child.save({"b": 2})
    assert FileState(tmp_path / "p.pt").load() == {"a": 1} and FileState(tmp_path / "p" / "c.pt").load() == {"b": 2}
    state.clear()
    assert state.load() is None and child.load() is None
    throttled = FileState(tmp_path / "t.pt", min_interval=3600)
    throttled.save({"n": 1})
    throttled.save({"n": 2})  # within the interval: skipped (a resume redoes at most that much work)
    assert throttled.load() == {"n": 1}
