# Type stubs for the Rust core (rust/python/*.rs). tests/test_stubs.py checks that every name and
# parameter list here matches the compiled module.
#
# The CPU functions take tensors (`_Tensor`): a torch tensor, numpy array or anything else with
# `__dlpack__`, or a DLPack capsule (`torch.utils.dlpack.to_dlpack(t)`, which they consume). Rust
# checks device, dtype, contiguity, length and that no output shares memory with another argument,
# and raises InvalidArgumentError naming the argument. Only the cuda_* launches and the paging
# functions take raw addresses (`*_ptr: int`): CUDA device or managed memory used on a stream.
# All of it is private; use the torch-facing API.

from collections.abc import Callable
from os import PathLike
from typing import Any, Final

__version__: Final[str]

BLOCKSIZES: Final[list[int]]
NESTED_BLOCKSIZE: Final[int]
PAGING_HOST: Final[int]
CUDA_KERNELS_COMPILED: Final[bool]
CUDA_HOW_TO_BUILD: Final[str]
CUDA_FUSED_GEMM_MAX_M: Final[int]
CUDA_SIMT_GEMM_MAX_M: Final[int]
CUDA_GEMV_MAX_M: Final[int]

_Path = str | PathLike[str]
# A tensor passed through DLPack: an object with `__dlpack__`, or a "dltensor" capsule.
_Tensor = Any
# progress(bytes_done, bytes_total, tensors_done, tensors_total, tensor_name); raising cancels.
_Progress = Callable[[int, int, int, int, str], object] | None

def build_info() -> dict[str, Any]:
    """Build facts: version, whether CUDA kernels are compiled in, thread count."""

# -- 4-bit and 8-bit blockwise quantization (host memory) ------------------------------------------

def quantize_4bit(
    input: _Tensor, quant_type: str, blocksize: int, allow_nonfinite: bool, packed: _Tensor, absmax: _Tensor
) -> None:
    """Quantize the float32/float16/bfloat16 tensor `input` to 4 bits: writes (n+1)//2 bytes into
    `packed` (uint8) and ceil(n/blocksize) float32 into `absmax`."""

def dequantize_4bit(packed: _Tensor, absmax: _Tensor, quant_type: str, blocksize: int, out: _Tensor) -> None:
    """Dequantize `out.numel()` elements from `packed` (uint8) and `absmax` (float32) into `out`
    (float32, float16 or bfloat16)."""

def quantize_blockwise_8bit(input: _Tensor, map: list[float], blocksize: int, out: _Tensor, absmax: _Tensor) -> None:
    """Blockwise 8-bit quantization of the float32 tensor `input` with a 256-entry sorted map:
    one uint8 code per value into `out`, ceil(n/blocksize) float32 into `absmax`."""

def dequantize_blockwise_8bit(q: _Tensor, absmax: _Tensor, map: list[float], blocksize: int, out: _Tensor) -> None:
    """Inverse of `quantize_blockwise_8bit`: `q` (uint8) and `absmax` (float32) into the float32 `out`."""

def double_quantize(
    absmax: _Tensor, q: _Tensor, nested: _Tensor, offset: float | None = None, threads: int | None = None
) -> float:
    """Double-quantize the float32 block scales `absmax` into `q` (uint8 per block) and `nested`
    (float32 per 256 blocks) around `offset` (default: their mean summed in torch's order with
    `threads` threads); returns the offset."""

def double_dequantize(q: _Tensor, nested: _Tensor, offset: float, map: list[float], out: _Tensor) -> None:
    """Inverse of `double_quantize` with the given nested map, into the float32 `out`."""

def code_table(quant_type: str) -> list[float]:
    """The 16 decode values of a 4-bit type ("nf4", "fp4", "int4"), index = nibble."""

def dynamic_map(signed: bool) -> list[float]:
    """The 8-bit dynamic map: signed (as stored for double quant) or unsigned."""

def check_blocksize(blocksize: int) -> None:
    """Validates a block size, raising the error that lists the supported ones."""

# -- CPU kernels over packed 4-bit weights (host memory; rust/matmul4) -------------------------------

class PackedWeight4:
    """A packed 4-bit weight of `rows` x `cols` on the CPU, its tensors checked once and held:
    `packed` uint8, `absmax` float32 per block, or uint8 codes with `nested_absmax` (float32 per
    256 blocks) and `nested_code` (256 float32)."""

    def __new__(
        cls,
        packed: _Tensor,
        absmax: _Tensor,
        nested_absmax: _Tensor | None,
        nested_code: _Tensor | None,
        offset: float,
        quant_type: str,
        blocksize: int,
        rows: int,
        cols: int,
    ) -> PackedWeight4: ...
    @property
    def rows(self) -> int: ...
    @property
    def cols(self) -> int: ...

