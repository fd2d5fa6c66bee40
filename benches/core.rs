//! Criterion benchmarks of the core on a 4096x4096 bf16 weight: quantize (NF4, NF4 + double
//! quant), dequantize to bf16 (on each instruction-set level this CPU runs), and the fused 4-bit
//! matmul for 1, 4 and 16 activation rows. `cargo bench --bench core`; Python-side comparisons
//! against bitsandbytes, torchao and torch's bf16 matmul are in benches/quantize_bench.py and
//! benches/cpu_matmul_bench.py.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use qlora_rs::cpu_isa::Isa;
use qlora_rs::matmul4::{gemm_4bit, Weight4};
use qlora_rs::quant4::{dequantize_4bit_with, num_blocks, packed_len, BlockScales};
use qlora_rs::{blockwise8, dequantize_4bit, quantize_4bit, FloatSlice, FloatSliceMut, QuantType};

fn weights(n: usize) -> Vec<bf16> {
    // A cheap deterministic pseudo-normal sequence (sum of uniforms).
    let mut state = 0x2545F4914F6CDD1Du64;
    (0..n)
        .map(|_| {
            let mut s = 0f32;
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s += (state >> 40) as f32 / (1u64 << 24) as f32;
            }
            bf16::from_f32((s - 2.0) * 0.02)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let n = 4096 * 4096;
    let bs = 64;
    let w = weights(n);
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; num_blocks(n, bs)];
    let mut g = c.benchmark_group("4096x4096 bf16");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(10);
    g.bench_function("quantize nf4", |b| {
        b.iter(|| quantize_4bit(FloatSlice::BF16(&w), QuantType::Nf4, bs, false, &mut packed, &mut absmax).unwrap())
    });
    let mut q = vec![0u8; absmax.len()];
    let mut nested = vec![0f32; blockwise8::nested_blocks(absmax.len())];
    g.bench_function("quantize nf4 + double quant", |b| {
        b.iter(|| {
            quantize_4bit(FloatSlice::BF16(&w), QuantType::Nf4, bs, false, &mut packed, &mut absmax).unwrap();
            blockwise8::double_quantize(&absmax, &mut q, &mut nested).unwrap()
        })
    });
    let mut out = vec![bf16::ZERO; n];
    g.bench_function("dequantize nf4 -> bf16", |b| {
        b.iter(|| dequantize_4bit(&packed, &absmax, QuantType::Nf4, bs, FloatSliceMut::BF16(&mut out)).unwrap())
    });
    for isa in Isa::available() {
        g.bench_function(format!("dequantize nf4 + double quant -> bf16, {}", isa.name()), |b| {
            let map = blockwise8::signed_dynamic_map();
            let scales = BlockScales::Double { codes: &q, nested_absmax: &nested, nested_map: &map, offset: 0.0 };
            b.iter(|| dequantize_4bit_with(&packed, scales, QuantType::Nf4, bs, FloatSliceMut::BF16(&mut out), isa).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("gemm 4096x4096 nf4 + double quant, bf16");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    let map = blockwise8::signed_dynamic_map();
    let weight = Weight4 {
        packed: &packed,
        scales: BlockScales::Double { codes: &q, nested_absmax: &nested, nested_map: &map, offset: 0.0 },
        quant_type: QuantType::Nf4,
        blocksize: bs,
        rows: 4096,
        cols: 4096,
    };
    for m in [1, 4, 16] {
        let x = &w[..m * 4096];
        let mut y = vec![bf16::ZERO; m * 4096];
        g.bench_function(format!("M={m}"), |b| {
            b.iter(|| gemm_4bit(FloatSlice::BF16(x), m, &weight, FloatSliceMut::BF16(&mut y), Isa::current().unwrap()).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
