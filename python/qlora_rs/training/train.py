"""The QLoRA training loop behind ``qlora-rs train``: load a model with 4-bit linear layers, add
LoRA adapters, fine-tune them on a JSONL file, checkpoint as it goes and resume exactly.

Defaults follow the QLoRA paper's recipe: NF4 with double quantization, LoRA r=64, alpha=16,
dropout 0.05 on every linear layer, AdamW (the paged one on CUDA) at lr 2e-4 with a constant
schedule after a 3% warmup, gradients clipped to norm 0.3, gradient checkpointing on.

What ``output_dir`` holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the final adapter (PEFT layout);
- ``checkpoint-<step>/``: the adapter plus ``trainer_state.pt`` (optimizer, scheduler, data
  position, RNG states), written into a hidden temporary directory and renamed into place, so a
  kill at any moment leaves either the previous checkpoint or the new one; the last
  ``save_total_limit`` are kept;
- ``train_config.json`` (the options), ``metrics.jsonl`` (one record per step, plus eval records)
  and ``loss.png`` (the loss curve, drawn at the end).

``resume=True`` continues from the newest checkpoint: same data order, same dropout masks, same
optimizer state, so the losses after it are those of a run that was never interrupted.

Under ``torchrun --nproc-per-node N`` (or ``accelerate launch``) every process runs the same
loop (:class:`qlora_rs.distributed.DistributedTraining`): ``distributed="ddp"`` (the default)
keeps the 4-bit model on every device and all-reduces the LoRA gradients, ``"fsdp"`` shards it
with FSDP2 while loading; ``batch_size`` is per process, the loss is normalized over the global
batch (the same gradients as one process with ``N x batch_size``), and rank 0 alone writes the
output directory. A checkpoint resumes with the same number of processes. (The contrastive
objective's negatives are those of each process's own share of the batch.)

Two objectives: ``task="causal-lm"`` (next-token loss on the response / assistant / text tokens,
see :mod:`qlora_rs.data`) and ``task="contrastive"`` for encoders such as BERT: prompts and
responses are embedded (mean pooling), and each prompt must pick its own response among those of
the batch (cross-entropy over scaled cosine similarities, as sentence-transformers'
MultipleNegativesRankingLoss).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..surgery.adapter import write_atomic
from ..io.data import IGNORE_INDEX, Dataset, collate, load_dataset, load_pairs
from ..errors import InvalidArgumentError, QloraError

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate_file", "latest_checkpoint", "plot_losses", "TASKS", "OPTIMIZERS",
           "SCHEDULES"]

TASKS = ("causal-lm", "contrastive")
OPTIMIZERS = ("auto", "adamw", "paged_adamw", "paged_adamw_8bit")
SCHEDULES = ("constant", "linear", "cosine")
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Options that must match for --resume to continue the same run.
_RESUME_KEYS = ("model", "data", "task", "r", "alpha", "target_modules", "use_rslora", "quant_type", "blocksize",
                "double_quant", "batch_size", "grad_accum", "max_seq_len", "group_by_length", "seed")


@dataclass
class TrainConfig:
    """Every option of a training run (the CLI flags of ``qlora-rs train``)."""

    model: str
    data: str
    output_dir: str
    eval_file: Optional[str] = None
    task: str = "causal-lm"
    # LoRA
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Union[str, list] = "all-linear"
    use_rslora: bool = False
    # Quantization of a float checkpoint (a 4-bit one keeps its own format)
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "auto"
    # Optimization
    lr: float = 2e-4
    schedule: str = "constant"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    optimizer: str = "auto"
    batch_size: int = 4
    grad_accum: int = 4
    max_seq_len: int = 512
    # Batch examples of similar length together (less padding); causal-lm only.
    group_by_length: bool = True
    max_steps: Optional[int] = None
    epochs: int = 1
    seed: int = 42
    gradient_checkpointing: bool = True
    contrastive_scale: float = 20.0
    # Bookkeeping
    save_every: int = 100
    eval_every: Optional[int] = None
    save_total_limit: int = 2
    skip_bad_lines: bool = False
    resume: bool = False
    device: str = "auto"
    # Under torchrun: "auto"/"ddp" (every process holds the 4-bit model) or "fsdp" (each holds 1/N).
    distributed: str = "auto"
    threads: Optional[int] = None
    progress: Optional[bool] = None
    plot: bool = True
    # Write into an output_dir that holds files of something else (they are left as they are).
    force: bool = False

    def validate(self) -> None:
        if self.task not in TASKS:
            raise InvalidArgumentError(f"task {self.task!r} is not supported: expected one of {', '.join(TASKS)}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidArgumentError(f"optimizer {self.optimizer!r} is not supported: expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise InvalidArgumentError(f"schedule {self.schedule!r} is not supported: expected one of {', '.join(SCHEDULES)}")
        for name in ("r", "batch_size", "grad_accum", "max_seq_len", "epochs", "save_every"):
            if int(getattr(self, name)) < 1:
                raise InvalidArgumentError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise InvalidArgumentError(f"{name} must be at least 1, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidArgumentError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise InvalidArgumentError(f"lr and max_grad_norm must be positive, got {self.lr} and {self.max_grad_norm}")
        from ..distributed.training import STRATEGIES

        if self.distributed not in STRATEGIES:
            raise InvalidArgumentError(f"distributed {self.distributed!r} is not supported: expected one of "
                                       f"{', '.join(STRATEGIES)}")
        if self.save_total_limit < 1:
            raise InvalidArgumentError(f"save_total_limit must be at least 1, got {self.save_total_limit}")


@dataclass
class TrainResult:
    """What a run did: steps, last and first losses, eval loss, where things are."""

    output_dir: str
    steps: int
    first_loss: float
    final_loss: float
    eval_loss: Optional[float]
    tokens: int
    seconds: float
    trainable_params: int
    footprint: Any = None
    resumed_from: Optional[int] = None
    history: list = field(default_factory=list)
    #: The trained model (LoRA layers in place), for evaluating or merging in the same process.
    model: Any = None
    stopped_early: bool = False


# --------------------------------------------------------------------------------------------
# Files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def latest_checkpoint(output_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The complete ``checkpoint-<step>`` directory with the highest step, or None."""
    best = None
    for p in Path(output_dir).glob("checkpoint-*"):
        m = _CHECKPOINT.match(p.name)
        if m and (p / STATE_FILE).is_file() and (p / "adapter_model.safetensors").is_file():
            if best is None or int(m[1]) > best[0]:
                best = (int(m[1]), p)
    return best[1] if best else None


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    out = [(int(m[1]), p) for p in output_dir.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))]
    return sorted(out)