def cpu_gemm_4bit(weight: PackedWeight4, x: _Tensor, out: _Tensor, isa: str | None = None) -> None:
    """Fused out[m, n] = x[m, k] @ dequant(W[n, k])^T on the CPU, never decoding W to memory; x
    (float32, float16 or bfloat16) and out of the same dtype. `isa`: a level from `cpu_isas()`
    (default: `cpu_isa()`)."""

def cpu_gemm_4bit_group(weights: list[PackedWeight4], x: _Tensor, outs: list[_Tensor], isa: str | None = None) -> None:
    """The products of one x with several weights of the same in_features in one call:
    outs[i] = x @ dequant(weights[i])^T, each what cpu_gemm_4bit gives, with x converted once and
    the rows of all the weights shared among the threads."""

def cpu_gated_mlp_4bit(gate: PackedWeight4, up: PackedWeight4, down: PackedWeight4, x: _Tensor, out: _Tensor,
                       isa: str | None = None, adapters: list[LoraAdapter | None] | None = None,
                       activation: str = "silu") -> None:
    """out = down(act(gate(x)) * up(x)) in one call, rounded as PyTorch computes transformers'
    LlamaMLP (activation "silu") or GemmaMLP ("gelu_tanh") in x's dtype. adapters: None, or per
    projection (gate, up, down) None or a LoraAdapter whose share is added as cpu_lora_add adds it."""

def cpu_decoder_tail(attended: _Tensor, o: PackedWeight4, o_bias: _Tensor | None, o_adapter: LoraAdapter | None,
                     residual: _Tensor, norm_weight: _Tensor, eps: float, unit_offset: bool, gate: PackedWeight4,
                     up: PackedWeight4, down: PackedWeight4, mlp_adapters: list[LoraAdapter | None] | None,
                     activation: str, out: _Tensor, isa: str | None = None,
                     post_norms: tuple[_Tensor, _Tensor] | None = None) -> None:
    """What follows the attention in a decoder layer of Llama's form, in one call: out = h +
    mlp(norm(h)) with h = residual + o_proj(attended), each step rounded as PyTorch rounds the
    layer's forward. attended [m, o.cols], residual and out [m, o.rows], norm_weight [o.rows], one
    float dtype; o_bias (any float dtype) and o_adapter added to the output projection's product;
    the norm in Gemma's style with unit_offset; the MLP as cpu_gated_mlp_4bit takes it.
    post_norms: Gemma3's form, the weights of the norms of the attention's and of the MLP's
    output (h = residual + norm(o_proj(attended)), out = h + norm(mlp(norm(h))))."""

def cpu_rms_norm(x: _Tensor, weight: _Tensor, eps: float, out: _Tensor, unit_offset: bool = False) -> None:
    """out = weight * (x / sqrt(mean(x^2, -1) + eps)) as transformers' LlamaRMSNorm computes it,
    bit for bit; with unit_offset, (x / sqrt(...)) * (1 + weight) as GemmaRMSNorm computes it
    (float32, rounded once). x, weight and out of one float dtype."""

def cpu_rotary(q: _Tensor, k: _Tensor, cos: _Tensor, sin: _Tensor, batch: int, dim: int, q_out: _Tensor,
               k_out: _Tensor) -> None:
    """Rotary position embeddings of one token a sequence as transformers' apply_rotary_pos_emb
    computes them, bit for bit: q and k [batch, heads, dim], cos and sin [batch, dim]; one float dtype."""

def cpu_attend_one_token(q: _Tensor, k: _Tensor, v: _Tensor, mask: _Tensor | None, scale: float, batch: int,
                         heads: int, kv_heads: int, length: int, dim: int, out: _Tensor) -> None:
    """Attention of one query token per sequence: q and out [batch, heads, dim], k and v
    [batch, kv_heads, length, dim], mask None or float32 [batch, length] added to the scores;
    in float32."""

class LoraAdapter:
    """A LoRA adapter for the CPU kernels, checked once and held: lora_A [rank, in_features] and
    lora_B [out_features, rank] of one float dtype, and its scaling."""

    def __new__(cls, lora_a: _Tensor, lora_b: _Tensor, in_features: int, scaling: float) -> LoraAdapter: ...
    @property
    def rank(self) -> int: ...

def cpu_lora_add(adapter: LoraAdapter, x: _Tensor, y: _Tensor) -> None:
    """y += (lora_B @ (lora_A @ x)) * scaling in place, rounded as LoRA's ops round (x, both
    products and the scaled share to the adapters' dtype, the share to y's, the sum): x
    [rows, in_features] and y [rows, out_features] of any float dtype; summed in float32."""

