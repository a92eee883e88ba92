import warnings

import faiss
import numpy as np
import pytest
import torch
from torch.testing import assert_close

import knnmem
from knnmem.memory.faiss_index import inner_index, reduced_layout
from knnmem.memory import exact_top_k

# Every top-k backend, with options under which it must be exact once k covers the memory.
EXACT_WHEN_K_COVERS = [
    ("torch", {}),
    ("Flat", {}),
    ("HNSW32", {}),
    ("IVF4,Flat", dict(train_size=20, nprobe=4)),  # trained mid-stream, all lists probed
    ("IVF2,PQ4x4", dict(train_size=30, nprobe=2)),  # PQ ranks approximately, but every entry is retrieved
    ("IVF4,Flat", dict(train_size=20, nprobe=4, l2_reduction=True)),
]


def forward(model, ids, memory=None, **kwargs):
    with torch.no_grad():
        return model(ids, memory=memory, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("index, options", EXACT_WHEN_K_COVERS)
def test_top_k_covering_memory_equals_dense(make_model, index, options):
    model = make_model()
    torch.manual_seed(2)
    ids = torch.randint(1, 96, (2, 60))
    mask = torch.ones_like(ids)
    mask[0, :11] = 0
    dense = forward(model, ids, attention_mask=mask)
    memory = knnmem.Memory.create(model, index=index, k=64, **options)
    got = forward(model, ids, memory, attention_mask=mask)
    assert len(memory) == 60
    assert_close(got[mask.bool()], dense[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index, options", EXACT_WHEN_K_COVERS)
def test_top_k_covering_memory_equals_dense_in_generation(make_model, index, options):
    model = make_model(max_position_embeddings=8, last_context_length=6)
    torch.manual_seed(5)
    prompt = torch.randint(1, 96, (1, 40))
    kwargs = dict(max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True)
    dense = model.generate(prompt, **kwargs)
    memory = knnmem.Memory.create(model, index=index, k=64, **options)
    knn = model.generate(prompt, memory=memory, **kwargs)
    assert torch.equal(knn.sequences, dense.sequences)
    assert_close(torch.stack(knn.scores), torch.stack(dense.scores), rtol=1e-5, atol=1e-5)
    assert len(memory) > 40  # the local cache overflowed into memory during generation


def test_small_k_approximates_and_changes_results(make_model, ids):
    model = make_model()
    dense = forward(model, ids)
    top2 = forward(model, ids, knnmem.Memory.create(model, index="torch", k=2))
    top16 = forward(model, ids, knnmem.Memory.create(model, index="torch", k=16))
    error2, error16 = (top2 - dense).abs().max(), (top16 - dense).abs().max()
    assert error2 > 1e-3 and error16 < error2


def unit_keys(batch, heads, count, dim, seed):
    torch.manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(batch, heads, count, dim), dim=-1)
    return keys


@pytest.mark.parametrize(
    "index, options",
    [("torch", {}), ("Flat", {}), ("HNSW32", {}), ("IVF4,Flat", dict(train_size=100, nprobe=4)),
     ("Flat", dict(l2_reduction=True))],
)
def test_searching_a_stored_key_returns_its_own_id_and_value(index, options):
    memory = knnmem.Memory(layers=[0], num_heads=2, head_dim=16, dtype=torch.float32, index=index, k=3, **options)
    for chunk in range(4):  # IVF trains between the 2nd and 3rd chunk; ids must survive it
        keys = unit_keys(2, 2, 40, 16, seed=chunk)
        ids = torch.arange(chunk * 40, chunk * 40 + 40, dtype=torch.float32)
        values = ids[None, None, :, None].expand(2, 2, 40, 16)  # value = its own id
        valid = torch.ones(2, 40, dtype=torch.bool)
        valid[1, ::5] = False
        memory.add(0, keys, values, valid)
    stored = memory.entries(0)
    hits = memory.search(0, stored.keys(), slice(0, 2))  # (B, H, M, K)
    expected = torch.arange(160).expand(2, 2, 160)
    row0_ok = hits.ids[0, :, :, 0] == expected[0]
    assert row0_ok.all()
    kept = stored.valid[1]
    assert (hits.ids[1, :, kept, 0] == expected[1][:, kept]).all()
    assert not torch.isin(hits.ids[1][hits.valid[1]], torch.arange(0, 160, 5)).any()  # padding never inserted
    assert torch.equal(hits.values[..., 0][hits.valid], hits.ids[hits.valid].float())


def test_l2_reduction_ranks_by_inner_product():
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 500, 16) * torch.rand(1, 1, 500, 1) * 3  # varied norms
    queries = torch.randn(1, 1, 20, 16)
    exact = exact_top_k(queries, keys, torch.ones(1, 500, dtype=torch.bool), k=10)[1]
    memory = knnmem.Memory(layers=[0], num_heads=1, head_dim=16, dtype=torch.float32, index="Flat", k=10,
                           l2_reduction=True)
    memory.add(0, keys, keys, torch.ones(1, 500, dtype=torch.bool))
    hits = memory.search(0, queries, slice(0, 1))
    assert torch.equal(hits.ids.sort(-1).values, exact.sort(-1).values)
    plain_l2 = (queries[0, 0, :, None] - keys[0, 0, None]).norm(dim=-1).topk(10, largest=False).indices
    assert not torch.equal(plain_l2.sort(-1).values, exact[0, 0].sort(-1).values)  # the reduction matters


@pytest.mark.parametrize("nprobe", [4, 9])  # every list; more lists than there are
def test_reduced_ivf_lists_score_by_inner_product_beyond_the_reduction_bound(nprobe):
    # Keys added after training with norms above every training key's (R) get no room in the extra coordinate:
    # ranked by L2, their scores would come out lower by (|k|² - R²) / 2; ranked by inner product they are exact.
    # A search before they arrive makes sure later entries reach a search made once already.
    torch.manual_seed(0)
    first, later = torch.randn(1, 1, 200, 8), 2 * torch.randn(1, 1, 100, 8)
    queries = torch.randn(1, 1, 20, 8)
    memory = knnmem.Memory(layers=[0], num_heads=1, head_dim=8, dtype=torch.float32, index="IVF4,Flat", k=10,
                           train_size=200, nprobe=nprobe, keep_keys=False)
    memory.add(0, first, first, torch.ones(1, 200, dtype=torch.bool))
    memory.search(0, queries, slice(0, 1))
    memory.add(0, later, later, torch.ones(1, 100, dtype=torch.bool))
    hits = memory.search(0, queries, slice(0, 1))
    scores, ids = exact_top_k(queries, torch.cat([first, later], dim=2), torch.ones(1, 300, dtype=torch.bool), k=10)
    assert (ids >= 200).any()  # later keys are among the best
    order = hits.scores.argsort(-1, descending=True)
    assert torch.equal(hits.ids.gather(-1, order), ids)
    assert_close(hits.scores.gather(-1, order), scores, atol=1e-4, rtol=0)


def test_k_covering_a_row_retrieves_every_entry_even_where_the_index_would_miss_some():
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 3000, 16) * torch.rand(1, 1, 3000, 1) * 3  # varied norms: HNSW misses a few
    queries = torch.randn(1, 1, 20, 16)
    memory = knnmem.Memory(layers=[0], num_heads=1, head_dim=16, dtype=torch.float32, index="HNSW32", k=3000)
    memory.add(0, keys, keys, torch.ones(1, 3000, dtype=torch.bool))
    assert memory.search(0, queries, slice(0, 1)).valid.all()


