use half::bf16;
use qlora_rs::quant4::{num_blocks, packed_len};
use qlora_rs::{dequantize_4bit, quantize_4bit, FloatSlice, FloatSliceMut, QuantType};
use std::time::Instant;
fn main() {
    let n = 4096 * 4096;
    let w: Vec<bf16> = (0..n).map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 500.0 - 1.0)).collect();
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; num_blocks(n, 64)];
    let mut out = vec![bf16::ZERO; n];
    for _ in 0..3 {
        let t = Instant::now();
        quantize_4bit(FloatSlice::BF16(&w), QuantType::Nf4, 64, false, &mut packed, &mut absmax).unwrap();
        let q = t.elapsed().as_secs_f64();
        let t = Instant::now();
        dequantize_4bit(&packed, &absmax, QuantType::Nf4, 64, FloatSliceMut::BF16(&mut out)).unwrap();
        let d = t.elapsed().as_secs_f64();
        println!("quant {:.0} Mparam/s  dequant {:.0} Mparam/s", n as f64 / q / 1e6, n as f64 / d / 1e6);
    }
}
