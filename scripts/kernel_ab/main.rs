//! A/B of the CPU kernels: the crate at a git revision (`old`) against the working tree (`new`),
//! in one process, each repeat timing both in turn, so that a machine whose speed drifts (shared
//! cores, other tenants: 10-30% from run to run) affects both alike. Built and run by
//! `scripts/kernel-ab.sh`; its usage there.
use std::time::Instant;

use half::bf16;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The largest CPU cache sysfs reports for CPU 0 (the last level), or 32 MiB when it says none.
fn last_level_cache_bytes() -> usize {
    (0..8)
        .map_while(|i| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")).ok())
        .filter_map(|text| {
            let text = text.trim();
            let (digits, unit) = text.split_at(text.trim_end_matches(['K', 'M', 'G']).len());
            let scale = match unit {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                _ => 1,
            };
            digits.parse::<usize>().ok().map(|d| d * scale)
        })
        .max()
        .unwrap_or(32 << 20)
}

/// "1,4,16" -> [1, 4, 16].
fn numbers(list: &str) -> Vec<usize> {
    list.split(',').map(|t| t.trim().parse().expect("a list of numbers")).collect()
}

/// xorshift64: the same inputs for both crates and every run.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn scales(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (self.next() % 1000) as f32 / 1e4 + 0.01).collect()
    }
}

/// Double-quantized scales standing for float32 ones (`DOUBLE=1`): one code per block, one nested
/// scale per 256 blocks, a 256-entry map.
struct Double {
    codes: Vec<u8>,
    nested: Vec<f32>,
    map: [f32; 256],
}

impl Double {
    fn new(noise: &mut Noise, blocks: usize) -> Double {
        let map = std::array::from_fn(|i| i as f32 / 255.0);
        Double { codes: noise.bytes(blocks), nested: noise.scales(blocks.div_ceil(256)), map }
    }
}

macro_rules! scales {
    ($krate:ident, $absmax:expr, $double:expr) => {
        match $double {
            Some(d) => $krate::quant4::BlockScales::Double { codes: &d.codes, nested_absmax: &d.nested, nested_map: &d.map, offset: 0.01 },
            None => $krate::quant4::BlockScales::F32($absmax),
        }
    };
}

macro_rules! gemm {
    ($krate:ident, $packed:expr, $absmax:expr, $double:expr, $rows:expr, $cols:expr, $x:expr, $m:expr, $out:expr) => {{
        let w = $krate::matmul4::Weight4 {
            packed: $packed,
            scales: scales!($krate, $absmax, $double),
            quant_type: $krate::QuantType::Nf4,
            blocksize: 64,
            rows: $rows,
            cols: $cols,
        };
        let isa = $krate::cpu_isa::Isa::current().unwrap();
        $krate::matmul4::gemm_4bit($krate::FloatSlice::BF16($x), $m, &w, $krate::FloatSliceMut::BF16($out), isa).unwrap();
    }};
}

macro_rules! dequantize {
    ($krate:ident, $packed:expr, $absmax:expr, $out:expr) => {{
        let isa = $krate::cpu_isa::Isa::current().unwrap();
        let scales = $krate::quant4::BlockScales::F32($absmax);
        $krate::quant4::dequantize_4bit_with($packed, scales, $krate::QuantType::Nf4, 64, $krate::FloatSliceMut::BF16($out), isa)
            .unwrap();
    }};
}

