"""Measuring one training step's peak memory (:func:`measure_training_step`), the check that the
estimates of :mod:`qlora_rs.training.memory_plan` hold: on the CPU from torch's profiler
allocation timeline, on CUDA from the allocator's peak statistics."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

from ..errors import InvalidArgumentError

from .memory_plan import METHODS, _PAGED, _check_options, _load_config, _tensor_bytes

__all__ = ["measure_training_step"]



@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences the C++ profiler's start/stop lines and the allocator's note about blocks freed
    that were allocated before profiling (both written to fd 2, outside Python's control)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _allocation_timeline(prof: Any) -> tuple[list, list]:
    """(allocations, marks): ``(time_ns, ptr, bytes)`` of every CPU allocation (+) and free (-)
    the allocator reported, and ``(time_ns, name)`` of every ``record_function`` mark."""
    from torch._C._profiler import _EventType

    allocations, marks = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if f.device.type == "cpu":
                allocations.append((e.start_time_ns, f.ptr, f.alloc_size))
        elif e.name.startswith("plan:"):
            marks.append((e.start_time_ns, e.name[5:]))
    allocations.sort(key=lambda a: a[0])
    marks.sort()
    return allocations, marks


def _replay(allocations: list, marks: list) -> tuple[int, dict, dict]:
    """Peak live bytes, and live bytes at / peak since each mark."""
    live: dict[int, int] = {}
    current = peak = 0
    at: dict[str, int] = {}
    peak_in: dict[str, int] = {}
    phase = None
    j = 0
    for t, ptr, size in allocations:
        while j < len(marks) and marks[j][0] <= t:
            phase = marks[j][1]
            at[phase] = peak_in[phase] = current
            j += 1
        if size > 0:
            live[ptr] = size
            current += size
        elif ptr in live:
            current -= live.pop(ptr)
        peak = max(peak, current)
        if phase is not None:
            peak_in[phase] = max(peak_in[phase], current)
    for _, name in marks[j:]:
        at[name] = peak_in[name] = current
    return peak, at, peak_in


def measure_training_step(
    config: Any,
    method: str = "qlora",
    *,
    seq: int = 64,
    batch: int = 2,
    r: int = 8,
    target_modules: Union[str, Sequence[str]] = "all-linear",
    optimizer: str = "paged_adamw",
    gradient_checkpointing: bool = True,
    blocksize: int = 64,
    double_quant: bool = True,
    lora_dropout: float = 0.05,
    lora_dtype: Any = "float32",
    attention: str = "sdpa",
    padding: bool = True,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Measures what one training step of ``method`` takes (bf16 model and compute, LoRA as
    :func:`qlora_rs.add_lora` makes it, the loss of ``qlora-rs train``). Builds the model of
    ``config`` with random weights, runs two steps on random tokens (the last example padded by a
    quarter when ``padding``) and returns bytes by the plan's names: ``weights`` (the model's
    parameters and buffers, LoRA excluded), ``lora``, ``optimizer`` (the state the first step
    created), then, over the second step: ``gradients`` (at the end of the backward),
    ``activations`` (the peak of the forward and backward above the step's start, the gradients
    made so far included) and ``total`` (weights + LoRA + optimizer state + the step's peak).

    On the CPU the peak comes from the allocator's own reports (see the module docstring); on
    ``device="cuda"`` from ``torch.cuda.max_memory_allocated``, with the paged optimizers' state
    in ordinary device memory (``paged=False``, same layout), since managed memory is outside
    torch's accounting."""
    import torch
    import torch.nn.functional as F
    import transformers

    from ..io.loading import memory_footprint
    from ..surgery.model import add_lora, enable_checkpointing, prepare_for_training, quantize_model
    from .train import make_optimizer

    if method not in METHODS:
        raise InvalidArgumentError(f"measure_training_step: method {method!r}: expected one of {', '.join(METHODS)}")
    _check_options(optimizer, attention, seq, batch, lora_dropout)
    dev = torch.device(device)
    cfg = _load_config(config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attention)
    if method == "qlora":
        quantize_model(model, blocksize=blocksize, double_quant=double_quant, compute_dtype=torch.bfloat16)
    model.to(dev)
    if method == "full_16bit":
        params = list(model.parameters())
        if gradient_checkpointing:
            enable_checkpointing(model)
    else:
        add_lora(model, r=r, target_modules=target_modules, dropout=lora_dropout, lora_dtype=lora_dtype)
        prepare_for_training(model, gradient_checkpointing=gradient_checkpointing)
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    lora = sum(p.numel() * p.element_size() for p in params) if method != "full_16bit" else 0
    weights = memory_footprint(model).bytes_now - lora
    if dev.type == "cuda" and optimizer in _PAGED:
        from ..optim import PagedAdamW, PagedAdamW8bit

        opt = (PagedAdamW if optimizer == "paged_adamw" else PagedAdamW8bit)(params, lr=1e-4, weight_decay=0.0, paged=False)
    else:
        opt = make_optimizer(optimizer, params, 1e-4, 0.0, dev)

    vocab = int(cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if padding:
        mask[-1, seq - max(seq // 4, 1):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    count = int((labels[:, 1:] != -100).sum())
    ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)

    def step(mark: Any) -> None:
        mark("forward")
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum") / max(count, 1)
        del logits
        mark("backward")
        loss.backward()
        del loss
        mark("step")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("done")

    # The first step creates the optimizer state; the second, measured, is a steady-state step.
    step(lambda name: None)
    state = _optimizer_state_bytes(opt)
    if dev.type == "cuda":
        at, peak_in, peak = _measure_cuda(step, dev)
    else:
        at, peak_in, peak = _measure_cpu(step)
    return {
        "weights": weights,
        "lora": lora,
        "optimizer": state,
        "gradients": at["step"],
        "activations": max(peak_in["forward"], peak_in["backward"]),
        "total": weights + lora + state + peak,
    }


def _measure_cpu(step: Any) -> tuple[dict, dict, int]:
    from torch.profiler import ProfilerActivity, profile, record_function

    def mark(name: str) -> None:
        with record_function("plan:" + name):
            pass

    import inspect

    # acc_events: keep every event of the step (torch 2.11 warns that a cycle's end clears them).
    keep = {"acc_events": True} if "acc_events" in inspect.signature(profile.__init__).parameters else {}
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, **keep) as prof:
            step(mark)
        allocations, marks = _allocation_timeline(prof)
    peak, at, peak_in = _replay(allocations, marks)
    return at, peak_in, peak


def _measure_cuda(step: Any, device: Any) -> tuple[dict, dict, int]:
    import torch

    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    at: dict[str, int] = {}
    peak_in: dict[str, int] = {}
    overall = 0
    phase: list[Optional[str]] = [None]

    def mark(name: str) -> None:
        nonlocal overall
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        overall = max(overall, peak)
        if phase[0] is not None:
            peak_in[phase[0]] = peak
        at[name] = torch.cuda.memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        phase[0] = name

    torch.cuda.reset_peak_memory_stats(device)
    step(mark)
    return at, peak_in, overall


def _optimizer_state_bytes(opt: Any) -> int:
    nbytes = getattr(opt, "state_nbytes", None)
    if callable(nbytes):
        return sum(nbytes().values())
    return _tensor_bytes(t for state in opt.state.values() for t in state.values() if hasattr(t, "numel"))
