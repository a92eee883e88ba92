"""Writing a store: only what a store writer created is ever deleted, one writer at a time, and a failed
write (a full disk) leaves the previous store and no partial generation behind."""

import errno
import os

import pytest

import knnmem
from conftest import sharp_model, tiny_config
from knnmem.store import format as fmt
from test_store import filled


@pytest.fixture
def model():
    return sharp_model(tiny_config())


def generations(store):
    return sorted(p.name for p in store.iterdir() if p.name.startswith("data-"))


def test_user_files_beside_a_store_are_never_deleted(model, tmp_path):
    store = tmp_path / "store"
    filled(model, "Flat", k=8).save(store)
    (store / "data-important").mkdir()
    (store / "data-important" / "a.txt").write_text("work")
    (store / "draft.tmp").write_text("d")
    (store / "data-0123456789ab").mkdir()  # a generation's name, but holding a file no store writes
    (store / "data-0123456789ab" / "notes.txt").write_text("mine")
    filled(model, "Flat", k=8).save(store)
    assert (store / "data-important" / "a.txt").read_text() == "work" and (store / "draft.tmp").read_text() == "d"
    assert (store / "data-0123456789ab" / "notes.txt").read_text() == "mine"
    assert len(knnmem.Memory.load(store, model=model, verify=True)) == 249
    assert len([g for g in generations(store) if g != "data-important"]) == 2  # the new one and the user's


def test_a_directory_that_is_not_a_store_is_refused(model, tmp_path):
    folder = tmp_path / "work"
    (folder / "data-important").mkdir(parents=True)
    (folder / "data-important" / "a.txt").write_text("work")
    (folder / "draft.tmp").write_text("d")
    with pytest.raises(knnmem.StoreError, match=r"work: not a knnmem store and not empty \(holds data-important, "
                                                r"draft.tmp\); write the store to a new or empty directory"):
        filled(model, "Flat", k=8).save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["data-important", "draft.tmp"]
    (folder / "manifest.json").write_text("{}")  # someone else's manifest
    with pytest.raises(knnmem.StoreError, match="manifest.json: format version None is not supported"):
        filled(model, "Flat", k=8).save(folder)
    assert (folder / "manifest.json").read_text() == "{}"


def test_a_file_in_place_of_the_store_is_refused(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(knnmem.StoreError, match=r"file: is a file, not a directory$"):
        filled(model).save(tmp_path / "file")
    with pytest.raises(knnmem.StoreError, match=r"file: is a file, not a directory \(cannot create .*file/sub/store"):
        filled(model).save(tmp_path / "file" / "sub" / "store")


def test_leftovers_of_a_killed_first_save_are_cleaned(model, tmp_path):
    store = tmp_path / "store"
    (store / "data-00000000000a").mkdir(parents=True)
    (store / "data-00000000000a" / "layer1.keys.bin").write_bytes(b"partial")
    (store / "manifest.json.data-00000000000a.tmp").write_text("{")
    filled(model).save(store)
    assert sorted(p.name for p in store.iterdir()) == sorted([*generations(store), "manifest.json", "write.lock"])
    assert len(generations(store)) == 1


def test_a_second_writer_is_refused_by_name(model, tmp_path):
    store = tmp_path / "store"
    filled(model).save(store)
    with fmt.write_lock(store):
        with pytest.raises(knnmem.StoreError, match=rf"store: the store is being written by process {os.getpid()}"):
            filled(model).save(store)
    filled(model).save(store)  # free again


def test_a_full_disk_removes_the_new_generation(model, tmp_path, monkeypatch):
    store = tmp_path / "store"
    filled(model, "HNSW32", k=16).save(store)
    before = (store / "manifest.json").read_text()
    real_open = open

    class FullDisk:
        """A file on a device that fills up after 100 bytes."""

        def __init__(self, file):
            self.handle, self.file = real_open(file, "xb"), file

        def write(self, data):
            self.handle.write(bytes(memoryview(data)[:100]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("layer2.values.bin"):
            return FullDisk(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(fmt, "open", failing_open, raising=False)
    with pytest.raises(knnmem.StoreError, match=r"layer2.values.bin: cannot be written \(no space left on the device: "
                                                r"the disk is full; free space and save again\)"):
        filled(model).save(store)
    assert (store / "manifest.json").read_text() == before and len(generations(store)) == 1
    assert len(knnmem.Memory.load(store, model=model, verify=True)) == 249