/// Median seconds of old and new over `reps` interleaved repeats of `run(new, copy)`: each
/// repeat times both, in turns first, on copies half a cycle apart (neither reads a weight the
/// other has just brought into the cache).
fn interleaved(reps: usize, copies: usize, mut run: impl FnMut(bool, usize)) -> (f64, f64) {
    let (mut old, mut new) = (vec![], vec![]);
    for rep in 0..reps {
        let order = if rep % 2 == 0 { [false, true] } else { [true, false] };
        for which in order {
            let copy = (rep + if which { copies / 2 } else { 0 }) % copies;
            let start = Instant::now();
            run(which, copy);
            let times = if which { &mut new } else { &mut old };
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let median = |t: &mut Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    (median(&mut old), median(&mut new))
}

fn main() {
    // Two crates of one library name would be linked as one (see kernel-ab.sh): make sure not.
    assert_ne!(
        old::matmul4::gemm_4bit as *const () as usize,
        new::matmul4::gemm_4bit as *const () as usize,
        "old and new are the same code: the two crates were not built apart"
    );
    let reps = var("REPS").map(|v| v.parse().unwrap()).unwrap_or(30);
    let warm = var("WARM").is_some();
    let double = var("DOUBLE").is_some();
    // Eight times the last-level cache (see CACHE_MULTIPLE in benches/cpu_matmul_bench.py: a
    // cache that keeps part of a cyclic stream serves much of twice its size).
    let pool = var("POOL_MIB").map(|v| v.parse::<usize>().expect("POOL_MIB: a number") << 20).unwrap_or(8 * last_level_cache_bytes());
    let mut noise = Noise(0x2545_F491_4F6C_DD1D);
    let shapes: Vec<(usize, usize)> = match var("SHAPES") {
        Some(v) => v
            .split(';')
            .map(|s| match numbers(s)[..] {
                [rows, cols] => (rows, cols),
                _ => panic!("SHAPES: rows,cols pairs separated by ';', not {s:?}"),
            })
            .collect(),
        None => vec![(4096, 4096), (4096, 14336), (14336, 4096), (576, 576), (1536, 576)],
    };
    println!(
        "NF4 blocksize 64, {} scales, bf16 activations; median of {reps} interleaved repeats; weights {}",
        if double { "double-quantized" } else { "float32" },
        if warm { "repeated (cache-warm)".to_string() } else { format!("cycled through copies of {} MiB in all (from memory)", pool >> 20) }
    );
    for &(rows, cols) in &shapes {
        let n = rows * cols;
        let copies = if warm { 1 } else { pool.div_ceil(n / 2).max(4) };
        let packed: Vec<Vec<u8>> = (0..copies).map(|_| noise.bytes(n / 2)).collect();
        let absmax: Vec<Vec<f32>> = (0..copies).map(|_| noise.scales(n / 64)).collect();
        let doubles: Vec<Option<Double>> =
            (0..copies).map(|_| if double { Some(Double::new(&mut noise, n / 64)) } else { None }).collect();
        if var("DEQUANTIZE").is_some() {
            let (mut o1, mut o2) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
            dequantize!(old, &packed[0], &absmax[0], &mut o1);
            dequantize!(new, &packed[0], &absmax[0], &mut o2);
            let same = o1 == o2;
            let (a, b) = interleaved(reps, copies, |which, c| {
                if which {
                    dequantize!(new, &packed[c], &absmax[c], &mut o2)
                } else {
                    dequantize!(old, &packed[c], &absmax[c], &mut o1)
                }
            });
            println!(
                "dequantize {rows}x{cols} -> bf16: old {:.3} ms, new {:.3} ms, old/new {:.2}x ({:.2} Gparam/s new; {})",
                a * 1e3,
                b * 1e3,
                a / b,
                n as f64 / b / 1e9,
                if same { "same bits" } else { "OUTPUTS DIFFER" }
            );
            continue;
        }
        for m in numbers(&var("MS").unwrap_or("1,4,16".into())) {
            let x: Vec<bf16> = (0..m * cols).map(|_| bf16::from_f32((noise.next() % 2000) as f32 / 1000.0 - 1.0)).collect();
            let (mut o1, mut o2) = (vec![bf16::ZERO; m * rows], vec![bf16::ZERO; m * rows]);
            gemm!(old, &packed[0], &absmax[0], &doubles[0], rows, cols, &x, m, &mut o1);
            gemm!(new, &packed[0], &absmax[0], &doubles[0], rows, cols, &x, m, &mut o2);
            // Summation orders may differ: one bf16 unit (relative, of |y| + 1) is expected.
            let diff = o1
                .iter()
                .zip(&o2)
                .map(|(a, b)| (a.to_f32() - b.to_f32()).abs() / (a.to_f32().abs() + 1.0))
                .fold(0f32, f32::max);
            let (a, b) = interleaved(reps, copies, |which, c| {
                if which {
                    gemm!(new, &packed[c], &absmax[c], &doubles[c], rows, cols, &x, m, &mut o2)
                } else {
                    gemm!(old, &packed[c], &absmax[c], &doubles[c], rows, cols, &x, m, &mut o1)
                }
            });
            println!(
                "{rows}x{cols} M={m:>2}: old {:.4} ms, new {:.4} ms, old/new {:.2}x (largest difference {diff:.1e})",
                a * 1e3,
                b * 1e3,
                a / b
            );
        }
    }
}
