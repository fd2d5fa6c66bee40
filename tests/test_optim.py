"""PagedAdamW / PagedAdamW8bit: AdamW arithmetic, 8-bit accuracy, checkpoints, paging calls.

CPU tests use ordinary memory (the same classes, the same semantics); GPU-marked tests check
managed memory and the on-device 8-bit codec.
"""

from __future__ import annotations

import re

import pytest
import torch

from qlora_rs import InvalidArgumentError, NonFiniteError
from qlora_rs.core.functional import dequantize_blockwise_8bit, quantize_blockwise_8bit
from qlora_rs.optim import PagedAdamW, PagedAdamW8bit, paging
from qlora_rs.optim.blockwise8 import SIGNED, UNSIGNED

SHAPES = [(37, 19), (300,), (64, 80), (5,)]  # (64, 80) has 5120 elements: 8-bit states


@pytest.fixture(autouse=True)
def _one_thread():
    # These problems are tiny: several threads on a shared machine only add spin-waiting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for s in steps:
        for p, g in zip(params, _grads(s, params)):
            p.grad = g
        opt.step()


def _clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


# ---------------------------------------------------------------------------- 32-bit: torch's AdamW


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_paged_adamw_matches_torch_adamw_step_by_step(weight_decay):
    ref, ours = _params(), _params()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "betas": (0.8, 0.99)}]  # noqa: E731
    opt_ref = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=weight_decay, eps=1e-6, foreach=False)
    opt = PagedAdamW(groups(ours), lr=1e-2, weight_decay=weight_decay, eps=1e-6)
    for s in range(20):
        _run(opt_ref, ref, range(s, s + 1))
        _run(opt, ours, range(s, s + 1))
        for a, b in zip(ref, ours):
            # Same operations in the same order: equal in practice; the tolerance is float32's.
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_paged_adamw_defaults_are_torch_adamw_defaults():
    opt = PagedAdamW([torch.zeros(3, requires_grad=True)])
    ref = torch.optim.AdamW([torch.zeros(3, requires_grad=True)])
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert opt.defaults[key] == ref.defaults[key]


def test_bfloat16_params_are_updated_in_float32_and_rounded_once():
    p16 = torch.randn(64, 64).bfloat16().requires_grad_()
    p32 = p16.detach().float().requires_grad_()
    g = torch.randn(64, 64)
    p16.grad, p32.grad = g.bfloat16(), g.bfloat16().float()
    PagedAdamW([p16], lr=1e-2).step()
    torch.optim.AdamW([p32], lr=1e-2, foreach=False).step()
    assert p16.dtype == torch.bfloat16
    assert torch.equal(p16, p32.bfloat16())


def test_closure_and_params_without_grad():
    w = torch.ones(4, requires_grad=True)
    frozen = torch.ones(4, requires_grad=True)
    opt = PagedAdamW([w, frozen], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 4.0
    assert len(opt.state[frozen]) == 0 and torch.equal(frozen, torch.ones(4))
    assert (w < 1).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"betas": (0.9, 1.0)}, "betas must be two numbers in [0, 1)"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ],
)
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_bad_hyperparameters_are_named(cls, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=re.escape(f"{cls.__name__}: {message}")):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_min_8bit_size():
    with pytest.raises(InvalidArgumentError, match="min_8bit_size must be an integer >= 0"):
        PagedAdamW8bit([torch.zeros(2, requires_grad=True)], min_8bit_size=-1)


def test_sparse_gradient_is_refused():
    w = torch.zeros(3, requires_grad=True)
    w.grad = torch.zeros(3).to_sparse()
    with pytest.raises(InvalidArgumentError, match="parameter 0 of group 0 has a sparse gradient"):
        PagedAdamW([w]).step()


def test_dtensor_params_are_refused_with_a_hint():
    class FakeDTensor(torch.nn.Parameter):  # what the check looks at: placements and to_local
        placements = ()

        def to_local(self):
            return self

    w = FakeDTensor(torch.zeros(3))
    w.grad = torch.zeros(3)
    with pytest.raises(InvalidArgumentError, match="parameter 0 of group 0 is a DTensor .*use torch.optim.AdamW"):
        PagedAdamW([w]).step()


# ---------------------------------------------------------------------------- 8-bit


def test_8bit_states_are_blockwise_codes_with_a_32bit_fallback_for_small_params():
    ps = _params()
    opt = PagedAdamW8bit(ps, lr=1e-2)
    _run(opt, ps, range(1))
    big = opt.state[ps[2]]  # 5120 elements
    assert big["exp_avg_q"].dtype == torch.uint8 and big["exp_avg_q"].shape == ps[2].shape
    assert big["exp_avg_absmax"].shape == (20,) and big["exp_avg_sq_absmax"].shape == (20,)
    small = opt.state[ps[0]]  # 703 elements < min_8bit_size
    assert set(small) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state_nbytes()["host"] > 0 and opt.state_nbytes()["managed"] == 0
    everything = PagedAdamW8bit(_clone(ps), min_8bit_size=0)
    _run(everything, everything.param_groups[0]["params"], range(1))
    assert all("exp_avg_q" in st for st in everything.state.values())


