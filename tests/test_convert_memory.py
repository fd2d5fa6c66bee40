"""Peak memory of a conversion is bounded by about the largest tensor, not by the model: a
768 MiB checkpoint of 64 MiB tensors converts in a process whose resident set grows by less
than two tensors' worth."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from _convert_helpers import read_header, write_synthetic_checkpoint

MIB = 1 << 20

CHILD = textwrap.dedent(
    """
    import json, sys
    import qlora_rs

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    src, dst = sys.argv[1], sys.argv[2]
    base = status("VmRSS")
    # Reset the peak (VmHWM) to the current resident set, so imports do not count.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    summary = qlora_rs.convert_checkpoint(src, dst, sync=False)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "bytes_in": summary.bytes_in,
                      "quantized": summary.tensors_quantized}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_is_bounded_by_the_largest_tensor(tmp_path):
    tensor_bytes = 64 * MIB
    names = [(f"model.layers.{i}.mlp.up_proj.weight", (4096, 8192)) for i in range(12)]
    src = tmp_path / "big.safetensors"
    size = write_synthetic_checkpoint(src, names)
    assert size > 12 * tensor_bytes

    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["quantized"] == 12 and m["bytes_in"] == 12 * tensor_bytes
    grew = m["peak"] - m["base"]
    # One window (the largest tensor, mapped) plus its 4-bit output (~0.3x) and buffers.
    bound = int(1.5 * tensor_bytes) + 48 * MIB
    print(f"peak RSS grew by {grew / MIB:.0f} MiB converting {size / MIB:.0f} MiB (bound {bound / MIB:.0f} MiB)")
    assert grew < bound, f"peak RSS grew by {grew / MIB:.0f} MiB (bound {bound / MIB:.0f} MiB)"

    # The output is complete: every tensor and its quantization state are there.
    header, _ = read_header(tmp_path / "out" / "model.safetensors")
    assert header["model.layers.7.mlp.up_proj.weight"]["shape"] == [4096 * 8192 // 2, 1]
    assert len([k for k in header if k.endswith("bitsandbytes__nf4")]) == 12
