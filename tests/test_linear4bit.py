"""qlora_rs.Linear4bit: forward/backward against the dense reference, what the backward saves,
bitsandbytes-identical state dicts both ways, dtype/device moves, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qlora_rs
from _lora_helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from qlora_rs import InvalidArgumentError, Linear4bit

bnb = pytest.importorskip("bitsandbytes")


def _linear(out_f=48, in_f=64, bias=True, dtype=torch.bfloat16, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _bnb_layer(linear: nn.Linear, quant_type: str, double_quant: bool):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type=quant_type, compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)._quantize("cpu")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone())
    return layer


def test_forward_matches_dense_reference_and_returns_input_dtype():
    lin = _linear()
    q = Linear4bit.from_linear(lin)
    w = q.dequantize(torch.bfloat16)
    x = torch.randn(2, 5, 64)
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 48)
    ref = (x.bfloat16().float() @ w.float().T + lin.bias.float()).bfloat16().float()
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_backward_gives_input_and_bias_gradients():
    lin = _linear(dtype=torch.float32)
    q = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    w = q.dequantize(torch.float32)
    x = torch.randn(6, 64, requires_grad=True)
    g = torch.randn(6, 48)
    (q(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, g.sum(0), rtol=1e-5, atol=1e-5)
    assert q.weight.grad is None and not q.weight.requires_grad


def test_backward_saves_only_the_packed_weight():
    q = Linear4bit.from_linear(_linear(out_f=64, in_f=96))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 96, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert saved, "the backward saved nothing: the hook did not see the function"
    for t in saved:
        assert not (t.is_floating_point() and t.numel() >= 64 * 96), f"saved a dense {t.dtype} {list(t.shape)}"
    assert any(t.dtype == torch.uint8 and t.numel() == 64 * 96 // 2 for t in saved)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_is_bitsandbytes_state_dict(quant_type, double_quant, bias):
    lin = _linear(bias=bias)
    ours = Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=double_quant).state_dict()
    theirs = _bnb_layer(lin, quant_type, double_quant).state_dict()
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert torch.equal(ours[k], v), k


def test_load_state_dict_restores_from_bitsandbytes():
    lin = _linear()
    b = _bnb_layer(lin, "nf4", True)
    ours = Linear4bit(64, 48, double_quant=False, device="meta")  # other options: the state dict decides
    ours.load_state_dict(b.state_dict(), assign=True)
    assert ours.double_quant and ours.weight.device.type == "cpu"
    ref = Linear4bit.from_linear(lin)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(ours(x), ref(x))
    assert torch.equal(ours.dequantize(), bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state))


def test_load_state_dict_round_trip_and_float_weights():
    q = Linear4bit.from_linear(_linear(), quant_type="fp4", blocksize=128)
    fresh = Linear4bit(64, 48)
    fresh.load_state_dict(q.state_dict())
    assert (fresh.quant_type, fresh.blocksize) == ("fp4", 128)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x))
    # loading keeps the Parameter object and never aliases the source's tensors
    weight, absmax = fresh.weight, fresh.weight_absmax
    sd = q.state_dict()
    fresh.load_state_dict(sd)
    assert fresh.weight is weight and fresh.weight_absmax is absmax
    sd["weight"].zero_()
    sd["weight.absmax"].zero_()
    assert torch.equal(fresh(x), Linear4bit.from_linear(_linear(), quant_type="fp4", blocksize=128)(x))
    lin = _linear(seed=1)
    from_float = Linear4bit(64, 48)
    from_float.load_state_dict(lin.state_dict())  # an nn.Linear state dict is quantized on load
    assert torch.equal(from_float(x), Linear4bit.from_linear(lin)(x))


def test_load_state_dict_reports_missing_unexpected_and_bad_shapes():
    q = Linear4bit(64, 48)
    sd = Linear4bit.from_linear(_linear()).state_dict()
    del sd["bias"]
    sd["extra"] = torch.zeros(1)
    result = q.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["extra"]
    other = Linear4bit.from_linear(_linear(out_f=32)).state_dict()
    with pytest.raises(RuntimeError, match=r"field 'shape' says a quantized \[32, 64\] weight; this layer is \[48, 64\]"):
        q.load_state_dict(other)


def test_dtype_moves_keep_the_quantization_state():
    q = Linear4bit.from_linear(_linear(), double_quant=False)
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = q(x)
    q.half()
    q.to(torch.float32)
    after = q.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert q.bias.dtype == torch.float32
    torch.testing.assert_close(q(x), y, rtol=1e-2, atol=1e-2)


def test_float_quant_storage_survives_casts():
    lin = _linear()
    ref = Linear4bit.from_linear(lin)
    q = Linear4bit.from_linear(lin, quant_storage=torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.weight.shape == (64 * 48 // 4, 1)
    q.to(torch.float32)
    assert q.weight.dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(q(x), ref(x))
    assert torch.equal(q.packed_weight(), ref.weight)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.uint8])
def test_set_quant_storage_views_the_same_bytes(storage):
    q = Linear4bit.from_linear(_linear())
    x = torch.randn(3, 64)
    want_bytes, want_y = q.packed_weight().clone(), q(x)
    assert q.set_quant_storage_(storage) is q
    assert q.weight.dtype == storage and q.quant_storage == storage and not q.weight.requires_grad
    assert q.weight.numel() * q.weight.element_size() == 48 * 64 // 2
    assert torch.equal(q.packed_weight(), want_bytes) and torch.equal(q(x), want_y)
    meta = Linear4bit(64, 48, device="meta").set_quant_storage_(storage)
    assert meta.weight.is_meta and meta.weight.dtype == storage


def test_set_quant_storage_refuses_bytes_that_do_not_divide():
    q = Linear4bit.from_linear(_linear(out_f=3, in_f=2))  # 6 weights -> 3 bytes
    with pytest.raises(InvalidArgumentError, match="3 bytes, which is not a whole number of bfloat16"):
        q.set_quant_storage_(torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="quant_storage torch.int32 is not supported"):
        q.set_quant_storage_(torch.int32)
    assert q.weight.dtype == torch.uint8


def test_meta_construction_and_repr():
    q = Linear4bit(1024, 4096, device="meta")
    assert q.weight.device.type == "meta" and q.weight.shape == (1024 * 4096 // 2, 1)
    y = q(torch.empty(2, 1024, device="meta"))
    assert y.shape == (2, 4096)
    assert "quant_type=nf4, blocksize=64, double_quant=True, compute_dtype=bfloat16" in repr(q)
    assert isinstance(q, nn.Linear)


def test_bad_inputs_name_the_layer():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU())
    qlora_rs.quantize_model(model)
    layer = model[0]
    with pytest.raises(InvalidArgumentError, match=r"Linear4bit '0' .*input dtype int64 is not supported"):
        model(torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match=r"Linear4bit '0' .*input of shape \[2, 63\].*must be 64"):
        model(torch.randn(2, 63))
    with pytest.raises(InvalidArgumentError, match=r"input is on meta but the layer's weight is on cpu"):
        layer(torch.randn(2, 64, device="meta"))
    with pytest.raises(InvalidArgumentError, match=r"weight of shape \[64, 48\] does not fit"):
        layer.quantize_weight_(torch.randn(64, 48))
    with pytest.raises(InvalidArgumentError, match="unsupported quant_type 'nf3'"):
        Linear4bit(64, 48, quant_type="nf3")
    with pytest.raises(InvalidArgumentError, match="blocksize"):
        Linear4bit(64, 48, blocksize=48)


@pytest.mark.gpu
def test_cuda_forward_backward_match_cpu():
    lin = _linear()
    q = Linear4bit.from_linear(lin)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = q(x)
    qc = Linear4bit.from_linear(lin).cuda()
    xc = x.cuda().requires_grad_()
    yc = qc(xc)
    torch.testing.assert_close(yc.cpu().float(), y.float(), rtol=2e-2, atol=2e-2)
    yc.float().sum().backward()
    assert xc.grad.shape == x.shape and torch.isfinite(xc.grad).all()