def _regression(cls, steps: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    y = x @ (torch.randn(64, 64, generator=g) / 8) + 0.01 * torch.randn(256, 64, generator=g)
    w = torch.zeros(64, 64, requires_grad=True)  # 4096 elements: 8-bit states
    b = torch.zeros(64, requires_grad=True)
    opt = cls([w, b], lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        loss = ((x @ w + b - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses), w.detach()


def test_8bit_stays_close_to_32bit_over_200_steps():
    """Stated error: on this regression problem the 8-bit optimizer's loss stays within 10% of
    the 32-bit one at every step (measured: at most 6.6% over 4 seeds, in the early steps), the
    final loss within 0.1% (measured 0.03%), the final weights within 1e-3 relative (measured 1.2e-4)."""
    l32, w32 = _regression(PagedAdamW)
    l8, w8 = _regression(PagedAdamW8bit)
    assert l32[-1] < 1e-3 * l32[0]  # the problem is actually solved
    rel = (l8 - l32).abs() / l32
    assert rel.max() < 0.10, rel.max()
    assert rel[-1] < 1e-3, rel[-1]
    assert ((w8 - w32).norm() / w32.norm()) < 1e-3


def test_8bit_nonfinite_gradient_names_the_parameter():
    ps = _params()
    opt = PagedAdamW8bit(ps)
    _run(opt, ps, range(1))
    for p in ps:
        p.grad = torch.zeros_like(p)
    ps[2].grad[3, 7] = float("nan")
    expected = "state exp_avg of parameter 2 in group 0 (shape [64, 80]) became non-finite (first at flat index 247)"
    with pytest.raises(NonFiniteError, match=re.escape(expected)):
        opt.step()


def test_torch_codec_equals_the_core_on_cpu():
    """The CUDA path's torch encoder, run on the CPU, gives the core's bytes exactly."""
    g = torch.Generator().manual_seed(0)
    n = 3 * 256 + 77  # a partial last block
    cases = [
        torch.randn(n, generator=g),
        torch.randn(n, generator=g) * 1e-30,
        torch.randn(n, generator=g) * 1e-40,  # subnormal: the reciprocal of absmax is infinite
        torch.rand(n, generator=g) ** 8,  # many tiny values next to large ones
        torch.cat([torch.zeros(256), torch.randn(n - 256, generator=g)]),  # an all-zero block
        torch.linspace(-1, 1, n),
    ]
    for codec in (SIGNED, UNSIGNED):
        for x in cases:
            x = x.abs() if codec is UNSIGNED else x
            q_core, a_core = quantize_blockwise_8bit(x, codec.map, 256)
            q = torch.empty(n, dtype=torch.uint8)
            a = torch.empty(4, dtype=torch.float32)
            codec._quantize_torch(x, q, a)
            assert torch.equal(a, a_core)
            assert torch.equal(q, q_core), (codec.signed, (q != q_core).nonzero()[:5])
            ref = dequantize_blockwise_8bit(q_core, a_core, codec.map, 256)
            assert torch.equal(codec._dequantize_torch(q, a), ref)


def test_codec_zero_codes_decode_to_zero():
    for codec in (SIGNED, UNSIGNED):
        q = torch.full((300,), codec.zero_code, dtype=torch.uint8)
        out = codec.dequantize(q, torch.zeros(2))
        assert torch.equal(out, torch.zeros(300))  # (-0.0 counts: the core may store a negative entry)


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_state_dict_round_trip_resumes_with_identical_steps(cls):
    ps = _params()
    opt = cls(ps, lr=1e-2, weight_decay=0.05)
    _run(opt, ps, range(5))
    saved_params = [p.detach().clone() for p in ps]
    sd = opt.state_dict()
    _run(opt, ps, range(5, 10))

    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = cls(resumed, lr=0.5)  # hyperparameters come from the state dict
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 1e-2
    _run(opt2, resumed, range(5, 10))
    for a, b in zip(ps, resumed):
        assert torch.equal(a, b)
    assert opt2.state[resumed[0]]["step"].item() == 10


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_state_dict_holds_host_copies(cls):
    ps = _params()
    opt = cls(ps)
    _run(opt, ps, range(2))
    sd = opt.state_dict()
    before = {k: {n: v.clone() for n, v in st.items()} for k, st in sd["state"].items()}
    _run(opt, ps, range(2, 4))
    for k, st in sd["state"].items():
        for name, v in st.items():
            assert v.device.type == "cpu"
            assert torch.equal(v, before[k][name]), name  # not a view of the live state


def test_paged_adamw_state_dict_loads_into_torch_adamw_and_back():
    ps = _params()
    opt = PagedAdamW(ps, lr=1e-2)
    _run(opt, ps, range(3))
    sd = opt.state_dict()
    theirs, ours = _clone(ps), _clone(ps)
    ref = torch.optim.AdamW(theirs, foreach=False)
    ref.load_state_dict(sd)
    mine = PagedAdamW(ours)
    mine.load_state_dict(sd)
    _run(ref, theirs, range(3, 6))
    _run(mine, ours, range(3, 6))
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # And torch's own state dict loads into PagedAdamW.
    again = _clone(theirs)
    opt_c = PagedAdamW(again)
    opt_c.load_state_dict(ref.state_dict())
    assert opt_c.state[again[1]]["step"].item() == 6
    assert torch.equal(opt_c.state[again[1]]["exp_avg"], ref.state[theirs[1]]["exp_avg"])


def test_state_converts_between_32bit_and_8bit():
    ps = _params()
    opt32 = PagedAdamW(ps)
    _run(opt32, ps, range(3))
    sd32 = opt32.state_dict()
    opt8 = PagedAdamW8bit(_clone(ps))
    opt8.load_state_dict(sd32)
    p8 = opt8.param_groups[0]["params"][2]
    st = opt8.state[p8]
    m = SIGNED.dequantize(st["exp_avg_q"], st["exp_avg_absmax"])
    ref = sd32["state"][2]["exp_avg"]
    assert (m - ref).abs().max() <= 0.02 * ref.abs().max()
    back = PagedAdamW(_clone(ps))
    back.load_state_dict(opt8.state_dict())
    assert torch.equal(back.state[back.param_groups[0]["params"][2]]["exp_avg"], m)


def test_load_state_dict_errors_name_the_parameter():
    ps = _params()
    opt = PagedAdamW(ps)
    _run(opt, ps, range(1))
    sd = opt.state_dict()
    bad = {**sd, "state": {**sd["state"], 1: {**sd["state"][1], "exp_avg": torch.zeros(7)}}}
    expected = "parameter 1 of group 0 (shape [300]): saved exp_avg is [7], expected shape [300]"
    with pytest.raises(InvalidArgumentError, match=re.escape(expected)):
        PagedAdamW(_clone(ps)).load_state_dict(bad)
    bad = {**sd, "state": {**sd["state"], 0: {"step": torch.tensor(1.0), "momentum_buffer": torch.zeros(1)}}}
    with pytest.raises(InvalidArgumentError, match=r"parameter 0 of group 0 .*expected \['exp_avg', 'exp_avg_sq'\]"):
        PagedAdamW(_clone(ps)).load_state_dict(bad)


# ---------------------------------------------------------------------------- paging calls on CPU


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_paging_calls_are_no_ops_on_cpu_with_identical_results(cls):
    plain, paged_out = _params(), _params()
    opt_a = cls(plain, lr=1e-2)
    opt_b = cls(paged_out, lr=1e-2, page_out_after_step=True)
    before = paging.stats()
    for s in range(4):
        _run(opt_a, plain, range(s, s + 1))
        opt_b.page_in()
        _run(opt_b, paged_out, range(s, s + 1))
        opt_b.page_out()
    for a, b in zip(plain, paged_out):
        assert torch.equal(a, b)
    assert paging.stats() == before  # nothing managed was touched
    assert paging.page_out(plain) == 0 and paging.page_in(plain) == 0


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_cuda_states_are_managed_and_match_unpaged(cls):
    a = [p.detach().cuda().requires_grad_() for p in _params()]
    b = [p.detach().cuda().requires_grad_() for p in _params()]
    opt_a = cls(a, lr=1e-2)
    opt_b = cls(b, lr=1e-2, paged=False)
    start = paging.stats()
    for s in range(5):
        for pa, pb, g in zip(a, b, _grads(s, a)):
            pa.grad, pb.grad = g.cuda(), g.cuda()
        opt_a.step()
        opt_a.page_out()
        opt_b.step()
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    stats = paging.stats()
    assert opt_a.state_nbytes()["managed"] > 0 and opt_b.state_nbytes()["managed"] == 0
    assert stats["bytes_allocated"] >= start["bytes_allocated"] + opt_a.state_nbytes()["managed"]
    assert stats["prefetches_to_host"] >= start["prefetches_to_host"] + 5


@pytest.mark.gpu
def test_cuda_torch_codec_equals_the_core():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5 * 256 + 3, generator=g)
    for codec, v in ((SIGNED, x), (UNSIGNED, x.abs())):
        q_core, a_core = quantize_blockwise_8bit(v, codec.map, 256)
        q = torch.empty(v.numel(), dtype=torch.uint8, device="cuda")
        a = torch.empty(6, device="cuda")
        codec.quantize_into(v.cuda(), q, a)
        assert torch.equal(q.cpu(), q_core) and torch.equal(a.cpu(), a_core)
        assert torch.equal(codec.dequantize(q, a).cpu(), dequantize_blockwise_8bit(q_core, a_core, codec.map, 256))


@pytest.mark.gpu
def test_cuda_paged_adamw_matches_torch_adamw():
    ref = [p.detach().cuda().requires_grad_() for p in _params()]
    ours = [p.detach().cuda().requires_grad_() for p in _params()]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    opt = PagedAdamW(ours, lr=1e-2, page_out_after_step=True)
    for s in range(10):
        for pr, po, g in zip(ref, ours, _grads(s, ref)):
            pr.grad, po.grad = g.cuda(), g.cuda()
        opt_ref.step()
        opt.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
