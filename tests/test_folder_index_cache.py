"""The folder index cache: header checks done once, reused while files are unchanged, safe to share."""

import json
import os
import tempfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import folder, folder_index_cache

OLD = time.time() - 3600  # a modification time well outside the racy window


def _tree(root, old: bool = True):
    """root/{a,b}/ with 6 small PNGs each and one broken JPEG in a/; mtimes an hour ago when `old`."""
    rng = np.random.default_rng(0)
    for class_name in ("a", "b"):
        os.makedirs(root / class_name)
        for i in range(6):
            array = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / class_name / f"{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    if old:
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                os.utime(os.path.join(dirpath, name), (OLD, OLD))
    return root


@pytest.fixture
def header_reads(monkeypatch):
    """The paths whose headers index_folder reads, in order."""
    reads = []
    check = folder._is_readable_image

    def counting(path):
        reads.append(path)
        return check(path)

    monkeypatch.setattr(folder, "_is_readable_image", counting)
    folder.index_folder.cache_clear()
    yield reads
    folder.index_folder.cache_clear()


def _index(root):
    folder.index_folder.cache_clear()
    return folder.index_folder(str(root), val_fraction=0.4, max_bad_image_fraction=0.2)


def test_second_index_reads_no_header_and_equals_the_first(tmp_path, header_reads):
    root = _tree(tmp_path / "data")
    first = _index(root)
    assert len(header_reads) == 13
    assert os.path.isfile(root / folder_index_cache.CACHE_NAME)
    header_reads.clear()
    second = _index(root)
    assert header_reads == []
    assert second == first
    assert second.bad_files == (str(root / "a" / "broken.jpg"),)


def test_changed_added_and_removed_files_are_rechecked_and_only_they(tmp_path, header_reads):
    root = _tree(tmp_path / "data")
    _index(root)
    header_reads.clear()
    changed, added, removed = root / "b" / "0.png", root / "b" / "new.png", root / "a" / "1.png"
    changed.write_bytes(b"\x89PNG broken now")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(added)
    for path in (changed, added):
        os.utime(path, (OLD + 60, OLD + 60))
    removed.unlink()
    index = _index(root)
    assert sorted(header_reads) == sorted([str(changed), str(added)])
    assert set(index.bad_files) == {str(root / "a" / "broken.jpg"), str(changed)}
    listed = {path for path, _ in index.train + index.eval}
    assert str(added) in listed and str(removed) not in listed
    header_reads.clear()
    _index(root)
    assert header_reads == []


def test_files_changed_within_the_racy_window_are_checked_every_time(tmp_path, header_reads):
    root = _tree(tmp_path / "data", old=False)
    _index(root)
    _index(root)
    assert len(header_reads) == 26


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"format": "other", "root": "/", "files": {}}', b'{"format": 3}', b"[1, 2]"],
)
def test_a_damaged_or_foreign_cache_file_is_ignored_and_rewritten(tmp_path, header_reads, content):
    root = _tree(tmp_path / "data")
    cache = root / folder_index_cache.CACHE_NAME
    cache.write_bytes(content)
    _index(root)
    assert len(header_reads) == 13
    saved = json.loads(cache.read_text())
    assert saved["format"] == folder_index_cache.FORMAT
    assert saved["root"] == os.path.abspath(root)
    assert len(saved["files"]) == 13


def test_a_cache_that_cannot_be_written_beside_the_data_goes_to_the_user_cache(
    tmp_path, header_reads, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = _tree(tmp_path / "data")
    # The data folder refuses new files (as a read-only mount would; the tests run as root, whom
    # permission bits do not stop, so the refusal is simulated).
    create_temporary = tempfile.NamedTemporaryFile

    def refusing(*args, dir=None, **kwargs):
        if os.path.abspath(dir) == os.path.abspath(root):
            raise PermissionError(13, "Read-only file system", dir)
        return create_temporary(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refusing)
    _index(root)
    assert not os.path.exists(root / folder_index_cache.CACHE_NAME)
    cached = os.listdir(tmp_path / "cache" / "resnet_jax" / "folder_index")
    assert len(cached) == 1 and cached[0].endswith(".json")
    header_reads.clear()
    _index(root)
    assert header_reads == []


def test_processes_indexing_at_once_all_succeed_and_leave_one_whole_cache(tmp_path):
    root = _tree(tmp_path / "data")
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file())
    expected = [not path.endswith("broken.jpg") for path in paths]
    results, errors = [], []

    def index_once():
        try:
            verdicts, _ = folder_index_cache.check_files(
                str(root), paths, lambda to_check: [not p.endswith("broken.jpg") for p in to_check]
            )
            results.append(verdicts)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=index_once) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [expected] * 8
    leftovers = [name for name in os.listdir(root) if name.endswith(".tmp")]
    assert leftovers == []
    assert len(folder_index_cache.load(str(root))) == len(paths)
