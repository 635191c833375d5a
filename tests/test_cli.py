"""The commands refuse bad arguments before any work (exit code 2, argparse's one-line error)
and write their result files atomically."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from batchnorm.apps import _checks, bench, bench_sync, demo, gradcheck


def _refused(capsys, prog: str, option: str, fn, argv: list[str]) -> str:
    """Run ``fn(argv)``, expect argparse's exit 2, return the one error line."""
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [ln for ln in captured.err.splitlines() if ": error: " in ln]
    assert len(errors) == 1, captured.err
    assert captured.err.rstrip("\n").endswith(errors[0])  # the last line, as argparse does
    assert errors[0].startswith(f"{prog}: error: argument {option}: "), errors[0]
    return errors[0]


def _no_work(monkeypatch, module, name: str) -> None:
    def fail(*args, **kwargs):
        pytest.fail(f"{module.__name__}.{name} ran although an argument was bad")

    monkeypatch.setattr(module, name, fail)


# ---------------------------------------------------------------------------------------------
# demo


@pytest.mark.parametrize(
    "args, option, expected",
    [
        (["--epochs", "0"], "--epochs", "expected an integer >= 1, got 0"),
        (["--epochs", "-2"], "--epochs", "expected an integer >= 1, got -2"),
        (["--epochs", "1.5"], "--epochs", "expected an integer, got '1.5'"),
        (["--batch-size", "0"], "--batch-size", "expected an integer >= 1, got 0"),
        (["--batch-size", "-5"], "--batch-size", "expected an integer >= 1, got -5"),
        (["--train-size", "0"], "--train-size", "expected an integer >= 1, got 0"),
        (["--lr", "-1"], "--lr", "expected a number in (0, inf), got -1"),
        (["--lr", "0"], "--lr", "expected a number in (0, inf), got 0"),
        (["--lr", "nan"], "--lr", "expected a number in (0, inf), got nan"),
        (["--lr", "inf"], "--lr", "expected a number in (0, inf), got inf"),
        (["--seed", "-1"], "--seed", "expected an integer >= 0, got -1"),
        (["--target", "nan"], "--target", "expected a number in (0, 1], got nan"),
        (["--target", "2"], "--target", "expected a number in (0, 1], got 2"),
        (["--target", "0"], "--target", "expected a number in (0, 1], got 0"),
    ],
)
def test_demo_refuses_a_bad_number_before_any_work(tmp_path, monkeypatch, capsys, args, option,
                                                   expected):
    _no_work(monkeypatch, demo, "load_dataset")
    _no_work(monkeypatch, demo, "run_experiment")
    out = tmp_path / "out"
    line = _refused(capsys, "batchnorm demo", option, demo.main,
                    [*args, "--out", str(out), "--no-progress"])
    assert line.endswith(expected)
    assert not out.exists()