def test_masked_entries_are_never_inserted_in_faiss():
    memory = knnmem.Memory(layers=[3], num_heads=2, head_dim=8, dtype=torch.float32, index="Flat", k=4)
    valid = torch.tensor([[True, False, True, True], [False, False, True, True]])
    memory.add(3, torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), valid)
    rows = memory.backend(3)._rows
    assert [rows[b][h].ntotal for b in range(2) for h in range(2)] == [3, 3, 2, 2]


def test_exact_top_k_matches_sort_across_blocks():
    torch.manual_seed(0)
    queries, keys = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 300, 8)
    valid = torch.rand(1, 300) > 0.2
    ids = exact_top_k(queries, keys, valid, k=10, block=64)[1]
    scores = (queries @ keys.transpose(-1, -2)).masked_fill(~valid[:, None, None], float("-inf"))
    assert torch.equal(ids.sort(-1).values, scores.topk(10, dim=-1).indices.sort(-1).values)


def test_search_knobs_and_k_are_settable(make_model, ids):
    model = make_model()
    memory = knnmem.Memory.create(model, index="HNSW32", k=64, efSearch=8)
    forward(model, ids, memory)
    memory.set_search_params(efSearch=64)
    assert faiss.downcast_index(memory.backend(1)._rows[0][0].index).hnsw.efSearch == 64
    query = ids[:, :4]

    def read_only():  # the query stays in a local cache, so memory is not written
        with torch.no_grad():
            return model(query, memory=memory, use_cache=True).logits

    covering = read_only()
    memory.k = 2
    assert (read_only() - covering).abs().max() > 1e-3
    memory.k = 64
    assert_close(read_only(), covering)