def cpu_dequantize_4bit(weight: PackedWeight4, out: _Tensor, isa: str | None = None, fresh: bool = False) -> None:
    """Decodes the weight into `out` (float32, float16 or bfloat16) on the CPU, decoding
    double-quantized scales chunk by chunk. `isa`: a level from `cpu_isas()` (default: `cpu_isa()`).
    `fresh`: out was just allocated (written through the cache; else outputs of 16 MiB and more
    are streamed past it)."""

def cpu_isa() -> str:
    """The instruction-set level the CPU kernels use in this process: the widest this CPU runs,
    capped by the environment variable QLORA_RS_CPU_ISA (read once)."""

def cpu_isas() -> list[str]:
    """The instruction-set levels this CPU runs, widest first ("avx512bf16", "avx512", "avx2",
    "portable"); each can be passed as `isa` to the cpu_* kernels."""

def cpu_bf16_products() -> bool:
    """Whether bfloat16 activations at the "avx512bf16" level multiply the weight rounded to
    bfloat16 (`vdpbf16ps`) rather than the float32 weight: by default on CPUs without AMX;
    QLORA_RS_BF16_PRODUCTS=1 or 0 decides instead (read once)."""

def set_cpu_emulator(emulator: Callable[[str, int, int], None] | None) -> Callable[[str, int, int], None] | None:
    """Installs `emulator` for this thread and returns the one it replaces. The cpu_* kernels then
    run a level this CPU lacks by calling `emulator(isa, entry, job)`, which must run the machine
    code at address `entry` with `job` as its one argument (System V ABI) on an emulated CPU with
    the level, over this process's memory, and return when that call returns (one thread; no
    system calls but memory allocation's). For the tests (tests/emulated_cpu.py). None uninstalls."""

# -- calibrated 4-bit quantization (rust/calibrate; qlora_rs.io.calibrate is the Python API) -------------

def hessian_factor(h: _Tensor, n: int, relative_damp: float, u: _Tensor) -> dict[str, Any]:
    """Factors the damped Hessian: reads `h` (float64 n x n), writes `u` (float32 n x n, upper
    triangular, `Uᵀ U = (H + λI)⁻¹`). Returns `{"damp", "dead_columns", "damp_raised"}`."""

def calibrate_4bit(
    w: _Tensor,
    rows: int,
    cols: int,
    u: _Tensor,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    fixed_scales: bool,
    packed: _Tensor,
    absmax: _Tensor,
    nested: _Tensor,
) -> dict[str, Any]:
    """Quantizes the float32 `[rows, cols]` weight `w` with the column sweep against the factor
    `u` (float32 cols x cols). Writes the packed codes ((n+1)//2 uint8) into `packed` and the
    scales into `absmax`: float32 per block, or with `double_quant` uint8 per block plus float32
    per 256 blocks into `nested`. Returns `{"offset", "sweep_scales", "loss", "negative_scales"}`."""

