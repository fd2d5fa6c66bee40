//! Criterion benchmarks of the core on a 4096x4096 bf16 weight: quantize (NF4, NF4 + double
//! quant), dequantize to bf16. `cargo bench --bench core`; Python-side comparisons against
//! bitsandbytes and torchao are in benches/quantize_bench.py.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use qlora_rs::quant4::{num_blocks, packed_len};
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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