def test_retrieval_quality_on_real_queries(make_model):
    model = make_model(max_position_embeddings=16, last_context_length=4)
    torch.manual_seed(7)
    ids = torch.randint(1, 96, (1, 300))
    exact = knnmem.retrieval_quality(model, ids, index="torch", k=4)
    assert exact.recall == 1.0 and 0 < exact.mass_captured < 1 and exact.queries > 0
    one_list = knnmem.retrieval_quality(model, ids, index="IVF8,Flat", k=4, train_size=60, nprobe=1)
    all_lists = knnmem.retrieval_quality(model, ids, index="IVF8,Flat", k=4, train_size=60, nprobe=8)
    assert one_list.recall < 0.9 < all_lists.recall
    assert one_list.mass_captured < all_lists.mass_captured <= exact.mass_captured + 1e-6
    assert knnmem.retrieval_quality(model, ids, index="dense").mass_captured == 1.0


@pytest.mark.parametrize("options, expected", [(dict(k=24), 24), (dict(k=24, efSearch=100), 100)])
def test_hnsw_searches_at_least_k_candidates_unless_told(make_model, ids, options, expected):
    model = make_model()
    memory = knnmem.Memory.create(model, index="HNSW32", **options)
    forward(model, ids, memory)
    indexes = [index for backend in memory._backends.values() for row in backend._rows for index in row]
    assert indexes and {inner_index(index).hnsw.efSearch for index in indexes} == {expected}
    assert memory.empty_like().options()["efSearch"] == expected


@pytest.mark.parametrize(
    "spec, options, l2, dim, nprobe",
    [("IVF64,Flat", {}, True, 17, 2), ("IVF64,Flat", dict(l2_reduction=False, nprobe=5), False, 16, 5),
     ("IVF64,PQ4x4", {}, True, 32, 2), ("HNSW8", {}, False, 16, None)],
)
def test_ivf_defaults_probe_a_32nd_of_the_lists_and_reduce_to_l2(spec, options, l2, dim, nprobe):
    memory = knnmem.Memory(layers=[0], num_heads=2, head_dim=16, dtype=torch.float32, index=spec, k=8,
                           train_size=300, **options)
    keys = torch.randn(1, 2, 400, 16)
    memory.add(0, keys, keys, torch.ones(1, 400, dtype=torch.bool))
    indexes = [inner_index(index) for row in memory.backend(0)._rows for index in row]
    assert len(indexes) == 2 and all(index.is_trained and index.ntotal == 400 for index in indexes)
    assert {index.d for index in indexes} == {dim}  # PQ4 of 16 + 1 coordinates: sub-vectors of 8
    mapped = {isinstance(faiss.downcast_index(index), faiss.IndexIDMap2) for index in memory.backend(0)._rows[0]}
    assert mapped == {nprobe is None}  # IVF lists hold the entry ids themselves, other indexes have an id map
    if nprobe is not None:
        assert {faiss.extract_index_ivf(index).nprobe for index in indexes} == {nprobe}
    assert memory.options()["l2_reduction"] is l2 and memory.empty_like().options()["l2_reduction"] is l2


