"""Focused-Transformer training in PyTorch: cross-batch attention in memory layers, k-packed data.

`train(TrainConfig(...), out_dir)` trains from scratch (a tokenizer is trained first) or fine-tunes
`init_from` (a LongLLaMA or LLaMA checkpoint), writing to `out_dir`:

    tokenizer/            SentencePiece model + Hugging Face files
    checkpoint/           the latest checkpoint: the model in Hugging Face layout, or adapter/ (the trained
                          tensors alone, over `init_from`) when only some are trained; trainer_state.json
                          (step, configuration, optimiser hyperparameters) and optimizer.safetensors (its moments)
    metrics.jsonl         one record per logged step and per evaluation
    loss.png              training and held-out loss, answer accuracy in the window and in memory

Runs resume from `checkpoint/` bit-exactly: batches are a function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..eval.passkey import run_passkey, shortest_prompt
from ..ingest.stdlib import stdlib_texts
from ..memory import CrossBatchMemory, Memory
from ..model import LongLlamaConfig, LongLlamaForCausalLM, pick_device, resolve_checkpoint
from ..model.adapters import ADAPTER_WEIGHTS, read_adapter, save_adapter
from ..plotting import pyplot
from .data import LOCAL_ANSWER, MEMORY_ANSWER, TrainingData
from .synthetic import TEMPLATES


RUNTIME_FIELDS = ("device", "threads", "data_workers")
# What `TrainConfig.train_only` may name: which parameters (by name, for a config) are trained.
TRAINABLE = {
    "all": lambda name, config: True,
    "memory_attention": lambda name, config: any(name.startswith(f"model.layers.{i}.self_attn.")
                                                 for i in config.mem_layers),
}
# Evaluation batches are drawn with one seed whatever the training seed, so that runs with different
# seeds and data mixes are scored on the same batches.
HELDOUT_SEED = 1


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with every checkpoint."""

    # Model (ignored when fine-tuning `init_from`, except the memory fields).
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    window: int = 256
    mem_layers: list[int] = field(default_factory=lambda: [3, 4])
    mem_positionals: bool = True
    init_from: str | None = None  # a checkpoint directory, .gguf file or adapter to fine-tune
    train_only: str = "all"  # "memory_attention": train the memory layers' attention only, saved as an adapter
    # FoT.
    cross_batch_range: int = 3
    memory_top_k: int = 0  # > 0: memory layers attend to only the k best cross-batch entries (0: all)
    k_pack: int = 4
    # Data.
    rows: int = 16
    synthetic_fraction: float = 0.9
    answer_weight: float = 4.0
    reach_start: int = 400
    reach_end: int = 100_000
    curriculum_fraction: float = 0.4
    real_chars: int = 6_000_000
    seed: int = 0
    # Optimisation.
    steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    # Where it runs (none of these changes the result, so a run may resume with other values).
    device: str = "auto"
    threads: int = 0
    data_workers: int = 0
    # Bookkeeping.
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 100
    eval_batches: int = 4
    passkey_length: int = 1024
    passkey_trials: int = 4

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.steps < 1 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need steps >= 1, warmup_steps >= 0 and min_lr_ratio in [0, 1]")
        if self.cross_batch_range < 0 or self.cross_batch_range >= self.rows:
            raise ValueError(f"cross_batch_range must lie in [0, rows), got {self.cross_batch_range} with {self.rows} rows")
        if self.train_only not in TRAINABLE:
            raise ValueError(f"train_only must be one of {sorted(TRAINABLE)}, got {self.train_only!r}")
        if self.train_only != "all" and not self.init_from:
            raise ValueError(f"train_only={self.train_only!r} fine-tunes a pretrained model: give init_from too")
        if self.memory_top_k < 0:
            raise ValueError(f"memory_top_k must be >= 0 (0 attends to every cross-batch entry), got {self.memory_top_k}")

    def reach(self, progress: float) -> int:
        """Curriculum: how far back (characters) synthetic questions look; grows geometrically over
        the first `curriculum_fraction` of training, from inside one window to whole documents."""
        ramp = min(progress / self.curriculum_fraction, 1.0) if self.curriculum_fraction > 0 else 1.0
        return int(self.reach_start * (self.reach_end / self.reach_start) ** ramp)

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to `min_lr_ratio * lr`."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def tokenizer_texts(real: str) -> list[str]:
    """What the tokenizer is trained on: real text plus the synthetic templates' words and digits."""
    from .synthetic import ATTRIBUTES, SYLLABLES, WORDS

    extra = [" ".join(pair) for pair in TEMPLATES] + list(ATTRIBUTES) + list(WORDS) + ["".join(SYLLABLES)]
    return real[: 3_000_000].split("\n") + extra * 50


