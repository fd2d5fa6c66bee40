"""Paged AdamW: AdamW whose state lives in CUDA managed memory, so it can be paged to host RAM
while activations need the GPU memory.

:class:`PagedAdamW` keeps float32 states (the paper's ``paged_adamw_32bit``);
:class:`PagedAdamW8bit` keeps them blockwise 8-bit (block 256, one float32 absmax per block; the
first moment with the signed dynamic map, the second with the unsigned one), about a quarter of
the memory.

How the state is held. At the first ``step()`` (and whenever parameters without state get a
gradient) the states of all those parameters are allocated together, one buffer per device:
managed memory on CUDA (``paged=True``, the default), ordinary device memory with
``paged=False``, ordinary host memory for CPU parameters. The state tensors are views into that
buffer, so paging the whole state costs one driver call per device. ``step()`` prefetches the
state to the GPU before updating; :meth:`page_out` sends it to host memory on a side stream (so
the transfer overlaps the next forward; its GPU memory is free once the transfer has run),
:meth:`page_in` brings it back on the current CUDA stream; with ``page_out_after_step=True``
every step ends with a page-out. On CPU parameters
and with ``paged=False`` the page calls do nothing; everything else behaves the same.

The arithmetic is ``torch.optim.AdamW``'s (decoupled weight decay, bias correction), in the same
order of operations, so with float32 parameters :class:`PagedAdamW` gives the same numbers. States
are float32 whatever the parameter dtype (as in bitsandbytes' 32-bit optimizers); a bfloat16 or
float16 parameter is updated in float32 and rounded once.

8-bit details: parameters with fewer than ``min_8bit_size`` (4096) elements keep float32
states, as in bitsandbytes. Each step decodes the 8-bit states to float32, applies the update
with them and encodes them again. A non-finite state value (from a NaN or infinite gradient)
raises :class:`~qlora_rs.NonFiniteError` naming the parameter; on CUDA this is checked once at
the end of the step (one synchronisation), on the CPU by the core as it encodes. The step may
then be partly applied: reload a checkpoint.

``state_dict()`` returns host (CPU) copies: for :class:`PagedAdamW` the keys and layout of
``torch.optim.AdamW`` (``step``, ``exp_avg``, ``exp_avg_sq``), loadable by it; for the 8-bit
states the codes and block scales themselves (``exp_avg_q``, ``exp_avg_absmax``,
``exp_avg_sq_q``, ``exp_avg_sq_absmax``: exact, so resuming gives the same next steps).
``load_state_dict`` accepts either layout for either optimizer (converting float32 states to
8-bit or back as needed).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Any, Callable, Iterable, Optional, Union

import torch

from ..errors import InvalidArgumentError, NonFiniteError
from . import paging
from .blockwise8 import BLOCKSIZE, SIGNED, UNSIGNED

_ALIGN = 256  # bytes between state tensors in a buffer
_STATE32 = ("exp_avg", "exp_avg_sq")
_STATE8 = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


class _StateBuffer:
    """One allocation holding the state tensors of several parameters of one device."""

    def __init__(self, device: torch.device, specs: list[tuple[torch.Size, torch.dtype]], managed: bool) -> None:
        self.device = device
        self.managed = managed
        offsets = []
        total = 0
        for shape, dtype in specs:
            total = -(-total // _ALIGN) * _ALIGN
            offsets.append(total)
            total += shape.numel() * _itemsize(dtype)
        self.nbytes = total
        self.owner = None
        # The side stream a page-out runs on, until the next page-in joins it.
        self.pending: Optional[torch.cuda.Stream] = None
        if managed and total > 0:
            raw, self.owner = paging._managed_empty_with_owner((total,), torch.uint8, device)
            # Keep a mapping in the GPU's page tables while the state is paged out, as bitsandbytes
            # does, then populate the pages on the GPU by prefetching rather than by faults.
            self.owner.advise_accessed_by(raw.device.index)
            self.prefetch(to_host=False)
            raw.zero_()
        else:
            raw = torch.zeros(total, dtype=torch.uint8, device=device)
        self.views = [
            raw[o : o + shape.numel() * _itemsize(dtype)].view(dtype).view(shape)
            for o, (shape, dtype) in zip(offsets, specs)
        ]

    def prefetch(self, to_host: bool) -> None:
        """Page-outs run on a side stream that first waits for the work queued so far (the
        update), so the transfer overlaps the next forward instead of delaying it; a page-in
        runs on the current stream after joining that side stream."""
        if self.owner is None:
            return
        current = torch.cuda.current_stream(self.device)
        if to_host:
            side = _side_stream(self.device)
            side.wait_stream(current)
            self.owner.prefetch(paging.HOST, side.cuda_stream)
            self.pending = side
        else:
            self.join()
            self.owner.prefetch(self.owner.device, current.cuda_stream)

    def join(self) -> None:
        """Orders the current stream after a pending page-out."""
        if self.pending is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.pending)
            self.pending = None


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any, who: str) -> None:
    if not 0.0 <= float(lr):
        raise InvalidArgumentError(f"{who}: lr must be >= 0, got {lr!r}")
    if not 0.0 <= float(eps):
        raise InvalidArgumentError(f"{who}: eps must be >= 0, got {eps!r}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise InvalidArgumentError(f"{who}: betas must be two numbers in [0, 1), got {betas!r}")
    if not 0.0 <= float(weight_decay):
        raise InvalidArgumentError(f"{who}: weight_decay must be >= 0, got {weight_decay!r}")


def _adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
            step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update of float32 tensors in place, in torch.optim.AdamW's order of operations
    (so that the rounding, not only the formula, is the same)."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class _PagedAdamWBase(torch.optim.Optimizer):
    _eight_bit = False

    def __init__(self, params: Any, defaults: dict, page_out_after_step: bool, paged: bool) -> None:
        super().__init__(params, defaults)
        self.page_out_after_step = bool(page_out_after_step)
        self.paged = bool(paged)
        self._buffers: list[_StateBuffer] = []

    # ------------------------------------------------------------------ layout of the state

    def _is_8bit(self, p: torch.Tensor, group: dict) -> bool:
        return self._eight_bit and p.numel() >= group["min_8bit_size"]

    def _specs(self, p: torch.Tensor, group: dict) -> list[tuple[str, torch.Size, torch.dtype]]:
        if self._is_8bit(p, group):
            blocks = torch.Size([-(-p.numel() // BLOCKSIZE)])
            return [("exp_avg_q", p.shape, torch.uint8), ("exp_avg_absmax", blocks, torch.float32),
                    ("exp_avg_sq_q", p.shape, torch.uint8), ("exp_avg_sq_absmax", blocks, torch.float32)]
        return [("exp_avg", p.shape, torch.float32), ("exp_avg_sq", p.shape, torch.float32)]

    def _allocate(self, items: list[tuple[torch.Tensor, dict]]) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """Zero states for ``(param, group)`` pairs, one buffer per device."""
        by_device: dict[torch.device, list[tuple[torch.Tensor, dict]]] = defaultdict(list)
        for p, g in items:
            by_device[p.device].append((p, g))
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for device, pairs in by_device.items():
            entries = [(p, name, shape, dtype) for p, g in pairs for name, shape, dtype in self._specs(p, g)]
            buf = _StateBuffer(device, [(s, d) for _, _, s, d in entries], self.paged and device.type == "cuda")
            self._buffers.append(buf)
            for (p, name, _, _), view in zip(entries, buf.views):
                out.setdefault(p, {})[name] = view
        for states in out.values():
            if "exp_avg_q" in states:
                states["exp_avg_q"].fill_(SIGNED.zero_code)
                states["exp_avg_sq_q"].fill_(UNSIGNED.zero_code)
        return out

    def _init_states(self) -> None:
        missing = [(p, g) for g in self.param_groups for p in g["params"]
                   if p.grad is not None and len(self.state[p]) == 0]
        if not missing:
            return
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                if hasattr(p, "placements") and hasattr(p, "to_local"):
                    raise InvalidArgumentError(
                        f"{type(self).__name__}: parameter {pi} of group {gi} is a DTensor (FSDP2/tensor parallel); "
                        "paged optimizers keep plain per-process states and do not support DTensor parameters: "
                        "use torch.optim.AdamW there"
                    )
        for p, views in self._allocate(missing).items():
            self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32), **views}

    # ------------------------------------------------------------------ paging

    def page_out(self) -> None:
        """Moves the optimizer state to host memory, asynchronously: on a side stream that waits
        for the work queued so far on the current stream, so the transfer overlaps what comes
        next (the next forward); its GPU memory is free once the transfer has run. Nothing to do
        for CPU parameters or with ``paged=False``."""
        for buf in self._buffers:
            buf.prefetch(to_host=True)

    def page_in(self) -> None:
        """Moves the optimizer state back to the GPU, asynchronously on the current CUDA stream,
        after any page-out in flight (``step()`` does this itself)."""
        for buf in self._buffers:
            buf.prefetch(to_host=False)

    def state_nbytes(self) -> dict:
        """Bytes of state held: ``{"managed": ..., "device": ..., "host": ...}`` (managed memory,
        ordinary GPU memory, ordinary host memory)."""
        out = {"managed": 0, "device": 0, "host": 0}
        for buf in self._buffers:
            key = "managed" if buf.owner is not None else ("host" if buf.device.type == "cpu" else "device")
            out[key] += buf.nbytes
        return out

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One AdamW step over the parameters that have gradients (state prefetched to the GPU
        first; paged out afterwards with ``page_out_after_step``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._init_states()
        self.page_in()
        checks: list[tuple[int, int, str, torch.Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            eps = float(group["eps"])
            wd = float(group["weight_decay"])
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise InvalidArgumentError(
                        f"{type(self).__name__}: parameter {pi} of group {gi} has a sparse gradient; AdamW needs dense ones"
                    )
                state = self.state[p]
                state["step"] += 1
                step = state["step"].item()
                work = p if p.dtype == torch.float32 else p.float()
                grad = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
                if "exp_avg" in state:
                    _adamw_(work, grad, state["exp_avg"], state["exp_avg_sq"], step, lr, beta1, beta2, eps, wd)
                else:
                    self._step_8bit(work, grad, state, step, lr, beta1, beta2, eps, wd, gi, pi, checks)
                if work is not p:
                    p.copy_(work)
        self._check_finite(checks)
        if self.page_out_after_step:
            self.page_out()
        return loss

    def _step_8bit(self, work: torch.Tensor, grad: torch.Tensor, state: dict, step: float, lr: float,
                   beta1: float, beta2: float, eps: float, wd: float, gi: int, pi: int,
                   checks: list[tuple[int, int, str, torch.Tensor]]) -> None:
        m = SIGNED.dequantize(state["exp_avg_q"], state["exp_avg_absmax"])
        v = UNSIGNED.dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"])
        _adamw_(work, grad, m, v, step, lr, beta1, beta2, eps, wd)
        for codec, x, name in ((SIGNED, m, "exp_avg"), (UNSIGNED, v, "exp_avg_sq")):
            try:
                codec.quantize_into(x, state[name + "_q"], state[name + "_absmax"])
            except NonFiniteError:
                raise NonFiniteError(self._nonfinite_message(gi, pi, name, x)) from None
            if x.device.type != "cpu":
                checks.append((gi, pi, name, state[name + "_absmax"]))

    def _nonfinite_message(self, gi: int, pi: int, name: str, x: torch.Tensor) -> str:
        p = self.param_groups[gi]["params"][pi]
        bad = (~torch.isfinite(x.reshape(-1))).nonzero()
        where = f" (first at flat index {int(bad[0])})" if bad.numel() else ""
        return (
            f"{type(self).__name__}: the state {name} of parameter {pi} in group {gi} (shape {list(p.shape)}) "
            f"became non-finite{where}: its gradient holds NaN or infinity. The step may be partly applied; "
            "reload a checkpoint (and lower the learning rate or check the data)"
        )

    def _check_finite(self, checks: list[tuple[int, int, str, torch.Tensor]]) -> None:
        """On CUDA a NaN or infinity in an 8-bit state shows in its block scales; checked with one
        synchronisation per device, the culprit named only on failure."""
        if not checks:
            return
        ok: dict[torch.device, torch.Tensor] = {}
        for _, _, _, absmax in checks:
            flag = torch.isfinite(absmax).all()
            ok[absmax.device] = flag if absmax.device not in ok else ok[absmax.device] & flag
        if all(bool(flag) for flag in ok.values()):
            return
        for gi, pi, name, absmax in checks:
            if not bool(torch.isfinite(absmax).all()):
                p = self.param_groups[gi]["params"][pi]
                raise NonFiniteError(
                    f"{type(self).__name__}: the state {name} of parameter {pi} in group {gi} (shape {list(p.shape)}) "
                    "became non-finite: its gradient holds NaN or infinity. The step may be partly applied; "
                    "reload a checkpoint (and lower the learning rate or check the data)"
                )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The optimizer state with every tensor copied to host memory (see the module doc for
        the keys)."""
        for buf in self._buffers:
            buf.join()
        sd = super().state_dict()
        sd["state"] = {
            k: {name: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v) for name, v in st.items()}
            for k, st in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict from :meth:`state_dict` (of this class, the other paged AdamW, or
        ``torch.optim.AdamW``): hyperparameters as saved, states copied into freshly allocated
        buffers (managed memory on CUDA when ``paged``)."""
        saved_state = state_dict.get("state", {})
        saved_groups = state_dict["param_groups"]
        for buf in self._buffers:
            buf.join()
        super().load_state_dict({**state_dict, "state": {}})
        # Groups saved by another optimizer (torch's AdamW, the other paged one) lack our keys.
        for g in self.param_groups:
            for k, v in self.defaults.items():
                g.setdefault(k, v)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        index_of = {p: (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        loaded: dict[torch.Tensor, dict] = {}
        for k, st in saved_state.items():
            if k not in id_map:
                raise InvalidArgumentError(
                    f"{type(self).__name__}.load_state_dict: state for parameter id {k!r}, which no parameter group lists"
                )
            loaded[id_map[k]] = st
        self._buffers = []
        views = self._allocate([(p, group_of[p]) for p in loaded])
        for p, st in loaded.items():
            gi, pi = index_of[p]
            self.state[p] = self._restore(p, st, views[p], f"parameter {pi} of group {gi} (shape {list(p.shape)})")

    def _restore(self, p: torch.Tensor, saved: dict, views: dict[str, torch.Tensor], what: str) -> dict:
        who = f"{type(self).__name__}.load_state_dict: {what}"
        if "step" not in saved:
            raise InvalidArgumentError(f"{who}: the saved state has no 'step' (keys: {sorted(saved)})")
        has32 = all(k in saved for k in _STATE32)
        has8 = all(k in saved for k in _STATE8)
        if not (has32 or has8):
            raise InvalidArgumentError(
                f"{who}: the saved state has keys {sorted(saved)}; expected {list(_STATE32)} (float32 AdamW) "
                f"or {list(_STATE8)} (8-bit)"
            )

        def tensor(key: str, shape: torch.Size) -> torch.Tensor:
            t = saved[key]
            if not isinstance(t, torch.Tensor) or t.shape != shape:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidArgumentError(f"{who}: saved {key} is {got}, expected shape {list(shape)}")
            return t

        if "exp_avg" in views:  # float32 states here
            for key in _STATE32:
                if has32:
                    src = tensor(key, p.shape).float()
                else:
                    codec = SIGNED if key == "exp_avg" else UNSIGNED
                    src = codec.dequantize(tensor(key + "_q", p.shape).cpu(),
                                           tensor(key + "_absmax", _blocks_of(p)).float().cpu())
                views[key].copy_(src)
        else:  # 8-bit states here
            for key, codec in (("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED)):
                if has8:
                    views[key + "_q"].copy_(tensor(key + "_q", p.shape))
                    views[key + "_absmax"].copy_(tensor(key + "_absmax", _blocks_of(p)))
                else:
                    src = tensor(key, p.shape).float().to(p.device)
                    codec.quantize_into(src, views[key + "_q"], views[key + "_absmax"])
        step = saved["step"]
        return {"step": torch.tensor(float(step), dtype=torch.float32), **views}


def _blocks_of(p: torch.Tensor) -> torch.Size:
    return torch.Size([-(-p.numel() // BLOCKSIZE)])


class PagedAdamW(_PagedAdamWBase):
    """AdamW with float32 states in CUDA managed memory (bitsandbytes' ``PagedAdamW``, the
    paper's ``paged_adamw_32bit``); ordinary memory for CPU parameters. See the module doc.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (same defaults).
        page_out_after_step: page the state out to host memory at the end of every step.
        paged: ``False`` keeps the state in ordinary GPU memory (same arithmetic; for comparison).
    """

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[dict]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, page_out_after_step: bool = False, paged: bool = True) -> None:
        _check_hyper(lr, betas, eps, weight_decay, "PagedAdamW")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, page_out_after_step, paged)


class PagedAdamW8bit(_PagedAdamWBase):
    """AdamW with blockwise 8-bit states in CUDA managed memory (bitsandbytes'
    ``PagedAdamW8bit``); ordinary memory for CPU parameters. See the module doc.

    Args:
        params, lr, betas, eps, weight_decay, page_out_after_step, paged: as :class:`PagedAdamW`.
        min_8bit_size: parameters with fewer elements keep float32 states.
    """

    _eight_bit = True

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[dict]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, min_8bit_size: int = 4096, page_out_after_step: bool = False, paged: bool = True) -> None:
        _check_hyper(lr, betas, eps, weight_decay, "PagedAdamW8bit")
        if int(min_8bit_size) != min_8bit_size or min_8bit_size < 0:
            raise InvalidArgumentError(f"PagedAdamW8bit: min_8bit_size must be an integer >= 0, got {min_8bit_size!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=int(min_8bit_size))
        super().__init__(params, defaults, page_out_after_step, paged)


__all__ = ["PagedAdamW", "PagedAdamW8bit"]