def _remove_stale_temporaries(output_dir: Path) -> None:
    for p in output_dir.glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Progress


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class TrainProgress:
    """A one-line bar on a terminal (step, loss, tokens/s, ETA); elsewhere a line every ~5% of
    the run. ``note`` prints a full line without garbling the bar. ``enabled``: None for that
    choice, True for the bar, False for nothing at all."""

    def __init__(self, total: int, start: int = 0, stream: TextIO = sys.stderr, enabled: Optional[bool] = None) -> None:
        self.total, self.start = total, start
        self.stream = stream
        self.silent = enabled is False
        self.tty = stream.isatty() if enabled is None else bool(enabled)
        self.every = max(1, total // 20)
        self.t0 = time.perf_counter()
        self.drawn = False

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.silent:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else math.inf
        frac = step / self.total if self.total else 1.0
        text = (f"step {step}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                f"elapsed {_clock(elapsed)} | ETA {_clock(eta)}")
        if self.tty:
            width = 20
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            self.stream.write(f"\r[{bar}] {frac * 100:5.1f}% {text}\x1b[K")
            self.stream.flush()
            self.drawn = True
        elif step % self.every == 0 or step == self.total:
            print(text, file=self.stream, flush=True)

    def note(self, message: str) -> None:
        if self.silent:
            return
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


# --------------------------------------------------------------------------------------------
# Objectives


class _CausalLM:
    """Next-token loss on the labelled tokens; loss summed, to be divided by the token count
    of the whole accumulation window (so every token weighs the same)."""

    def __init__(self, tokenizer: Any, config: TrainConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def load(self, path: str, out: Callable[[str], None]) -> list:
        ds: Dataset = load_dataset(path, self.tokenizer, self.config.max_seq_len, skip_bad_lines=self.config.skip_bad_lines)
        out(f"data       {ds.report}")
        return ds.examples

    def batch(self, items: list) -> dict:
        return collate(items, self.pad_id)

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def loss_sum(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")


class _Contrastive:
    """In-batch-negatives ranking loss on mean-pooled, normalized embeddings."""

    def __init__(self, tokenizer: Any, config: TrainConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config

    def load(self, path: str, out: Callable[[str], None]) -> list:
        pairs, report = load_pairs(path, skip_bad_lines=self.config.skip_bad_lines)
        out(f"data       {report}")
        return pairs

    def batch(self, items: list) -> dict:
        enc = lambda texts: self.tokenizer(list(texts), padding=True, truncation=True,
                                           max_length=self.config.max_seq_len, return_tensors="pt")
        return {"prompts": enc(p for p, _ in items), "responses": enc(r for _, r in items)}

    def count(self, batch: dict) -> int:
        return int(batch["prompts"]["input_ids"].shape[0])

    def tokens(self, batch: dict) -> int:
        return int(batch["prompts"]["attention_mask"].sum() + batch["responses"]["attention_mask"].sum())

    def loss_sum(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        q = embed(model, batch["prompts"], device)
        d = embed(model, batch["responses"], device)
        scores = (q @ d.T) * self.config.contrastive_scale
        return F.cross_entropy(scores, torch.arange(scores.shape[0], device=device), reduction="sum")


def embed(model: nn.Module, encoded: Any, device: torch.device) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (float32) of a tokenized batch."""
    enc = {k: v.to(device) for k, v in encoded.items()}
    hidden = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


# --------------------------------------------------------------------------------------------
# Pieces of the run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from ..errors import CudaUnavailableError

        raise CudaUnavailableError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    from ..core.quant_state import parse_dtype

    if name == "auto":
        # bf16 as in the paper on GPUs and on CPUs with bf16 matrix instructions (AMX, AVX512-BF16);
        # float32 on other CPUs, where torch's bf16 matmuls are several times slower than float32.
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    return parse_dtype(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16), as torch sees it."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def make_optimizer(name: str, params: list, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """``auto``: the paged AdamW on CUDA, ``torch.optim.AdamW`` on the CPU (the paged one would
    use ordinary memory there and give the same numbers)."""
    if name == "auto":
        name = "paged_adamw" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from ..optim import PagedAdamW, PagedAdamW8bit

    cls = PagedAdamW if name == "paged_adamw" else PagedAdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``s`` (0-based): linear warmup from 0 over
    ``warmup`` steps, then constant, linear decay to 0, or cosine decay to 0."""

    def f(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


class _Stream:
    """Micro-batches in a seeded random order per epoch; its position is (epoch, index).

    With ``lengths`` (one per example), examples of similar length share a batch, as the QLoRA
    reference trainer's ``group_by_length`` does: the epoch's random order is cut into mega-batches of
    up to 50 batches, each sorted by length and cut into batches, whose order is then shuffled (the
    last, possibly partial batch of an epoch stays last). Padding drops; every example is still seen
    once per epoch, in an order that depends only on the seed and the epoch."""

    MEGA_BATCHES = 50

    def __init__(self, n: int, batch_size: int, seed: int, lengths: Optional[Sequence[int]] = None) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lengths = list(lengths) if lengths is not None else None
        self.per_epoch = -(-n // batch_size)
        self.epoch, self.index = 0, 0
        self._order: Optional[list[int]] = None

    def _perm(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            self._order = order if self.lengths is None else self._grouped(order, g)
        return self._order

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        bs = self.batch_size
        mega = bs * max(1, min(self.MEGA_BATCHES, self.n // (4 * bs)))
        out: list[int] = []
        for start in range(0, self.n, mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches = [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
            tail = [batches.pop()] if len(batches[-1]) < bs else []
            for k in torch.randperm(len(batches), generator=g).tolist():
                out += batches[k]
            for b in tail:
                out += b
        return out

    def next(self) -> list[int]:
        order = self._perm()
        chunk = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        if self.index >= self.per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return chunk

    @property
    def position(self) -> float:
        return self.epoch + self.index / self.per_epoch


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------------------------
# The run


def train(
    config: TrainConfig,
    *,
    callbacks: Sequence[Callable[[int, dict], Any]] = (),
    out: Optional[TextIO] = None,
    progress_stream: Optional[TextIO] = None,
) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring. ``callbacks`` are called
    after every optimizer step with ``(step, metrics)``; one that returns True ends the run
    there (it is then checkpointed and saved as if it were the last step). Wrong paths fail at once
    (:func:`check_paths`); a run that fails before its first checkpoint leaves no output directory
    behind if it created it."""
    from ..distributed.training import DistributedTraining

    config.validate()
    check_paths(config)
    # Under torchrun every process runs this function; rank 0 alone writes files and output.
    run = DistributedTraining(config.distributed, resolve_device(config.device))
    out = (sys.stdout if out is None else out) if run.is_main else io.StringIO()
    progress_stream = sys.stderr if progress_stream is None else progress_stream
    say = lambda line: print(line, file=out, flush=True)
    output_dir = Path(config.output_dir)
    # Created only once the run starts, and removed again if it fails before its first checkpoint.
    created = _first_missing(output_dir)
    if run.is_main:
        _remove_stale_temporaries(output_dir)
    resume_dir = _check_resume(config, output_dir)
    try:
        return _run(config, run, output_dir, resume_dir, callbacks, out, say, progress_stream)
    except BaseException:
        if created is not None and run.is_main and latest_checkpoint(output_dir) is None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _run(config: TrainConfig, run: Any, output_dir: Path, resume_dir: Optional[Path], callbacks: Sequence[Callable],
         out: TextIO, say: Callable[[str], None], progress_stream: TextIO) -> TrainResult:
    from transformers import AutoTokenizer

    from ..surgery.model import add_lora, prepare_for_training
    from ..io.hf_quantizer import QloraConfig
    from ..io.checkpoint import Checkpoint
    from ..io.loading import memory_footprint
    from ..api.loading import from_pretrained as load_model

    if config.threads is not None:
        if int(config.threads) < 1:
            raise InvalidArgumentError(f"threads must be at least 1, got {config.threads}")
        torch.set_num_threads(int(config.threads))
    device = run.device
    compute_dtype = resolve_compute_dtype(config.compute_dtype, device)
    seed_everything(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if config.task == "causal-lm" and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    objective = (_CausalLM if config.task == "causal-lm" else _Contrastive)(tokenizer, config)

    # The data first: a bad line should not wait for the model to load.
    train_items = objective.load(config.data, say)
    eval_items = objective.load(config.eval_file, say) if config.eval_file else None

    quant = QloraConfig(quant_type=config.quant_type, double_quant=config.double_quant, compute_dtype=compute_dtype,
                        blocksize=config.blocksize)
    with Checkpoint(config.model) as ckpt:
        prequantized = bool(ckpt.quantized_weights())
    model_class = "AutoModel" if config.task == "contrastive" else None
    lora_options = dict(r=config.r, alpha=config.alpha, dropout=config.dropout, target_modules=config.target_modules,
                        use_rslora=config.use_rslora)
    if run.strategy == "fsdp":
        # FSDP2 shards while loading; the adapters must exist before that.
        added: dict = {}

        def prepare(skeleton: nn.Module) -> None:
            added["summary"] = add_lora(skeleton, **lora_options)
            prepare_for_training(skeleton, gradient_checkpointing=config.gradient_checkpointing)

        model = load_model(config.model, quantization=None if prequantized else quant, compute_dtype=compute_dtype,
                           model_class=model_class, device_mesh=run.mesh, prepare=prepare)
    else:
        model = load_model(config.model, quantization=None if prequantized else quant, compute_dtype=compute_dtype,
                           device=device, model_class=model_class)
    if config.task == "causal-lm" and not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise InvalidArgumentError(
            f"{config.model} is a {type(model).__name__}, not a causal language model: use task 'contrastive' "
            "(--task contrastive) for encoders"
        )
    footprint = memory_footprint(model)
    if run.strategy == "fsdp":
        summary = added["summary"]
    else:
        summary = add_lora(model, **lora_options)
        prepare_for_training(model, gradient_checkpointing=config.gradient_checkpointing)
    model = run.wrap(model)
    model.train()
    kind = getattr(run.unwrap(model), "qlora_rs_checkpoint", {}).get("kind", "?")
    over = f", {run.strategy.upper()} over {run.world_size} processes" if run.active else ""
    say(f"model      {config.model} ({type(run.unwrap(model)).__name__}, {kind} checkpoint) on {device}, "
        f"compute {compute_dtype}{over}")
    say(f"memory     {_mib(footprint.bytes_16bit)} in 16-bit -> {_mib(footprint.bytes_now)} loaded "
        f"({footprint.bytes_16bit / max(footprint.bytes_now, 1):.1f}x smaller); {footprint.quantized_params / 1e6:.2f} M of "
        f"{footprint.params / 1e6:.2f} M params in 4 bits")
    say(f"trainable  {summary.trainable:,} LoRA params ({summary.percent:.2f}% of {summary.total:,}), r={config.r}, "
        f"alpha={config.alpha:g}, dropout={config.dropout:g}, {len(summary.modules)} layers")

    # One global micro-batch of batch_size examples per process; each process takes its share.
    lengths = [len(e.input_ids) for e in train_items] if config.group_by_length and config.task == "causal-lm" else None
    stream = _Stream(len(train_items), config.batch_size * run.world_size, config.seed, lengths)
    steps_per_epoch = -(-stream.per_epoch // config.grad_accum)
    total = int(config.max_steps) if config.max_steps else config.epochs * steps_per_epoch
    warmup = math.ceil(config.warmup_ratio * total)
    eval_every = config.eval_every or config.save_every

    params = [p for p in model.parameters() if p.requires_grad]
    # The paged optimizers keep plain per-process states; FSDP2's parameters are DTensors.
    optimizer_name = "adamw" if run.strategy == "fsdp" and config.optimizer == "auto" else config.optimizer
    optimizer = make_optimizer(optimizer_name, params, config.lr, config.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, warmup, total))
    per_process = f" x {run.world_size} processes" if run.active else ""
    say(f"schedule   {total} steps x {config.batch_size * config.grad_accum * run.world_size} examples "
        f"(batch {config.batch_size}{per_process}, grad accum {config.grad_accum}), {steps_per_epoch} steps/epoch, "
        f"lr {config.lr:g} {config.schedule} after {warmup} warmup steps, {type(optimizer).__name__}, "
        f"max grad norm {config.max_grad_norm:g}")

    step, tokens_seen, elapsed_before, resumed_from = 0, 0, 0.0, None
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / METRICS_FILE
    if resume_dir is not None:
        state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=True)
        rng = run.pick(state["rng"])  # refuses another number of processes
        run.load_adapter(model, resume_dir)
        run.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen, elapsed_before = int(state["step"]), int(state["tokens"]), float(state["elapsed"])
        stream.epoch, stream.index = int(state["epoch"]), int(state["index"])
        _set_rng_state(rng)
        if run.is_main:
            _truncate_metrics(metrics_path, step)
        resumed_from = step
        say(f"resume     from {resume_dir} (step {step}, epoch {stream.position:.2f})")
    elif run.is_main:
        if metrics_path.exists():
            metrics_path.unlink()
        write_atomic(output_dir / CONFIG_FILE, (json.dumps(asdict(config), indent=2) + "\n").encode())

    progress = TrainProgress(total, step, progress_stream, config.progress if run.is_main else False)
    history: list[dict] = []
    first_loss = None
    eval_loss = None
    stopped_early = False
    session_start = time.perf_counter()
    try:
        with open(metrics_path if run.is_main else os.devnull, "a", encoding="utf-8") as metrics:
            if eval_items is not None and step == 0:
                # The baseline the eval curve starts from.
                eval_loss = evaluate(run.unwrap(model), objective, eval_items, config.batch_size, device)
                metrics.write(json.dumps({"step": 0, "eval_loss": eval_loss}) + "\n")
                progress.note(f"step 0: eval loss {eval_loss:.4f}")
            while step < total:
                t0 = time.perf_counter()
                batches = [objective.batch([train_items[i] for i in run.local(stream.next())])
                           for _ in range(config.grad_accum)]
                count = run.sum(sum(objective.count(b) for b in batches))
                tokens = run.sum(sum(objective.tokens(b) for b in batches))
                lr = scheduler.get_last_lr()[0]
                loss_total = 0.0
                for b in batches:
                    loss = objective.loss_sum(model, b, device) / max(count, 1)
                    # DDP and FSDP2 average the gradients over the processes; the sum is wanted.
                    (loss * run.world_size if run.active else loss).backward()
                    loss_total += float(loss.detach())
                loss_total = run.sum(loss_total)
                grad_norm = run.clip_grad_norm(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens
                dt = time.perf_counter() - t0
                record = {"step": step, "loss": loss_total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                          "tokens_per_s": tokens / dt if dt > 0 else 0.0, "epoch": round(stream.position, 4),
                          "elapsed_s": round(elapsed_before + time.perf_counter() - session_start, 3)}
                if first_loss is None:
                    first_loss = loss_total
                if not math.isfinite(loss_total):
                    raise QloraError(f"the loss became {loss_total} at step {step}; lower the learning rate "
                                     f"(now {config.lr:g}) or check the data")
                stop = run.any(any([bool(cb(step, record)) for cb in callbacks]))
                if eval_items is not None and (step % eval_every == 0 or step == total or stop):
                    eval_loss = evaluate(run.unwrap(model), objective, eval_items, config.batch_size, device)
                    record["eval_loss"] = eval_loss
                    progress.note(f"step {step}: eval loss {eval_loss:.4f}")
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                history.append(record)
                progress.update(step, loss_total, record["tokens_per_s"])
                if stop and step < total:
                    stopped_early = True
                    progress.note(f"step {step}: stopped by a callback")
                if step % config.save_every == 0 or step == total or stop:
                    if run.is_main:
                        metrics.flush()
                        os.fsync(metrics.fileno())
                    state = {
                        "step": step, "epoch": stream.epoch, "index": stream.index, "tokens": tokens_seen,
                        "elapsed": elapsed_before + time.perf_counter() - session_start,
                        "optimizer": run.optimizer_state(model, optimizer), "scheduler": scheduler.state_dict(),
                        "rng": run.gather(_rng_state()),
                    }
                    _save_checkpoint(model, output_dir, step, state, config, run)
                if stop:
                    break
    finally:
        progress.close()
    run.save_adapter(model, output_dir, base_model_name_or_path=str(config.model))
    final_loss = history[-1]["loss"] if history else float("nan")
    elapsed = elapsed_before + time.perf_counter() - session_start
    say(f"done       {step} steps, {tokens_seen:,} tokens in {_clock(elapsed)}; loss "
        f"{first_loss if first_loss is not None else float('nan'):.4f} -> {final_loss:.4f}"
        + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""))
    if config.plot and run.is_main:
        plot = plot_losses(metrics_path, output_dir / PLOT_FILE)
        if plot:
            say(f"plot       {plot}")
    say(f"adapter    {output_dir} (PEFT layout; qlora-rs merge {config.model} {output_dir} -o MERGED)")
    return TrainResult(str(output_dir), step, first_loss if first_loss is not None else float("nan"), final_loss,
                       eval_loss, tokens_seen, elapsed, summary.trainable, footprint, resumed_from, history, model,
                       stopped_early)


def check_paths(config: TrainConfig) -> None:
    """What can be checked before anything loads: MODEL_DIR is a local model directory, the data
    files exist, and ``output_dir`` is new, empty or a run of ours (unless ``force``). Raises
    FileNotFoundError / FileExistsError naming the path."""
    model = Path(config.model)
    if not model.exists():
        raise FileNotFoundError(f"MODEL_DIR {model}: no such directory{_did_you_mean(model)}")
    if not model.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {model} is a file; expected a transformers model directory "
                                "(config.json, safetensors weights, tokenizer)")
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"MODEL_DIR {model} has no config.json: not a transformers model directory")
    for what, path in (("DATA.jsonl", config.data), ("--eval-file", config.eval_file)):
        if path is not None and not Path(path).is_file():
            kind = "a directory, not a JSONL file" if Path(path).is_dir() else f"no such file{_did_you_mean(Path(path))}"
            raise FileNotFoundError(f"{what} {path}: {kind}")
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"OUT_DIR {out} is a file; expected a directory for the run")
    if out.is_dir() and not config.force and not config.resume and not _is_run(out) and any(out.iterdir()):
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise FileExistsError(
            f"OUT_DIR {out} is not empty ({shown}, ...) and holds no qlora-rs run: choose a new or empty directory, "
            "or pass --force to write the run into it (its other files are left alone)"
        )


def _is_run(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() or any(_CHECKPOINT.match(p.name) for p in path.glob("checkpoint-*"))


def _first_missing(path: Path) -> Optional[Path]:
    """The topmost directory of ``path`` that does not exist yet (what creating it would add)."""
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _did_you_mean(path: Path) -> str:
    """'; did you mean X?' for the directory nearest to a missing path, or ''."""
    import difflib

    parent, missing = path.parent, [path.name]
    while not parent.exists() and parent != parent.parent:
        missing.insert(0, parent.name)
        parent = parent.parent
    try:
        names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    except OSError:
        return ""
    close = difflib.get_close_matches(missing[0], names, n=1, cutoff=0.6)
    if close:
        guess = parent.joinpath(close[0], *missing[1:])
        return f"; did you mean {guess if guess.exists() else parent / close[0]}?"
    if len(missing) > 1:
        return f" (the nearest existing directory is {parent})"
    return ""


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check_resume(config: TrainConfig, output_dir: Path) -> Optional[Path]:
    latest = latest_checkpoint(output_dir)
    if not config.resume:
        if latest is not None:
            raise InvalidArgumentError(
                f"{output_dir} already holds checkpoints of a run ({latest.name}): pass --resume to continue it, "
                "or choose another output directory"
            )
        return None
    if latest is None:
        raise FileNotFoundError(f"{output_dir}: no checkpoint-<step> directory to resume from")
    saved_path = output_dir / CONFIG_FILE
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        now = asdict(config)
        differ = [f"{k} ({saved.get(k)!r} then, {now.get(k)!r} now)" for k in _RESUME_KEYS
                  if k in saved and _norm(saved.get(k)) != _norm(now.get(k))]
        if differ:
            raise InvalidArgumentError(f"--resume would continue {output_dir} with other options: {', '.join(differ)}")
    return latest


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops the records written after the checkpoint being resumed (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the kill
    write_atomic(path, ("\n".join(kept) + ("\n" if kept else "")).encode())


def _save_checkpoint(model: nn.Module, output_dir: Path, step: int, state: dict, config: TrainConfig, run: Any) -> Path:
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    if not run.is_main:
        run.save_adapter(model, tmp)  # its part of the gather; rank 0 writes
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    run.save_adapter(model, tmp, base_model_name_or_path=str(config.model))
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(output_dir)
    for old_step, path in _checkpoints(output_dir)[:-config.save_total_limit]:
        if old_step != step:
            shutil.rmtree(path, ignore_errors=True)
    return final


@torch.no_grad()
def evaluate(model: nn.Module, objective: Any, items: list, batch_size: int, device: torch.device) -> float:
    """Mean loss over ``items`` (per token, or per pair), in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(items), batch_size):
            b = objective.batch(items[i:i + batch_size])
            total += float(objective.loss_sum(model, b, device))
            count += objective.count(b)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def evaluate_file(model: nn.Module, tokenizer: Any, path: Union[str, os.PathLike], config: TrainConfig) -> float:
    """The eval loss of ``model`` on a JSONL file, as a run with ``config`` computes it."""
    objective = (_CausalLM if config.task == "causal-lm" else _Contrastive)(tokenizer, config)
    items = objective.load(str(path), lambda line: None)
    device = next(model.parameters()).device
    return evaluate(model, objective, items, config.batch_size, device)


def plot_losses(metrics_path: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> Optional[Path]:
    """Draws the train loss (raw and smoothed) and the eval loss against the step into a PNG;
    returns its path, or None without matplotlib or records."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not any("loss" in r for r in records):
        return None
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    smooth, ema = [], None
    for x in losses:
        ema = x if ema is None else 0.9 * ema + 0.1 * x
        smooth.append(ema)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="train loss (EMA 0.9)")
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, dst)
    return dst