def adapter_base(init_from: str) -> str | None:
    """The base an adapter trained from `init_from` records: an adapter's own base (adapters do not chain;
    None is the default model), else the checkpoint, absolute when it is a local path."""
    found = read_adapter(init_from)
    if found is not None:
        return found["base"]
    path = Path(init_from)
    return str(path.resolve()) if path.exists() else init_from


def trained_tensors(model: LongLlamaForCausalLM, train_only: str) -> list[str]:
    """Names of the parameters `train_only` trains (see `TRAINABLE`)."""
    return [name for name, _ in model.named_parameters() if TRAINABLE[train_only](name, model.config)]


def build_model(config: TrainConfig, vocab_size: int) -> LongLlamaForCausalLM:
    """A new model from the config's shape, or `init_from` (LongLLaMA or LLaMA) with the config's memory fields."""
    # As in the published LongLLaMA configs, the last half window of a prompt stays local at generation,
    # leaving the other half for new tokens before the local cache overflows into memory.
    memory_fields = dict(mem_layers=config.mem_layers, mem_positionals=config.mem_positionals,
                         max_position_embeddings=config.window, last_context_length=config.window // 2,
                         torch_attention=True)
    if config.init_from:
        # An adapter's own tensors load over its base; the run's memory fields override its config.
        adapter = config.init_from if read_adapter(config.init_from) is not None else None
        return LongLlamaForCausalLM.from_pretrained(resolve_checkpoint(config.init_from), adapter=adapter,
                                                    dtype=torch.float32, **memory_fields)
    model_config = LongLlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        mem_dtype="float32", **memory_fields,
    )
    torch.manual_seed(config.seed)
    return LongLlamaForCausalLM(model_config)


