//! The Rust-only double-quantization offset (`qlora-rs convert` without torch) against `torch.mean`
//! bit patterns measured on a CPU with AVX-512, once with `ATEN_CPU_CAPABILITY=avx2` and once with
//! torch's default AVX512 capability (tests/data/torch_mean_f32.json, copied from the team's shared
//! data; its `doc` field says how to regenerate it). Every case must match for both capabilities.

use qlora_rs::reduce::{torch_mean_f32, SumOrder, TORCH_SUM_WIDTH};
use serde_json::Value;

/// The fixture's inputs: x_i = (splitmix64(seed + i) >> 40) / 2^24 * 8 + 0.25 as float32.
fn fixture_values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f64 / (1u64 << 24) as f64 * 8.0 + 0.25) as f32
        })
        .collect()
}

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/torch_mean_f32.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read the fixture")).expect("parse the fixture")
}

#[test]
fn offset_equals_torch_mean_on_avx2_and_avx512() {
    let data = fixture();
    let results = data["results"].as_object().expect("results");
    for capability in ["AVX2", "AVX512"] {
        let by_threads = results[capability].as_object().unwrap_or_else(|| panic!("no {capability} results"));
        assert_eq!(by_threads.len(), 4, "{capability}: expected results for 1, 2, 4 and 8 threads");
        let mut checked = 0;
        for (threads, cases) in by_threads {
            let threads: usize = threads.parse().unwrap();
            let mut cache: Option<(usize, u64, Vec<f32>)> = None;
            for case in cases.as_array().unwrap() {
                let (n, seed, bits) =
                    (case[0].as_u64().unwrap() as usize, case[1].as_u64().unwrap(), case[2].as_u64().unwrap() as u32);
                if cache.as_ref().is_none_or(|(cn, cs, _)| (*cn, *cs) != (n, seed)) {
                    cache = Some((n, seed, fixture_values(n, seed)));
                }
                let x = &cache.as_ref().unwrap().2;
                let got = torch_mean_f32(x, SumOrder::new(TORCH_SUM_WIDTH, threads));
                assert_eq!(
                    got.to_bits(),
                    bits,
                    "{capability}, {threads} threads, n={n}, seed={seed}: got {got} ({:#x}), torch.mean gives {} ({bits:#x})",
                    got.to_bits(),
                    f32::from_bits(bits)
                );
                checked += 1;
            }
        }
        assert!(checked > 2500, "{capability}: only {checked} cases");
    }
}

#[test]
fn sixteen_lanes_would_not_match() {
    // The fixture can tell the widths apart: summing in AVX-512's 16 lanes misses many cases.
    let data = fixture();
    let cases = data["results"]["AVX512"]["1"].as_array().unwrap();
    let misses = cases
        .iter()
        .filter(|c| {
            let (n, seed, bits) = (c[0].as_u64().unwrap() as usize, c[1].as_u64().unwrap(), c[2].as_u64().unwrap() as u32);
            torch_mean_f32(&fixture_values(n, seed), SumOrder::new(16, 1)).to_bits() != bits
        })
        .count();
    assert!(misses > 100, "width 16 missed only {misses} cases: the fixture no longer tells the widths apart");
}
