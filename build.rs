fn main() {
    println!("cargo::rustc-check-cfg=cfg(qlora_cuda_kernels)");
}
