"""rlprm/files.py: a crash while writing leaves the previous version, whole; JSONL errors name the line."""

import json

import pytest

from rlprm.files import (atomic_dir, atomic_file, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl,
                         save_figure)


class Crash(Exception):
    pass


def test_a_writer_that_raises_leaves_the_old_file_intact_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(Crash):
        with atomic_file(path) as tmp:
            tmp.write_text('{"v": 2, "half')  # the new version is half-written when the crash comes
            raise Crash
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_generator_that_raises_midway_leaves_the_old_jsonl(tmp_path):
    path = tmp_path / "pool.jsonl"
    atomic_write_jsonl(path, [{"a": 1}, {"a": 2}])

    def rows():
        yield {"a": 10}
        raise Crash

    with pytest.raises(Crash):
        atomic_write_jsonl(path, rows())
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n' and len(list(tmp_path.iterdir())) == 1


def test_write_replaces_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "latest"
    atomic_write_text(path, "epoch-0001\n")
    atomic_write_text(path, "epoch-0002\n")
    assert path.read_text() == "epoch-0002\n" and [p.name for p in path.parent.iterdir()] == ["latest"]


def test_atomic_dir_swaps_in_a_complete_folder_and_keeps_the_old_one_on_error(tmp_path):
    dest = tmp_path / "generator"
    with atomic_dir(dest) as tmp:
        (tmp / "config.json").write_text("1")
    with pytest.raises(Crash):
        with atomic_dir(dest) as tmp:
            (tmp / "config.json").write_text("2")
            raise Crash
    assert (dest / "config.json").read_text() == "1"
    (tmp_path / "generator.tmp").mkdir()  # what a killed earlier try leaves behind
    (tmp_path / "generator.tmp" / "stale").write_text("x")
    with atomic_dir(dest) as tmp:
        assert not list(tmp.iterdir())  # starts empty
        (tmp / "config.json").write_text("3")
    assert [p.name for p in dest.iterdir()] == ["config.json"] and (dest / "config.json").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator"]


def test_save_figure_writes_the_format_of_its_suffix(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG" and len(list(tmp_path.iterdir())) == 1
    assert not plt.get_fignums()  # closed


def test_read_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n{"a": \n')
    rows = read_jsonl(path, ValueError)
    assert next(rows) == (1, {"a": 1}) and next(rows) == (3, [2])
    with pytest.raises(ValueError, match=r"x.jsonl:4: not valid JSON"):
        next(rows)
    with pytest.raises(KeyError, match="nope.jsonl: file not found"):
        list(read_jsonl(tmp_path / "nope.jsonl", KeyError))