def test_demo_refuses_a_batch_larger_than_the_training_set_before_training(
        tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch, demo, "run_experiment")
    line = _refused(capsys, "batchnorm demo", "--batch-size", demo.main,
                    ["--train-size", "200", "--batch-size", "300", "--out", str(tmp_path / "o")])
    assert line.endswith("expected at most the training-set size 200, got 300")


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory in which no file can be created (also for root, who ignores modes)."""
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o500)
    if _checks._probe(d) is not None:
        return d
    d.chmod(0o700)
    # root writes anyway; sysfs refuses new files to everyone.
    if Path("/sys").is_dir() and _checks._probe(Path("/sys")) is not None:
        return Path("/sys")
    pytest.skip("no directory here refuses new files")


def _writable_again(tmp_path: Path) -> None:
    if (tmp_path / "read-only").exists():
        (tmp_path / "read-only").chmod(0o700)  # so that pytest can clean up


@pytest.mark.parametrize("where", ["file", "below-a-file", "read-only-dir",
                                   "below-read-only-dir"])
def test_demo_refuses_an_unusable_out_before_any_work(tmp_path, monkeypatch, capsys, where):
    _no_work(monkeypatch, demo, "load_dataset")
    _no_work(monkeypatch, demo, "run_experiment")
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    if where == "file":
        out = a_file
    elif where == "below-a-file":
        out = a_file / "sub"
    elif where == "read-only-dir":
        out = _read_only_dir(tmp_path)
    else:
        out = _read_only_dir(tmp_path) / "new" / "dir"
    try:
        line = _refused(capsys, "batchnorm demo", "--out", demo.main, ["--out", str(out)])
    finally:
        _writable_again(tmp_path)
    expected = {"file": "expected a directory, got the file",
                "below-a-file": "is a file"}.get(where, "cannot write to")
    assert expected in line
    assert a_file.read_text() == "keep me"


def test_demo_accepts_a_new_nested_out(tmp_path, monkeypatch):
    # The up-front check creates nothing; the results create the directories.
    out = tmp_path / "a" / "b"
    assert demo.main(["--quick", "--epochs", "1", "--train-size", "200", "--no-progress",
                      "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["settings"]["epochs"] == 1


@pytest.fixture(scope="module")
def tiny_results() -> dict:
    return demo.run_experiment("digits", scales=[0.1], epochs=1, headline=False, train_size=200)


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_results_that_are_not_json_leave_the_previous_files(tmp_path, tiny_results):
    """`demo --lr inf` used to leave a truncated results.json: results holding NaN now fail
    before any file is touched."""
    demo.write_results(tiny_results, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)}
    bad = json.loads(json.dumps(tiny_results))
    bad["weight_scale"][0]["with_bn"]["loss"][0] = float("nan")
    with pytest.raises(ValueError, match="JSON"):
        demo.write_results(bad, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)} == before


def test_a_write_that_fails_midway_keeps_the_previous_results(tmp_path, monkeypatch,
                                                             tiny_results):
    demo.write_results(tiny_results, tmp_path)
    old = (tmp_path / "results.json").read_text()
    names = _listing(tmp_path)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_checks.os, "fsync", disk_full)
    changed = json.loads(old)
    changed["settings"]["seed"] = 99
    with pytest.raises(OSError, match="No space left"):
        demo.write_results(changed, tmp_path)
    assert (tmp_path / "results.json").read_text() == old
    assert _listing(tmp_path) == names  # no temporary file left behind


def test_write_text_atomic_replaces_with_the_usual_mode(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    _checks.write_text_atomic(path, "new")
    assert path.read_text() == "new" and _listing(tmp_path) == ["r.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# ---------------------------------------------------------------------------------------------
# bench


@pytest.mark.parametrize("impl, module, hint", [("torch", "torch", "batchnorm[bench]"),
                                                ("numba", "numba", "batchnorm[fast]")])
def test_bench_refuses_an_implementation_that_is_not_installed(monkeypatch, capsys, impl,
                                                               module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    _no_work(monkeypatch, bench, "run_case")
    line = _refused(capsys, "batchnorm bench", "--impls", bench.main,
                    ["--impls", impl, "--cases", "small", "--no-progress"])
    assert f"{impl} asked for" in line and hint in line


def test_bench_without_torch_by_default_runs_the_others(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert bench.main(["--cases", "small", "--modes", "infer", "--repeat", "1", "--json",
                       "--no-first-call", "--no-progress"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["results"]
    assert "torch" not in r["median_ms"] and "numpy" in r["median_ms"]


@pytest.mark.parametrize("where, expected", [
    ("missing-dir", "does not exist"),
    ("a-dir", "expected a file name, got the directory"),
    ("below-a-file", "is a file"),
    ("read-only-dir", "cannot write to"),
])
def test_bench_refuses_an_unusable_save_before_any_work(tmp_path, monkeypatch, capsys, where,
                                                        expected):
    _no_work(monkeypatch, bench, "run_case")
    _no_work(monkeypatch, bench, "copy_bandwidth")
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    if where == "missing-dir":
        path = tmp_path / "nope" / "r.json"
    elif where == "a-dir":
        path = tmp_path
    elif where == "below-a-file":
        path = a_file / "r.json"
    else:
        path = _read_only_dir(tmp_path) / "r.json"
    try:
        line = _refused(capsys, "batchnorm bench", "--save", bench.main,
                        ["--save", str(path), "--cases", "small", "--no-progress"])
    finally:
        _writable_again(tmp_path)
    assert expected in line


def test_bench_save_is_atomic(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bench.json"
    path.write_text('{"old": true}')

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_checks.os, "fsync", disk_full)
    args = ["--cases", "small", "--modes", "infer", "--impls", "numpy", "--repeat", "1",
            "--no-first-call", "--no-progress", "--save", str(path)]
    with pytest.raises(OSError, match="No space left"):
        bench.main(args)
    assert path.read_text() == '{"old": true}' and _listing(tmp_path) == ["bench.json"]
    monkeypatch.undo()
    assert bench.main(args) == 0
    assert json.loads(path.read_text())["results"][0]["case"] == "small"


@pytest.mark.parametrize("args, option", [
    (["--threads", "0"], "--threads"),
    (["--repeat", "0"], "--repeat"),
])
def test_bench_refuses_bad_counts(monkeypatch, capsys, args, option):
    _no_work(monkeypatch, bench, "run_case")
    line = _refused(capsys, "batchnorm bench", option, bench.main,
                    [*args, "--cases", "small", "--no-progress"])
    assert "expected an integer >= 1, got 0" in line


@pytest.mark.parametrize("args, option, expected", [
    (["--threads", "0"], "--threads", "expected an integer >= 1, got 0"),
    (["--repeat", "0"], "--repeat", "expected an integer >= 1, got 0"),
    (["--warmup", "-1"], "--warmup", "expected an integer >= 0, got -1"),
    (["--ranks", "0,2"], "--ranks", "got '0,2'"),
    (["--ranks", "two"], "--ranks", "expected comma-separated integers, got 'two'"),
    (["--shape", "64"], "--shape", "expected at least 2 sizes >= 1"),
    (["--shape", "64,0,3"], "--shape", "expected at least 2 sizes >= 1"),
])
def test_bench_sync_refuses_bad_arguments_before_launching(monkeypatch, capsys, args, option,
                                                           expected):
    _no_work(monkeypatch, bench_sync, "_launch")
    _no_work(monkeypatch, bench_sync, "_worker")
    line = _refused(capsys, "batchnorm bench --sync", option, bench.main, ["--sync", *args])
    assert expected in line


# ---------------------------------------------------------------------------------------------
# gradcheck


@pytest.mark.parametrize("args, option, expected", [
    (["--tolerance", "-1"], "--tolerance", "expected a number in (0, inf), got -1"),
    (["--tolerance", "nan"], "--tolerance", "got nan"),
    (["--tolerance", "0"], "--tolerance", "got 0"),
    (["--seed", "-1"], "--seed", "expected an integer >= 0, got -1"),
])
def test_gradcheck_refuses_bad_arguments(monkeypatch, capsys, args, option, expected):
    _no_work(monkeypatch, gradcheck, "run")
    line = _refused(capsys, "batchnorm gradcheck", option, gradcheck.main, args)
    assert line.endswith(expected)
