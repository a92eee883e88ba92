"""Codecs of the entry store: round trips and their error bounds, PQ training and state, spec parsing."""

import faiss
import numpy as np
import pytest
import torch

from knnmem.memory import EntryStore
from knnmem.memory.codecs import CastCodec, Int8Codec, ProductCodec, codec_spec, make_codecs


def vectors(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 5  # norms that differ from vector to vector


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cast_codecs_store_the_dtype(dtype):
    x = vectors(2, 3, 10, 8)
    codec = CastCodec(dtype)
    assert torch.equal(codec.decode(codec.encode(x)), x.to(dtype)) and codec.width(8) == 8


def test_int8_error_is_half_a_step_of_each_vectors_scale():
    x = vectors(2, 3, 50, 16)
    codec = Int8Codec(torch.float32)
    stored = codec.encode(x)
    assert stored.dtype == torch.int8 and stored.shape == (2, 3, 50, 18)
    step = x.abs().amax(-1, keepdim=True) / 127
    # Half a step of rounding, plus the float16 scale's relative error (2**-11) over up to 127 steps.
    assert ((codec.decode(stored) - x).abs() <= step * (0.5 + 127 * 2.0**-11)).all()
    assert torch.equal(codec.encode(codec.decode(stored)), stored)  # decoding then encoding changes nothing
    assert codec.decode(codec.encode(torch.zeros(1, 1, 2, 16))).abs().max() == 0


def test_product_codec_trains_encodes_decodes_and_restores_its_codebook():
    x = vectors(1, 2, 700, 8)  # (B, H, N, D)
    codec = ProductCodec(subvectors=4, bits=4, num_heads=2, head_dim=8, out_dtype=torch.float32)
    assert not codec.trained and codec.train_size == 39 * 16
    assert torch.equal(codec.decode(codec.encode(x)), x)  # until trained: stored as they are
    codec.train(x[0])
    codes = codec.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == (1, 2, 700, 4) and int(codes.max()) < 16
    decoded = codec.decode(codes)
    assert float((decoded - x).norm() / x.norm()) < 0.4  # 16 centroids per pair of dimensions of Gaussian data
    pq = faiss.ProductQuantizer(8, 4, 4)  # Faiss's own decoding of its own codes, with head 1's codebook
    faiss.copy_array_to_vector(codec.state()["codebook"][1].reshape(-1).numpy(), pq.centroids)
    expected = pq.decode(pq.compute_codes(x[0, 1].numpy()))
    torch.testing.assert_close(decoded[0, 1], torch.from_numpy(expected))
    assert torch.equal(codec.decode(codes[:, 1:], slice(1, 2)), decoded[:, 1:])  # per-head codebooks
    assert torch.equal(codec.encode(decoded), codes)  # a centroid encodes as itself
    restored = ProductCodec(subvectors=4, bits=4, num_heads=2, head_dim=8, out_dtype=torch.float32)
    restored.load_state(codec.state())
    assert torch.equal(restored.decode(codes), decoded)
    with pytest.raises(ValueError, match=r"pq2x4 codebook is \(2, 4, 16, 2\) torch.float32, expected \(2, 2, 16, 4\)"):
        ProductCodec(subvectors=2, bits=4, num_heads=2, head_dim=8, out_dtype=torch.float32).load_state(codec.state())
    with pytest.raises(ValueError, match="non-finite"):
        restored.load_state({"codebook": torch.full((2, 4, 16, 2), float("nan"))})


def test_entry_store_trains_its_value_codec_once_enough_entries_exist():
    keys, values = make_codecs("int8/pq2x4", num_heads=2, head_dim=8, dtype=torch.float32)
    store = EntryStore(num_heads=2, head_dim=8, codec=(keys, values))
    x = vectors(1, 2, 900, 8)
    valid = torch.ones(1, 900, dtype=torch.bool)
    for start in range(0, 900, 100):
        store.add(x[:, :, start : start + 100], x[:, :, start : start + 100], valid[:, start : start + 100])
        assert values.trained == (start + 100 >= values.train_size)
    assert store.encoded()[1].dtype == torch.uint8  # every value, the staged ones too, is a code now
    ids = torch.randint(0, 900, (1, 2, 3, 5))
    taken, _ = store.take(ids, slice(None))
    expected = store.values().gather(2, ids.view(1, 2, 15, 1).expand(-1, -1, -1, 8)).view(1, 2, 3, 5, 8)
    assert torch.equal(taken, expected)  # decoding only the entries taken gives what decoding all does


def test_values_the_codes_reconstruct_worst_are_kept_exactly_and_read_in_their_place():
    keys, values = make_codecs("float32/pq2x4", num_heads=2, head_dim=8, dtype=torch.float32)
    store = EntryStore(num_heads=2, head_dim=8, codec=(keys, values))
    x = vectors(1, 2, 1200, 8)
    x[0, 1, 1000] = 40.0  # added after training, far from everything the codebook learnt
    valid = torch.ones(1, 1200, dtype=torch.bool)
    valid[0, 1100] = False
    x[0, :, 1100] = 60.0  # as badly coded, but padding: never read, so not kept
    for start in range(0, 1200, 200):  # trained at 800 entries, on all of them
        store.add(x[:, :, start : start + 200], x[:, :, start : start + 200], valid[:, start : start + 200])
        if start == 600:
            trained = values.error_bound.clone()
    state = values.state()
    expected = set()
    for h in range(2):  # each head's squared code errors, from Faiss's own encoding and decoding
        pq = faiss.ProductQuantizer(8, 2, 4)
        faiss.copy_array_to_vector(state["codebook"][h].reshape(-1).numpy(), pq.centroids)
        head = x[0, h].numpy()
        errors = ((pq.decode(pq.compute_codes(head)) - head) ** 2).sum(1)
        assert float(trained[h]) == pytest.approx(np.quantile(errors[:800], 0.999), rel=1e-5)
        poor = sorted((i for i in np.flatnonzero(errors > float(trained[h])) if valid[0, i]), key=lambda i: errors[i])
        assert len(poor) > 2
        # of those, the worst coded 0.1% of 1,199 valid entries (2) are kept; the bound rose past the others
        expected |= {(0, h, i) for i in poor[-2:]}
        assert errors[poor[-3]] == pytest.approx(float(state["error_bound"][h]), rel=1e-5)
    where, exact = store.exact_values()
    assert set(map(tuple, where.tolist())) == expected and (0, 1, 1000) in expected
    assert torch.equal(exact, x[where[:, 0], where[:, 1], where[:, 2]])
    ids = torch.tensor([1000, 5, 1100, -1]).view(1, 1, 1, 4).expand(1, 2, 1, 4)
    taken, ok = store.take(ids, slice(None))
    assert torch.equal(taken[0, 1, 0, 0], x[0, 1, 1000])  # the kept value, not its code's
    assert not torch.equal(taken[0, 1, 0, 2], x[0, 1, 1100]) and ok.tolist() == [[[[True, True, False, False]]] * 2]
    assert torch.equal(store.values()[0, :, [1000, 5]], taken[0, :, 0, :2])  # every way of reading agrees
    assert torch.equal(next(store.chunks(1 << 10))[1], store.values()[:, :, : 1 << 10])
    twin = EntryStore(num_heads=2, head_dim=8, codec=(keys, values))  # the same entries, as a store reopens them
    twin.attach(*store.encoded(), store.valid.clone(), store.exact_values())
    more = vectors(1, 2, 800, 8, seed=1) * 3  # coded worse than most: the kept ones give way to the worst of both
    for kept in (store, twin):
        kept.add(more, more, torch.ones(1, 800, dtype=torch.bool))
    assert all(map(torch.equal, store.exact_values(), twin.exact_values())) and len(store.exact_values()[0]) == 2 * 2
    x = torch.cat([x, more], 2)
    store.reorder_rows(torch.tensor([0, 0]))  # beams: each row keeps the values kept exactly of the row it copies
    assert torch.equal(store.values()[1], store.values()[0]) and len(store.exact_values()[0]) == 2 * 4
    where = store.exact_values()[0]
    assert torch.equal(store.values()[where.unbind(1)], x[0][where[:, 1:].unbind(1)])
    store.reorder_rows(torch.tensor([1]))
    assert set(map(tuple, store.exact_values()[0].tolist())) == set(map(tuple, twin.exact_values()[0].tolist()))


def test_beams_without_values_kept_exactly_read_their_codes():
    keys, values = make_codecs("float32/pq2x4", num_heads=2, head_dim=8, dtype=torch.float32)
    store = EntryStore(num_heads=2, head_dim=8, codec=(keys, values))
    x = vectors(2, 2, 700, 8)
    x[0, :, 650] = 40.0
    valid = torch.ones(2, 700, dtype=torch.bool)
    valid[1] = False  # a row of padding keeps nothing exactly
    store.add(x, x, valid)
    assert set(store.exact_values()[0][:, 0].tolist()) == {0}
    store.reorder_rows(torch.tensor([1, 1]))  # the beams that kept values are pruned
    assert not len(store.exact_values()[0])
    taken, _ = store.take(torch.tensor([650, 3]).view(1, 1, 1, 2).expand(2, 2, 1, 2), slice(None))
    assert torch.equal(taken[:, :, 0], store.values()[:, :, [650, 3]]) and next(store.chunks())[1].shape == (2, 2, 700, 8)


def test_pq_codecs_trained_before_error_bounds_keep_no_value_exactly():
    codec = ProductCodec(subvectors=2, bits=4, num_heads=2, head_dim=8, out_dtype=torch.float32)
    x = vectors(1, 2, 700, 8)
    codec.train(x[0])
    old = ProductCodec(subvectors=2, bits=4, num_heads=2, head_dim=8, out_dtype=torch.float32)
    old.load_state({"codebook": codec.state()["codebook"]})
    assert old.error_bound is None and codec.error_bound.shape == (2,)
    store = EntryStore(num_heads=2, head_dim=8, codec=(CastCodec(torch.float32), old))
    store.add(x, x, torch.ones(1, 700, dtype=torch.bool))
    assert not len(store.exact_values()[0]) and torch.equal(store.values(), old.decode(old.encode(x)))
    for bound in (torch.tensor([1.0]), torch.tensor([1.0, float("inf")]), torch.tensor([-1.0, 1.0])):
        with pytest.raises(ValueError, match="error bound must be 2 finite non-negative float32 numbers"):
            old.load_state({"codebook": codec.state()["codebook"], "error_bound": bound})


@pytest.mark.parametrize("spec, expected", [(None, "float32"), ("int8", "int8"), ("bfloat16/int8", "bfloat16/int8"),
                                            ("int8/pq4", "int8/pq4"), ("float16/pq2x6", "float16/pq2x6")])
def test_codec_specs_round_trip(spec, expected):
    assert codec_spec(*make_codecs(spec, num_heads=2, head_dim=8, dtype=torch.float32)) == expected


@pytest.mark.parametrize("spec, message", [
    ("zstd", "unknown codec 'zstd'"),
    ("pq4", "keys are ranked by the index and cannot be product-quantized here"),
    ("int8/pq3", "head dimension 8 is not a multiple of 3 sub-vectors"),
    ("int8/pq4x9", "bits per sub-vector must be 1-8"),
    ("int8/int8/int8", "codec spec must be a codec name or KEYS/VALUES"),
])
def test_bad_codec_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        make_codecs(spec, num_heads=2, head_dim=8, dtype=torch.float32)
