"""FoT training: cross-batch attention semantics, tokenizer, data recipe, training loop and resume."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import knnmem
from knnmem.eval.passkey import FILLER, key_sentence, passkey_prompt, run_passkey
from knnmem.train.synthetic import NOUNS, SUBJECTS, attribute, haystack, retrieval_document
from knnmem.train.tokenizer import train_tokenizer
from knnmem.train.trainer import TrainConfig, Trainer
from knnmem.train.data import LOCAL_ANSWER, MEMORY_ANSWER

from conftest import sharp_model, tiny_config

TINY_RUN = dict(
    vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, window=32,
    mem_layers=[1], rows=6, k_pack=3, cross_batch_range=2, real_chars=300_000, eval_batches=1,
    passkey_trials=1, passkey_length=256, steps=4, warmup_steps=1, log_every=2, eval_every=4, save_every=100,
)


@pytest.mark.parametrize("mem_positionals", [True, False])
def test_cross_batch_row_equals_inference_with_previous_rows_in_memory(mem_positionals):
    model = sharp_model(tiny_config(max_position_embeddings=8, last_context_length=8, mem_positionals=mem_positionals))
    ids = torch.randint(1, 96, (3, 8))
    with torch.no_grad():
        trained = model(ids, use_cache=False, memory=knnmem.CrossBatchMemory(2)).logits
        for row in range(3):
            # Row r is the last window of rows 0..r read in one pass: the earlier windows are in memory
            # (each computed, as in training, with its own predecessors in memory).
            seq = ids[: row + 1].reshape(1, -1)
            expected = model(seq, use_cache=False, last_context_length=8).logits[0, -8:]
            torch.testing.assert_close(trained[row], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 5])
def test_cross_batch_top_k_equals_inference_with_exact_top_k_memory(top_k):
    # Training with top-k cross-batch attention sees what a top-k memory retrieves at inference.
    model = sharp_model(tiny_config(max_position_embeddings=8, last_context_length=8))
    ids = torch.randint(1, 96, (3, 8))
    with torch.no_grad():
        trained = model(ids, use_cache=False, memory=knnmem.CrossBatchMemory(2, top_k)).logits
        dense = model(ids, use_cache=False, memory=knnmem.CrossBatchMemory(2)).logits
        for row in range(1, 3):
            memory = knnmem.Memory.create(model, index="torch", k=top_k)
            expected = model(ids[: row + 1].reshape(1, -1), use_cache=False, last_context_length=8,
                             memory=memory).logits[0, -8:]
            torch.testing.assert_close(trained[row], expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(trained[row], dense[row], atol=1e-3)  # fewer entries than dense


def test_cross_batch_top_k_picks_valid_entries_first(make_model):
    # Row 1 has 8 valid entries (row 0) and 8 invalid ones (before row 0): top-8 is all of its memory.
    model = make_model(max_position_embeddings=8, last_context_length=8)
    ids = torch.randint(1, 96, (3, 8))
    with torch.no_grad():
        top8 = model(ids, use_cache=False, memory=knnmem.CrossBatchMemory(2, 8)).logits
        dense = model(ids, use_cache=False, memory=knnmem.CrossBatchMemory(2)).logits
    torch.testing.assert_close(top8[:2], dense[:2])
    assert not torch.allclose(top8[2], dense[2], atol=1e-3)  # row 2 has 16 valid entries


def test_cross_batch_range_zero_is_ordinary_attention(make_model, ids):
    model = make_model(max_position_embeddings=16, last_context_length=16)
    window = ids[:, :16]
    with torch.no_grad():
        torch.testing.assert_close(
            model(window, use_cache=False, memory=knnmem.CrossBatchMemory(0)).logits, model(window, use_cache=False).logits
        )


def test_cross_batch_gradients_reach_earlier_rows(make_model):
    # One memory layer, the last: what row 1 passes to row 2 does not itself depend on row 0.
    model = make_model(max_position_embeddings=8, last_context_length=8, mem_layers=[2])
    embeds = model.get_input_embeddings()(torch.randint(1, 96, (3, 8))).detach().requires_grad_()
    model(inputs_embeds=embeds, use_cache=False, memory=knnmem.CrossBatchMemory(1)).logits[2].sum().backward()
    assert embeds.grad[1].abs().sum() > 0  # row 2 reads row 1 through memory
    assert embeds.grad[0].abs().sum() == 0  # but not row 0, beyond the range


def test_cross_batch_rejects_long_inputs_and_bad_settings(make_model, ids):
    model = make_model()
    with pytest.raises(ValueError, match="at most one window"):
        model(ids, use_cache=False, memory=knnmem.CrossBatchMemory(1))
    with pytest.raises(ValueError, match="no cache"):
        model(ids[:, :8], use_cache=True, memory=knnmem.CrossBatchMemory(1))
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        knnmem.CrossBatchMemory(1, 0)
    with pytest.raises(ValueError, match="distance must be an integer >= 0"):
        knnmem.CrossBatchMemory(-1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from knnmem.ingest import stdlib_texts

    text = "\n".join(t for _, t in stdlib_texts("train")[:40])
    return train_tokenizer(text.splitlines() + ["café naïve 数字 — 2026"], tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_tokenizer_round_trip_and_split_digits(tokenizer, tmp_path):
    from transformers import AutoTokenizer, LlamaTokenizer

    tokenizer.save_pretrained(tmp_path)
    for loaded in (tokenizer, AutoTokenizer.from_pretrained(tmp_path), LlamaTokenizer.from_pretrained(tmp_path)):
        for text in ["def f(x):\n    return x  # done", "runs  of   spaces\t\ttabs\n\n", "emoji 🦙 and Ω", "x = 90817"]:
            ids = loaded(text)["input_ids"]
            assert ids[0] == loaded.bos_token_id
            assert loaded.decode(ids, skip_special_tokens=True) == text
        digits = loaded("90817", add_special_tokens=False)["input_ids"]
        assert "".join(loaded.decode([i]).strip() for i in digits) == "90817"
        assert len([i for i in digits if loaded.decode([i]).strip()]) == 5  # one token per digit


def test_retrieval_document_answers_copy_their_statements():
    rng = np.random.default_rng(0)
    text, spans = retrieval_document(rng, lambda n: "x" * n, num_chars=4000, reach=100_000)
    assert len(spans) > 3
    for span in spans:
        assert text[slice(*span.answer)] == text[slice(*span.source)]
        assert span.source[1] <= span.answer[0]


def test_haystack_filler_and_made_up_attributes_are_not_the_passkey_probe():
    rng = np.random.default_rng(0)
    filler = haystack(rng)
    for n in (1, 57, 900):
        assert len(filler(n)) == n
    text, spans = retrieval_document(rng, filler, num_chars=6000, reach=100_000)
    assert spans and "pass key" not in text
    assert not [sentence for sentence in FILLER.split(". ") if sentence.rstrip(".") in text]
    texts = [retrieval_document(rng, haystack(rng), num_chars=6000, reach=100_000, max_gap=2000)[0] for _ in range(20)]
    assert not [s for s in FILLER.split(". ") for text in texts if s.rstrip(".") in text]
    # Distractor statements of attributes no question asks for ("The door key is 4417.").
    assert any(f"{subject} {noun} is " in text for subject in SUBJECTS for noun in NOUNS for text in texts)
    made_up = [a for a in (attribute(rng) for _ in range(200)) if a.split()[-1] in NOUNS]
    assert len(set(made_up)) > 50


def test_training_batches_are_reproducible_and_mark_memory_answers(tmp_path):
    trainer = Trainer(TrainConfig(**{**TINY_RUN, "window": 128, "reach_start": 100}), tmp_path)
    first, again = trainer.data.batch(3), trainer.data.batch(3)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.answers, again.answers)
    assert not torch.equal(first.input_ids, trainer.data.batch(4).input_ids)
    early = torch.cat([trainer.data.batch(i, progress=0.0).answers for i in range(10)])
    late = torch.cat([trainer.data.batch(i, progress=1.0).answers for i in range(10)])
    assert (early == LOCAL_ANSWER).any() and (late == MEMORY_ANSWER).any()


def test_evaluation_batches_do_not_depend_on_the_training_seed_or_mix(tmp_path):
    first = Trainer(TrainConfig(**TINY_RUN), tmp_path / "first")
    other = Trainer(TrainConfig(**{**TINY_RUN, "seed": 5, "synthetic_fraction": 0.3}), tmp_path / "other")
    assert not torch.equal(first.data.batch(0).input_ids, other.data.batch(0).input_ids)
    for split in ("heldout", "probes"):
        ours, theirs = getattr(first, split).batch(0, stream=1), getattr(other, split).batch(0, stream=1)
        assert torch.equal(ours.input_ids, theirs.input_ids)


def test_memory_top_k_reaches_the_training_loss(tmp_path):
    trainer = Trainer(TrainConfig(**TINY_RUN), tmp_path)
    batch = trainer.data.batch(0)
    with torch.no_grad():
        dense = trainer.loss_and_logits(batch)[1]
        trainer.config.memory_top_k = 2 * TINY_RUN["window"]  # every entry of the 2 rows in range
        torch.testing.assert_close(trainer.loss_and_logits(batch)[1], dense)
        trainer.config.memory_top_k = 4
        assert not torch.allclose(trainer.loss_and_logits(batch)[1], dense, atol=1e-4)
    with pytest.raises(ValueError, match="memory_top_k must be >= 0"):
        TrainConfig(memory_top_k=-1)


def test_curriculum_bounds_how_far_back_questions_look():
    config = TrainConfig(reach_start=300, reach_end=30_000, curriculum_fraction=0.5)
    assert config.reach(0.0) == 300 and config.reach(0.5) == config.reach(1.0) == 30_000
    assert config.reach(0.1) < config.reach(0.3)
    for reach in (200, 2000):
        _, spans = retrieval_document(np.random.default_rng(1), lambda n: "y" * n, num_chars=20_000, reach=reach)
        distances = [span.answer[0] - span.source[0] for span in spans]
        # The question line and a copied sequence add at most a couple hundred characters to the reach.
        assert max(distances) <= reach + 200
    assert max(distances) > 1000


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    config = TrainConfig(**{**TINY_RUN, "steps": 30, "lr": 3e-3, "eval_every": 30, "log_every": 5})
    trainer = Trainer(config, tmp_path)
    batch = trainer.data.batch(0)
    with torch.no_grad():
        before = float(trainer.loss_and_logits(batch)[0])
    trainer.run()
    with torch.no_grad():
        after = float(trainer.loss_and_logits(batch)[0])
    assert after < before - 0.5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert {"heldout_loss", "eval_acc_memory", "passkey"} <= set(records[-1])
    assert (tmp_path / "loss.png").stat().st_size > 0
    model = knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert model.config.mem_layers == [1] and model.config.max_position_embeddings == 32


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    config = TrainConfig(**TINY_RUN)
    straight = Trainer(config, tmp_path / "a")
    for _ in range(4):
        straight.train_step()
    interrupted = Trainer(config, tmp_path / "b")
    for _ in range(2):
        interrupted.train_step()
    interrupted.save()
    resumed = Trainer(config, tmp_path / "b")
    assert resumed.step == 2
    for _ in range(2):
        resumed.train_step()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="another configuration"):
        Trainer(TrainConfig(**{**TINY_RUN, "lr": 1.0}), tmp_path / "b")


@pytest.mark.slow
def test_parallel_data_loading_changes_nothing_and_runtime_settings_may_change_on_resume(tmp_path):
    serial = Trainer(TrainConfig(**{**TINY_RUN, "eval_every": 100}), tmp_path / "a")
    serial.run()
    parallel = Trainer(TrainConfig(**{**TINY_RUN, "eval_every": 100, "data_workers": 2}), tmp_path / "b")
    parallel.run()
    for (name, a), (_, b) in zip(serial.model.state_dict().items(), parallel.model.state_dict().items()):
        assert torch.equal(a, b), name
    resumed = Trainer(TrainConfig(**{**TINY_RUN, "eval_every": 100, "threads": 1, "device": "cpu"}), tmp_path / "b")
    assert resumed.step == 4


def test_fine_tunes_a_llama_checkpoint(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64))
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    trainer = Trainer(TrainConfig(**{**TINY_RUN, "init_from": str(tmp_path / "llama")}), tmp_path / "run")
    assert trainer.model.config.mem_layers == [1]
    torch.testing.assert_close(trainer.model.lm_head.weight, llama.lm_head.weight)
    trainer.train_step()
    trainer.save()
    weights = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], llama.lm_head.weight)


def test_fine_tunes_only_the_memory_attention_of_a_gqa_checkpoint_into_an_adapter(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=True))
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    config = TrainConfig(**{**TINY_RUN, "init_from": str(tmp_path / "llama"), "train_only": "memory_attention"})
    trainer = Trainer(config, tmp_path / "run")
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train_step()
    trainer.save()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("model.layers.1.self_attn.") for name in changed)  # layer 1 only
    adapter = tmp_path / "run" / "checkpoint" / "adapter"
    assert set(load_file(adapter / "adapter.safetensors")) == {n for n in before if n.startswith("model.layers.1.self_attn.")}
    reloaded, _ = knnmem.load_pretrained(adapter, device="cpu")
    assert reloaded.config.mem_layers == [1] and reloaded.config.num_key_value_heads == 2
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, dict(trainer.model.named_parameters())[name], msg=name)
    with pytest.raises(ValueError, match="give init_from too"):
        TrainConfig(**{**TINY_RUN, "train_only": "memory_attention"})


    # Training on from the adapter starts from its tensors, and the new adapter records the same base.
    more = Trainer(TrainConfig(**{**config.__dict__, "init_from": str(adapter)}), tmp_path / "more")
    for name, param in more.model.named_parameters():
        torch.testing.assert_close(param, dict(trainer.model.named_parameters())[name], msg=name)
    more.train_step()
    more.save()
    assert sorted(f.name for f in (tmp_path / "more" / "checkpoint").iterdir()) == [
        "adapter", "optimizer.safetensors", "trainer_state.json"]  # no copy of the frozen base
    resumed = Trainer(TrainConfig(**{**config.__dict__, "init_from": str(adapter)}), tmp_path / "more")
    assert resumed.step == 1
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, dict(more.model.named_parameters())[name], msg=name)
    assert json.loads((tmp_path / "more" / "checkpoint" / "adapter" / "adapter.json").read_text())["base"] \
        == str((tmp_path / "llama").resolve())


def test_passkey_prompt_length_and_depth(tokenizer):
    for depth in (0.0, 0.5, 1.0):
        ids = passkey_prompt(tokenizer, 3000, depth, 4242)
        assert abs(len(ids) - 3000) <= len(tokenizer(FILLER)["input_ids"])  # within one filler sentence group
        text = tokenizer.decode(ids, skip_special_tokens=True)
        where = text.index(key_sentence(4242)) / len(text)
        assert abs(where - depth) < 0.1
        assert text.endswith("What is the pass key? The pass key is")


def test_passkey_needs_a_trial():
    with pytest.raises(ValueError, match="trials must be at least 1, got 0"):
        run_passkey(None, None, 1000, trials=0, memory_factory=None)
