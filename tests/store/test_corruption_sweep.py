"""Every file of a store of each index type, flipped, truncated, extended, deleted or swapped with another:
opening it by default (no `verify`) either refuses it with a `StoreError` naming the file, or gives the
same answers as before. Never a silently different answer, never another exception."""

import shutil
from collections import Counter

import pytest
import torch

import knnmem
from conftest import sharp_model, tiny_config
from test_store import SPECS, filled, read


def flip(offset):
    def mutate(file, other):
        raw = bytearray(file.read_bytes())
        if raw:
            raw[offset(len(raw))] ^= 0x01  # the smallest change: one bit
        file.write_bytes(bytes(raw))
    return mutate


def truncate(keep):
    return lambda file, other: file.write_bytes(file.read_bytes()[: keep(file.stat().st_size)])


def swap(file, other):
    mine, theirs = file.read_bytes(), other.read_bytes()
    file.write_bytes(theirs)
    other.write_bytes(mine)


MUTATIONS = {
    "flip first byte": flip(lambda n: 0), "flip middle byte": flip(lambda n: n // 2), "flip last byte": flip(lambda n: n - 1),
    "truncate to half": truncate(lambda n: n // 2), "truncate last byte": truncate(lambda n: max(n - 1, 0)),
    "append a byte": lambda file, other: file.write_bytes(file.read_bytes() + b"\0"),
    "delete": lambda file, other: file.unlink(), "swap with the next file": swap,
}


def sweep(model, index, options, root):
    """Outcome counts ('refused', 'unaffected', 'wrong: ...') of every mutation of every file of one store."""
    reference_store = root / "reference"
    filled(model, index, **options).save(reference_store)
    query = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = read(model, knnmem.Memory.load(reference_store, model=model), query)
    files = sorted(p.relative_to(reference_store) for p in reference_store.rglob("*") if p.is_file())
    outcomes = Counter()
    for i, name in enumerate(files):
        other = files[(i + 1) % len(files)]
        for mutation, mutate in MUTATIONS.items():
            store = root / f"case{i}"
            shutil.copytree(reference_store, store)
            mutate(store / name, store / other)
            try:
                with knnmem.Memory.load(store, model=model) as memory:
                    answer = read(model, memory, query)
            except knnmem.StoreError as error:
                named = name.name in str(error) or (mutation.startswith("swap") and other.name in str(error))
                outcomes["refused" if named else f"wrong: refused without naming {name}: {error}"] += 1
            except Exception as error:  # noqa: BLE001  what the sweep exists to find
                outcomes[f"wrong: {mutation} of {name} raised {type(error).__name__}: {error}"] += 1
            else:
                outcomes["unaffected" if torch.equal(answer, expected) else f"wrong: {mutation} of {name} answered"] += 1
            shutil.rmtree(store)
    return outcomes


@pytest.mark.parametrize("index, options", SPECS)
def test_corruption_is_refused_or_harmless(index, options, tmp_path):
    outcomes = sweep(sharp_model(tiny_config()), index, options, tmp_path)
    wrong = {outcome: count for outcome, count in outcomes.items() if outcome.startswith("wrong")}
    assert not wrong, wrong
    assert outcomes["refused"] > outcomes["unaffected"]