def convert_calibrated(
    src: _Path,
    dst: _Path | None,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    compute_dtype: str,
    include: list[str],
    exclude: list[str],
    threads: int | None,
    force: bool,
    allow_nonfinite: bool,
    sync: bool,
    weights: dict[str, tuple[_Tensor, _Tensor, _Tensor, float | None]],
    config_extra: str,
    progress: _Progress = None,
    dtype: str | None = None,
    add_files: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """`convert_checkpoint` with some weights computed beforehand (`weights`: tensor name ->
    `(packed, absmax, nested_absmax, offset)`, tensors whose bytes are copied) and
    `config_extra` (a JSON object) merged into the output config.json."""

# -- checkpoint conversion ---------------------------------------------------------------------------

def convert_checkpoint(
    src: _Path,
    dst: _Path | None,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    compute_dtype: str,
    include: list[str],
    exclude: list[str],
    threads: int | None,
    force: bool,
    allow_nonfinite: bool,
    sync: bool,
    progress: _Progress = None,
    dtype: str | None = None,
    dequantize_only: bool = False,
    add_files: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Converts a safetensors checkpoint or a GGUF model to bitsandbytes 4-bit (or, for a GGUF with
    `dequantize_only`, to floats); returns the summary as a dict. `add_files(staging_dir)` is called
    before a directory output is renamed into place, to add files to it."""

def plan_checkpoint(
    src: _Path,
    dst: _Path | None,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    compute_dtype: str,
    include: list[str],
    exclude: list[str],
    threads: int | None,
    force: bool,
    allow_nonfinite: bool,
    sync: bool,
    dtype: str | None = None,
    dequantize_only: bool = False,
) -> dict[str, Any]:
    """The plan of a conversion (what `--dry-run` prints); reads headers only, writes nothing."""

def safetensors_header(path: _Path) -> dict[str, Any]:
    """The validated header of a safetensors file: ``data_start``, ``metadata``, ``tensors`` (in data
    order: ``name``, ``dtype``, ``shape``, ``begin``/``end`` relative to the data section)."""

def inspect_checkpoint(path: _Path) -> list[dict[str, Any]]:
    """Per-tensor rows of a checkpoint (4-bit weights grouped with their quantization state)."""

def compare_checkpoints(dst: _Path, src: _Path, progress: _Progress = None) -> list[dict[str, Any]]:
    """Decodes the 4-bit weights of `dst` and compares them with `src` (sums for SQNR and cosine)."""

def default_destination(src: _Path, quant_type: str) -> str:
    """The default output path for a source (`<dir>-nf4`, `<stem>-nf4`)."""

def python_float_repr(x: float) -> str:
    """`json.dumps(float(x))` as the converter writes it into quantization state (for tests)."""

def gguf_header(path: _Path) -> dict[str, Any]:
    """The header of a GGUF file: version, alignment, metadata (key -> value, in file order) and the
    tensors (name, torch-order shape, ggml type, transformers name, bytes, file offset). Reads no
    tensor data."""

def gguf_tensor(path: _Path, name: str, dtype: str) -> tuple[bytes, list[int]]:
    """One tensor of a GGUF model, named as transformers names it, decoded to `dtype` as transformers
    loads it: (little-endian bytes, shape)."""

# -- unified-memory page manager --------------------------------------------------------------------

class ManagedAllocation:
    """One managed (unified-memory) allocation of `nbytes` bytes for CUDA device `device`, freed
    when the last reference (including a torch tensor viewing it) goes away."""

    def __new__(cls, nbytes: int, device: int = 0) -> ManagedAllocation: ...
    @property
    def ptr(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...
    def prefetch(self, device: int, stream: int = 0, offset: int = 0, nbytes: int | None = None) -> bool:
        """Prefetches `[offset, offset + nbytes)` to `device` (PAGING_HOST: the host) on a raw stream;
        returns whether a prefetch was issued."""
    def advise_accessed_by(self, device: int) -> bool: ...
    def advise_preferred_location(self, device: int) -> bool: ...

def managed_prefetch(ptr: int, nbytes: int, device: int, stream: int = 0) -> bool:
    """Prefetches a range inside a live managed allocation to `device` (-1: the host)."""

def paging_stats() -> dict[str, int]:
    """The process-wide paging statistics as a dict."""

def paging_reset_peak() -> None:
    """Sets the peak of `bytes_allocated` to its current value."""

def paging_check_request(requested: int, free: int, total: int, live_managed: int = 0) -> None:
    """The refusal rule: raises OutOfMemoryError unless
    `requested + live_managed + paging_safety_margin(total) <= free`."""

def paging_safety_margin(total: int) -> int:
    """Bytes kept free on a device of `total` bytes: max(256 MiB, total / 32)."""

def paging_driver_check() -> None:
    """Raises CudaUnavailableError unless the CUDA driver is present, recent enough and sees a device."""

def paging_device_info(device: int) -> dict[str, Any]:
    """Paging facts of a device: managed_memory, concurrent_managed_access, free, total, driver_version."""

# -- CUDA kernels (device pointers, raw CUstream handles) --------------------------------------------

def cuda_dequantize_4bit(
    device: int,
    stream: int,
    packed_ptr: int,
    absmax_ptr: int,
    nested_absmax_ptr: int | None,
    nested_code_ptr: int | None,
    offset: float,
    n: int,
    quant_type: str,
    blocksize: int,
    out_ptr: int,
    out_dtype: str,
) -> None:
    """Dequantize n elements on CUDA device `device`, on stream `stream` (0 = default)."""

def cuda_gemm_4bit(
    device: int,
    stream: int,
    x_ptr: int,
    m: int,
    n: int,
    k: int,
    dtype: str,
    packed_ptr: int,
    absmax_ptr: int,
    nested_absmax_ptr: int | None,
    nested_code_ptr: int | None,
    offset: float,
    quant_type: str,
    blocksize: int,
    out_ptr: int,
    kernel: str = "mma",
    warps: int = 8,
) -> None:
    """Fused out[m, n] = x[m, k] @ dequant(W[n, k])^T; `kernel` "gemv" (m <= 8; `warps` 8, 16 or 32),
    "mma" (m <= 16; `warps` 1, 2, 4, 8 or 16) or "simt" (m <= 4)."""

def cuda_check_device(device: int) -> None:
    """Raises CudaUnavailableError/CudaError when kernels cannot run on `device`."""

def cuda_fatbin_targets() -> list[str]:
    """The code objects in the embedded fatbin ("sm_80", ..., "compute_90"); empty without kernels."""
