#!/usr/bin/env bash
# A/B of the CPU kernels (rust/matmul4: the fused 4-bit products and the decode) between a git
# revision and the working tree, in one process with the repeats interleaved: the only timing
# comparison that means anything on a machine whose speed drifts 10-30% from run to run.
#
#   scripts/kernel-ab.sh REV [VAR=value ...]
#
#   SHAPES="4096,4096;576,576"  weights [out,in] (default: 4096x4096, 4096x14336, 14336x4096,
#                               576x576, 1536x576)
#   MS=1,4,16                   activation rows        REPS=30   repeats
#   WARM=1                      one weight, repeated (default: copies cycled from memory,
#                               POOL_MIB of them in all; default eight times the last-level cache)
#   DOUBLE=1                    double-quantized scales (the 1-byte codes large weights are read with)
#   DEQUANTIZE=1                the decode to bf16 instead of the products
#   QLORA_RS_NUM_THREADS=1      threads; QLORA_RS_CPU_ISA=avx2 caps the level
#
# The revision is copied to target/kernel-ab/old as a crate of another package AND library name
# (qlora_rs_old): two crates of one library name are written to the same file and one of them is
# then linked for both, which times the same code twice (the harness checks that it does not).
set -euo pipefail
rev=${1:?usage: scripts/kernel-ab.sh REV [VAR=value ...]}
shift
root=$(git rev-parse --show-toplevel)
dir=$root/target/kernel-ab
rm -rf "$dir/old"
mkdir -p "$dir/old" "$dir/harness/src"
git -C "$root" archive "$(git -C "$root" rev-parse --verify "$rev^{commit}")" | tar -x -C "$dir/old"
sed -i -e '0,/^name = "qlora-rs"$/s//name = "qlora-rs-old"/' -e '0,/^name = "qlora_rs"$/s//name = "qlora_rs_old"/' \
    "$dir/old/Cargo.toml"
grep -q '^name = "qlora_rs_old"$' "$dir/old/Cargo.toml" || { echo "kernel-ab: could not rename the old crate's library" >&2; exit 1; }
cat > "$dir/harness/Cargo.toml" <<TOML
[package]
name = "kernel-ab"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
old = { package = "qlora-rs-old", path = "$dir/old" }
new = { package = "qlora-rs", path = "$root" }
half = "2.7"

[profile.release]
lto = "thin"
codegen-units = 4

[workspace]
TOML
cp "$root/scripts/kernel_ab/main.rs" "$dir/harness/src/main.rs"
# No CUDA kernels: only the CPU code is timed, and nvcc would add minutes.
QLORA_RS_NO_CUDA=1 cargo build --quiet --release --manifest-path "$dir/harness/Cargo.toml"
env "$@" "$dir/harness/target/release/kernel-ab"
