"""moe_engine/io.py: an output folder is replaced whole only when moe-lab wrote it (or it is empty), so
``--out`` naming a folder of the user's own files, or a file, refuses before any work and deletes nothing."""

import pytest

from moe_engine.errors import InputError
from moe_engine.io import OUTPUT_MARKER, atomic_output


def _publish(path, text="new"):
    with atomic_output(path) as tmp:
        (tmp / "result.txt").write_text(text)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_published_folder_carries_the_marker_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    _publish(out, "first")
    assert (out / OUTPUT_MARKER).is_file()
    (out / "stale.txt").write_text("from the first run")
    _publish(out, "second")
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "result.txt"])
    assert (out / "result.txt").read_text() == "second" and _leftovers(tmp_path) == []


def test_a_folder_of_the_users_own_files_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "precious"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "important.txt").write_text("keep me")
    ran = []
    with pytest.raises(InputError, match=r"precious exists and holds files moe-lab did not write.*choose a new or empty"):
        with atomic_output(out):
            ran.append(True)
    assert ran == []  # refused before the block ran
    assert (out / "sub" / "important.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["sub"]
    assert _leftovers(tmp_path) == []


def test_a_file_named_as_the_output_folder_is_refused(tmp_path):
    out = tmp_path / "afile"
    out.write_text("mine")
    with pytest.raises(InputError, match="afile is a file, not a folder"):
        _publish(out)
    assert out.read_text() == "mine" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("content", [None, ".gitignore", "metrics.json", "config.json"])
def test_an_empty_folder_or_one_from_before_the_marker_is_replaced(tmp_path, content):
    """Empty, or holding only hidden files (the .gitignore DVC writes beside its outputs), or a stage's
    output from before the marker existed."""
    out = tmp_path / "out"
    out.mkdir()
    if content:
        (out / content).write_text("{}")
    _publish(out)
    assert (out / "result.txt").read_text() == "new" and not (out / "metrics.json").exists()


def test_single_files_are_still_replaced_atomically(tmp_path):
    from moe_engine.io import write_json

    path = write_json(tmp_path / "m.json", {"a": 1})
    write_json(path, {"a": 2})
    assert path.read_text().strip().endswith("}") and '"a": 2' in path.read_text()