def test_the_l2_reduction_spreads_padding_over_product_quantizers_of_fast_widths():
    dim, positions = reduced_layout("IVF8,PQ16", 32)  # 33 coordinates in 16 sub-vectors of 4, which Faiss encodes fast
    assert dim == 64 and len(positions) == 33 and len(set(positions.tolist())) == 33
    assert sorted(np.bincount(positions // 4, minlength=16).tolist()) == [2] * 15 + [3]
    dim, positions = reduced_layout("IVF8,PQ16", 32, 48)  # as indexes written before fast widths have it
    assert dim == 48 and sorted(np.bincount(positions // 3, minlength=16).tolist()) == [2] * 15 + [3]
    with pytest.raises(ValueError, match="dimension 64 or 48, not 40"):
        reduced_layout("IVF8,PQ16", 32, 40)
    assert reduced_layout("IVF8,PQ11", 32)[0] == 44  # 33 = 11 x 3: sub-vectors of 4 instead
    assert reduced_layout("IVF8,PQ17", 32)[0] == 34 and reduced_layout("IVF8,Flat", 32)[0] == 33
    assert reduced_layout("IVF8,PQ5", 32)[0] == 40  # 35 = 5 x 7: sub-vectors of 8
    assert reduced_layout("IVF8,PQ3", 32)[0] == 33  # sub-vectors of 11: none of 2, 4 or 8 holds them
    with pytest.raises(ValueError, match="IVF8,PQ1000"):
        reduced_layout("IVF8,PQ1000", 32)


def test_a_padded_product_quantizer_ranks_as_inner_products_do():
    torch.manual_seed(0)
    keys, queries = torch.randn(1, 1, 3000, 16), torch.randn(1, 1, 50, 16)
    memory = knnmem.Memory(layers=[0], num_heads=1, head_dim=16, dtype=torch.float32, index="IVF4,PQ16", k=10,
                           train_size=3000, nprobe=4, keep_keys=False)  # 17 coordinates padded to 32
    memory.add(0, keys, keys, torch.ones(1, 3000, dtype=torch.bool))
    hits = memory.search(0, queries, slice(None))
    exact = (queries @ keys.transpose(-1, -2)).topk(10, dim=-1).indices
    recall = (hits.ids[..., :, None] == exact[..., None, :]).any(-1).float().mean()
    assert recall > 0.8  # 0.89 here; queries laid out unlike the keys would find next to none
    exact_scores = torch.einsum("bhtd,bhtkd->bhtk", queries, hits.values)  # values are the keys here
    assert (hits.scores - exact_scores).abs().mean() < 0.1 * exact_scores.abs().mean()  # scored by the codes


def test_beam_search_with_faiss_memory_runs(make_model):
    model = make_model()
    prompt = torch.randint(1, 96, (1, 30))
    out = model.generate(prompt, max_new_tokens=6, num_beams=2, do_sample=False,
                         memory=knnmem.Memory.create(model, index="HNSW32", k=4))
    assert out.shape == (1, 36)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(index="NoSuchIndex"), "invalid Faiss index spec 'NoSuchIndex'"),
        (dict(index="HNSW32", nprobe=3), "search parameter 'nprobe' does not apply"),
        (dict(index="IVF4,Flat", search_params={"nprobe": 2}), "search parameter 'search_params' must be a number"),
        (dict(index="dense", efSearch=3), "takes no Faiss options"),
        (dict(index="Flat", k=0), "k must be a positive integer"),
        (dict(index="IVF64,Flat", train_size=63), "train_size 63 is below the 64 lists"),
        (dict(index="IVF4,PQ1000", l2_reduction=True), r"dimension 9 \(head dimension \+ 1"),
    ],
)
def test_bad_memory_options(make_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        knnmem.Memory.create(make_model(), **kwargs)


def test_entries_unlike_the_training_sample_are_searched_exactly_and_persisted():
    # Lists trained on four tight clusters; then an entry far from all of them whose list is not the
    # one the query probes (nprobe=1), though it has the query's highest inner product by far.
    torch.manual_seed(0)
    centres = torch.eye(8)[:4]
    cluster = (centres.repeat(10, 1) + 0.01 * torch.randn(40, 8))[None, None]  # (1, 1, 40, 8)
    def new_memory():
        return knnmem.Memory(layers=[0], num_heads=1, head_dim=8, dtype=torch.float32, index="IVF4,Flat",
                             k=1, train_size=40, nprobe=1)

    memory = new_memory()
    memory.add(0, cluster, cluster, torch.ones(1, 40, dtype=torch.bool))
    unlike = (10 * torch.eye(8)[4] + 3 * torch.eye(8)[0])[None, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one entry in 41 is no cause for a warning
        memory.add(0, unlike, unlike, torch.ones(1, 1, dtype=torch.bool))
    query = (torch.eye(8)[4] - 0.5 * torch.eye(8)[0])[None, None, None]
    assert memory.search(0, query, slice(0, 1)).ids.item() == 40
    without = inner_index(memory.backend(0)._rows[0][0])  # what probing alone returns
    probed = without.search(torch.cat([query[0, 0], torch.zeros(1, 1)], 1).numpy(), 1)[1].item()
    assert probed != 40
    state = memory.backend(0).export_state()
    assert state[1]["ivf_outliers"][0]["ids"] == [40]
    reloaded = new_memory()
    reloaded.entries(0).attach(*memory.entries(0).encoded(), memory.entries(0).valid)
    reloaded.backend(0).import_state(lambda: state)
    assert reloaded.search(0, query, slice(0, 1)).ids.item() == 40

    more = unlike.expand(1, 1, 1000, 8) + 0.1 * torch.randn(1, 1, 1000, 8)  # 1,001 of 1,041 entries beyond the lists
    with pytest.warns(UserWarning, match="1,001 of 1,041 entries in a row of this IVF4,Flat memory lie farther"):
        memory.add(0, more, more, torch.ones(1, 1000, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per memory
        memory.add(0, more, more, torch.ones(1, 1000, dtype=torch.bool))


def test_entries_the_codes_reconstruct_worst_are_scored_exactly_without_stored_keys():
    # Without stored keys an entry is scored from its PQ code; the training entry the codes miss most is also kept
    # exactly beside the lists (one of 400 at RECONSTRUCTION_SHARE, 0.1%), and that exact score is the one returned.
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 400, 8)
    memory = knnmem.Memory(layers=[0], num_heads=1, head_dim=8, dtype=torch.float32, index="IVF2,PQ2x4",
                           k=400, train_size=400, nprobe=2, keep_keys=False)
    memory.add(0, keys, keys, torch.ones(1, 400, dtype=torch.bool))
    backend = memory.backend(0)
    index = inner_index(backend._rows[0][0])
    reduced = backend._index_vectors(0, 0, keys[0, 0].numpy())
    errors = ((reduced - index.sa_decode(index.sa_encode(reduced))) ** 2).sum(1)
    worst = int(errors.argmax())
    state = backend.export_state()[1]["ivf_outliers"][0]
    assert state["ids"] == [worst] and state["error_bound"] < errors[worst]
    query = keys[0, 0, worst][None, None, None]
    hits = memory.search(0, query, slice(0, 1))
    assert sorted(hits.ids.flatten().tolist()) == list(range(400))  # every entry, the tracked one once
    score = hits.scores.flatten()[hits.ids.flatten() == worst]
    assert_close(score, (keys[0, 0, worst] ** 2).sum()[None], rtol=1e-5, atol=1e-5)
    coded = hits.scores.flatten()[hits.ids.flatten() != worst]  # the others as their codes score them
    exact = keys[0, 0, hits.ids.flatten()[hits.ids.flatten() != worst]] @ keys[0, 0, worst]
    assert (coded - exact).abs().max() > 1e-2


def test_entries_coded_worse_than_the_training_ones_keep_the_share_tracked_the_worst_coded():
    # Trained on keys of little variance in their last 4 coordinates, the codes miss entries that vary there; of
    # those, only the worst coded 0.1% of all entries stay tracked, and the bound rises past those let go.
    torch.manual_seed(0)
    scale = torch.tensor([1.0] * 4 + [0.05] * 4)
    train = torch.randn(1, 1, 1000, 8) * scale
    later = torch.randn(1, 1, 1000, 8) * scale.flip(0)  # as long, but varying in the last 4 coordinates
    memory = knnmem.Memory(layers=[0], num_heads=1, head_dim=8, dtype=torch.float32, index="IVF2,PQ2x4",
                           k=8, train_size=1000, nprobe=2, keep_keys=False)
    memory.add(0, train, train, torch.ones(1, 1000, dtype=torch.bool))
    backend = memory.backend(0)
    bound = backend._errors[0][0]
    memory.add(0, later, later, torch.ones(1, 1000, dtype=torch.bool))
    index = inner_index(backend._rows[0][0])
    reduced = backend._index_vectors(0, 0, torch.cat([train, later], 2)[0, 0].numpy())
    errors = ((reduced - index.sa_decode(index.sa_encode(reduced))) ** 2).sum(1)
    assert (errors[1000:] > bound).sum() > 100  # hundreds of later entries are coded worse than the bound
    state = backend.export_state()[1]["ivf_outliers"][0]
    by_error = [i for i, e in zip(state["ids"], state["errors"]) if e is not None]
    assert sorted(by_error) == sorted(np.argsort(errors)[-2:].tolist())  # 0.1% of 2,000: the 2 worst
    assert state["error_bound"] >= np.sort(errors)[-3] * (1 - 1e-5) and len(state["ids"]) < 10
    assert backend._outlier_keys[0][0].ntotal == len(state["ids"])
    worst = int(errors.argmax())
    hits = memory.search(0, torch.cat([train, later], 2)[0, 0, worst][None, None, None], slice(0, 1))
    score = hits.scores.flatten()[hits.ids.flatten() == worst]  # its exact key kept, the others' let go
    assert_close(score, (torch.cat([train, later], 2)[0, 0, worst] ** 2).sum()[None], rtol=1e-5, atol=1e-5)


def test_entries_under_a_pre_transform_are_checked_for_outliers_as_its_lists_see_them():
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 300, 8)
    far = 20 * torch.randn(1, 1, 5, 8)
    memory = knnmem.Memory(layers=[0], num_heads=1, head_dim=8, dtype=torch.float32, index="PCA8,IVF4,Flat", k=5,
                           train_size=200, nprobe=4)  # 8 + 1 reduced coordinates, projected to 8 for the lists
    for part in (keys[:, :, :200], keys[:, :, 200:], far):
        memory.add(0, part, part, torch.ones(1, part.shape[2], dtype=torch.bool))
    tracked = set(memory.backend(0)._outliers[0][0].tolist())
    assert set(range(300, 305)) <= tracked and len(tracked) < 20  # the far ones, few of the others
    query = far[:, :, :1] / 20
    assert memory.search(0, query, slice(0, 1)).ids[0, 0, 0, 0].item() in range(300, 305)


def test_without_stored_keys_outliers_are_found_from_their_own_flat_index():
    torch.manual_seed(0)
    cluster = (torch.eye(8)[:4].repeat(10, 1) + 0.01 * torch.randn(40, 8))[None, None]  # (1, 1, 40, 8)
    unlike = (10 * torch.eye(8)[4] + 3 * torch.eye(8)[0])[None, None, None]
    query = (torch.eye(8)[4] - 0.5 * torch.eye(8)[0])[None, None, None]

    def new_memory():
        return knnmem.Memory(layers=[0], num_heads=1, head_dim=8, dtype=torch.float32, index="IVF4,Flat",
                             k=1, train_size=40, nprobe=1, keep_keys=False)

    memory = new_memory()
    memory.add(0, cluster, cluster, torch.ones(1, 40, dtype=torch.bool))
    memory.add(0, unlike, unlike, torch.ones(1, 1, dtype=torch.bool))
    assert not memory.entries(0).has_keys
    hits = memory.search(0, query, slice(0, 1))
    assert hits.ids.item() == 40 and hits.scores.item() == pytest.approx(float(query.flatten() @ unlike.flatten()))
    state = memory.backend(0).export_state()
    assert state[0]["head0.outliers.faiss"].ntotal == 1
    reloaded = new_memory()
    reloaded.entries(0).attach(None, memory.entries(0).encoded()[1], memory.entries(0).valid)
    reloaded.backend(0).import_state(lambda: state)
    assert reloaded.search(0, query, slice(0, 1)).ids.item() == 40


def test_parallel_insertion_builds_the_indexes_serial_insertion_does(make_model, ids, monkeypatch):
    from knnmem.memory import faiss_index

    def build():
        memory = knnmem.Memory.create(make_model(), index="IVF4,Flat", k=4, train_size=20, nprobe=1)
        forward(make_model(), ids, memory)
        return [[faiss.serialize_index(index).tobytes() for index in row] for row in memory.backend(1)._rows], \
            memory.backend(1)._outliers

    parallel = build()
    monkeypatch.setattr(faiss_index, "_parallel", lambda work, tasks: [work(task) for task in tasks])
    serial = build()
    assert parallel[0] == serial[0]
    assert [[list(h) for h in row] for row in parallel[1]] == [[list(h) for h in row] for row in serial[1]]


@pytest.mark.parametrize("spec, train_size", [("IVF16,PQ4", 39 * 256), ("IVF16,PQ4x10", 39 * 1024), ("IVF2048,PQ4", 39 * 2048)])
def test_training_waits_for_39_entries_per_centroid_of_lists_or_codebooks(spec, train_size):
    memory = knnmem.Memory(layers=[0], num_heads=1, head_dim=8, dtype=torch.float32, index=spec, k=10)
    assert memory.train_size == train_size


def test_faiss_runs_single_threaded_in_every_worker_of_the_pool():
    # The OpenMP thread count is a per-thread setting: set only in the thread handing out the work, Faiss ran every
    # task with all cores, and its idle OpenMP threads went on taking them from the model's forward pass. Torch sets
    # it too, at a thread's first parallel operation, to its own count.
    from concurrent.futures import wait
    from threading import Barrier

    from knnmem.memory import faiss_index

    workers = faiss_index._POOL._max_workers
    barrier = Barrier(workers)  # every worker takes one task

    def threads(_):
        barrier.wait(timeout=10)
        torch.randn(1 << 16).exp().sum()
        return faiss.omp_get_max_threads()

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        tasks = [faiss_index._POOL.submit(threads, i) for i in range(workers)]
        wait(tasks, timeout=30)
        assert [t.result() for t in tasks] == [1] * workers
    finally:
        torch.set_num_threads(before)