def answer_accuracy(logits: torch.Tensor, ids: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
    """Accuracy of next-token predictions on answer tokens, split by where their source is."""
    correct = logits[:, :-1].argmax(-1) == ids[:, 1:]
    kinds = answers[:, 1:]
    out = {}
    for name, kind in (("acc_local", LOCAL_ANSWER), ("acc_memory", MEMORY_ANSWER)):
        mask = kinds == kind
        out[name] = float(correct[mask].float().mean()) if mask.any() else float("nan")
    return out


class Trainer:
    def __init__(self, config: TrainConfig, out_dir: str | Path):
        self.config, self.out = config, Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if config.threads:
            torch.set_num_threads(config.threads)
        real = "\n\n".join(text for _, text in stdlib_texts("train"))[: config.real_chars]
        self.tokenizer = self._tokenizer(real)
        if config.passkey_trials and config.passkey_length < shortest_prompt(self.tokenizer):
            raise ValueError(f"passkey_length {config.passkey_length} is shorter than a pass-key prompt without "
                             f"filler ({shortest_prompt(self.tokenizer)} tokens with this tokenizer)")
        self.data = TrainingData(
            self.tokenizer, real, window=config.window, rows=config.rows, k_pack=config.k_pack,
            synthetic_fraction=config.synthetic_fraction, reach=config.reach, seed=config.seed,
        )
        # Evaluation reads held-out text only: real text for the loss, synthetic documents (whose
        # filler is held-out text) for answer accuracy, whatever the training mix.
        heldout = "\n\n".join(text for _, text in stdlib_texts("heldout"))
        self.heldout, self.probes = (
            TrainingData(self.tokenizer, heldout, window=config.window, rows=config.rows, k_pack=config.k_pack,
                         synthetic_fraction=share, reach=config.reach_end, seed=HELDOUT_SEED)
            for share in (0.0, 1.0)
        )
        self.batches = _Steps(self.data, config.steps)
        self.device = pick_device(config.device)
        self.model = build_model(config, len(self.tokenizer)).to(self.device)
        self.model.gradient_checkpointing = config.gradient_checkpointing
        trained = set(trained_tensors(self.model, config.train_only))
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trained)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
        )
        self.step = 0
        self._resume()

    def _tokenizer(self, real: str):
        from transformers import AutoTokenizer

        from .tokenizer import train_tokenizer

        path = self.out / "tokenizer"
        if self.config.init_from:
            return AutoTokenizer.from_pretrained(resolve_checkpoint(self.config.init_from))
        if (path / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(str(path))
        return train_tokenizer(tokenizer_texts(real), path, vocab_size=self.config.vocab_size)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def _resume(self) -> None:
        state_path = self.checkpoint_dir / "trainer_state.json"
        if (self.checkpoint_dir / "trainer_state.pt").exists() and not state_path.exists():
            raise ValueError(f"{self.checkpoint_dir / 'trainer_state.pt'}: a checkpoint in the pickle format of earlier "
                             "knnmem versions, which is not loaded (unpickling can run code); use a new output directory")
        if not state_path.exists():
            return
        state = json.loads(state_path.read_text())
        free = {name: state["config"].get(name) for name in ("steps", *RUNTIME_FIELDS)}
        if state["config"] != dataclasses.asdict(self.config) | free:
            raise ValueError(f"{self.checkpoint_dir} was written by a run with another configuration; "
                             "use a new output directory or the same configuration")
        from safetensors.torch import load_file

        weights = "model.safetensors" if self.config.train_only == "all" else f"adapter/{ADAPTER_WEIGHTS}"
        self.model.load_state_dict(load_file(self.checkpoint_dir / weights, device=str(self.device)), strict=False)
        self.optimizer.load_state_dict(
            _optimizer_state(state["optimizer"], load_file(self.checkpoint_dir / "optimizer.safetensors",
                                                           device=str(self.device))))
        self.step = state["step"]
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        path = self.out / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict) -> None:
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self) -> None:
        """Write the checkpoint atomically (a new directory renamed over the old one)."""
        tmp = self.out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if self.config.train_only == "all":
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        else:  # the trained tensors alone, loadable over the frozen base weights: megabytes, not the whole model
            save_adapter(self.model, tmp / "adapter", base=adapter_base(self.config.init_from),
                         tensors=trained_tensors(self.model, self.config.train_only))
        # No pickle: a checkpoint is data that resuming reads, never code that it runs.
        from safetensors.torch import save_file

        layout, tensors = _split_optimizer_state(self.optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": self.step, "optimizer": layout, "config": dataclasses.asdict(self.config)}, indent=1))
        old = self.out / "checkpoint.old"
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, old)
        os.replace(tmp, self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def loss_and_logits(self, batch, cross_batch_range: int | None = None):
        """Next-token cross-entropy, answer tokens weighted `answer_weight` times, and the logits."""
        ids, answers = batch.input_ids.to(self.device), batch.answers.to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.dtype == "bfloat16")
        with autocast:
            distance = self.config.cross_batch_range if cross_batch_range is None else cross_batch_range
            memory = CrossBatchMemory(distance, self.config.memory_top_k or None)
            logits = self.model(input_ids=ids, use_cache=False, memory=memory).logits
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
        )
        weights = 1.0 + (self.config.answer_weight - 1.0) * (answers[:, 1:].flatten() != 0).float()
        return (losses * weights).sum() / weights.sum(), logits

    def train_step(self, batch=None) -> dict:
        """One optimiser step on `batch` (default: this step's batch of the training data)."""
        config = self.config
        batch = batch if batch is not None else self.batches[self.step]
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_at(self.step)
        loss, logits = self.loss_and_logits(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": config.lr_at(self.step - 1),
                "reach": config.reach(self.step / config.steps),
                **answer_accuracy(logits.detach().cpu(), batch.input_ids, batch.answers)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out real-text loss; synthetic answer accuracy with and without cross-batch memory; pass keys."""
        config = self.config
        self.model.eval()
        record = {}
        losses = [float(self.loss_and_logits(self.heldout.batch(i, stream=1))[0]) for i in range(config.eval_batches)]
        record["heldout_loss"] = float(np.mean(losses))
        for label, distance in (("", None), ("_no_memory", 0)):
            stats = []
            for i in range(config.eval_batches):
                batch = self.probes.batch(i, stream=1)
                _, logits = self.loss_and_logits(batch, distance)
                stats.append(answer_accuracy(logits.cpu(), batch.input_ids, batch.answers))
            for key in stats[0]:
                record[f"eval_{key}{label}"] = _nanmean([s[key] for s in stats])
        if config.passkey_trials:
            trials = run_passkey(self.model, self.tokenizer, config.passkey_length, trials=config.passkey_trials,
                                 memory_factory=lambda: Memory.create(self.model, index="dense"), progress=False)
            record["passkey"] = float(np.mean([t.correct for t in trials]))
        return record

    def run(self) -> None:
        config = self.config
        bar = tqdm(total=config.steps, initial=self.step, desc="training", unit="step")
        tokens_per_step = config.rows * config.window
        window_start, window_stats = time.perf_counter(), []
        batches = torch.utils.data.DataLoader(
            self.batches, batch_size=None, sampler=range(self.step, config.steps),
            num_workers=config.data_workers, prefetch_factor=4 if config.data_workers else None,
        )
        for batch in batches:
            window_stats.append(self.train_step(batch))
            bar.update(1)
            if self.step % config.log_every == 0 or self.step == config.steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": self.step, "tokens": self.step * tokens_per_step,
                          "tokens_per_s": len(window_stats) * tokens_per_step / elapsed}
                for key in window_stats[0]:
                    record[key] = _nanmean([s[key] for s in window_stats])
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", mem=f"{record['acc_memory']:.2f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                window_start, window_stats = time.perf_counter(), []
            if self.step % config.eval_every == 0 or self.step == config.steps:
                self._log({"step": self.step, **self.evaluate()})
                plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
                window_start = time.perf_counter()
            if self.step % config.save_every == 0 or self.step == config.steps:
                self.save()
                window_start = time.perf_counter()
        bar.close()


def _split_optimizer_state(state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimiser's `state_dict()` as JSON (hyperparameters, non-tensor state) and tensors named
    `<param>.<name>`."""
    tensors = {f"{param}.{name}": value.contiguous() for param, values in state["state"].items()
               for name, value in values.items() if isinstance(value, torch.Tensor)}
    scalars = {str(param): {name: value for name, value in values.items() if not isinstance(value, torch.Tensor)}
               for param, values in state["state"].items()}
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def _optimizer_state(layout: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The `state_dict()` that `_split_optimizer_state` split."""
    state = {int(param): dict(values) for param, values in layout["scalars"].items()}
    for key, tensor in tensors.items():
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = tensor
    # JSON turned tuples (AdamW's betas) into lists; `params` is the one list of a group.
    groups = [{name: value if name == "params" or not isinstance(value, list) else tuple(value)
               for name, value in group.items()} for group in layout["param_groups"]]
    return {"state": state, "param_groups": groups}


class _Steps(torch.utils.data.Dataset):
    """Training batches by step (each a function of the seed and the step), for parallel loading."""

    def __init__(self, data: TrainingData, steps: int):
        self.data, self.steps = data, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        return self.data.batch(step, progress=step / self.steps)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def train(config: TrainConfig, out_dir: str | Path) -> LongLlamaForCausalLM:
    """Train (or resume training) into `out_dir`; returns the trained model."""
    trainer = Trainer(config, out_dir)
    trainer.run()
    return trainer.model


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Loss curves (training, held-out) and answer accuracy (in the window, through memory, no memory)."""
    plt = pyplot()
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))

    steps_to_tokens = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    for key, label in (("loss", "training"), ("heldout_loss", "held-out real text")):
        points = [(steps_to_tokens.get(r["step"], 0), r[key]) for r in records if key in r]
        if points:
            left.plot(*zip(*points), label=label)
    left.set(xlabel="tokens", ylabel="cross-entropy", title="Loss")
    left.legend()
    for key, label in (("eval_acc_local", "fact in the window"), ("eval_acc_memory", "fact only in memory"),
                       ("eval_acc_memory_no_memory", "fact only in memory, memory off"), ("passkey", "pass key")):
        points = [(steps_to_tokens.get(r["step"], 0), r[key]) for r in records if key in r]
        if points:
            right.plot(*zip(*points), marker="o", label=label)
    for key, label, color in (("acc_local", "fact in the window, training batches", "C0"),
                              ("acc_memory", "fact only in memory, training batches", "C1")):
        points = [(r["tokens"], r[key]) for r in records if "tokens" in r and not math.isnan(r.get(key, math.nan))]
        if points:
            right.plot(*zip(*points), color=color, linewidth=0.6, alpha=0.5, label=label)
    right.set(xlabel="tokens", ylabel="accuracy", title="Answer accuracy", ylim=(0, 1))
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
