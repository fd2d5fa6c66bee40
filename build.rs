//! Build script: compiles the CUDA kernels in `cuda/` with nvcc into one fatbin that the library
//! embeds (`rust/cuda/mod.rs`, `include_bytes!`).
//!
//! nvcc is looked up in this order: `$NVCC`; `nvcc` on `PATH`; the project-local
//! `.tools/*/nvidia/cu13/bin/nvcc` that `scripts/bootstrap.sh` installs from PyPI;
//! `$CUDA_HOME`/`$CUDA_PATH`/`/usr/local/cuda`; the `nvidia-cuda-nvcc` package in the site-packages
//! of the Python that builds the wheel (`$PYO3_PYTHON`, `$VIRTUAL_ENV`, `python3`).
//!
//! * No nvcc: the build succeeds without kernels, says so in a cargo warning, and
//!   `qlora_rs.build_info()["cuda_kernels"]` is False.
//! * nvcc found but a kernel does not compile: the build FAILS, so a broken `.cu` never lands,
//!   unless `QLORA_RS_ALLOW_NO_CUDA=1` (then: a warning, and no kernels).
//! * `QLORA_RS_NO_CUDA=1` skips the kernels on purpose; `QLORA_RS_CUDA_ARCHS=80,90` narrows the
//!   targets for a faster local build (default: sm_80, sm_86, sm_89, sm_90 and PTX for the newest).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const DEFAULT_ARCHS: &[u32] = &[80, 86, 89, 90];
const FATBIN: &str = "qlora_kernels.fatbin";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(qlora_cuda_kernels)");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for var in [
        "NVCC",
        "NVCC_CCBIN",
        "CUDA_HOME",
        "CUDA_PATH",
        "QLORA_RS_NO_CUDA",
        "QLORA_RS_ALLOW_NO_CUDA",
        "QLORA_RS_CUDA_ARCHS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let cuda_dir = root.join("cuda");
    println!("cargo::rerun-if-changed={}", cuda_dir.display());
    let sources = cuda_sources(&cuda_dir);
    for s in sources.iter().chain(headers(&cuda_dir).iter()) {
        println!("cargo::rerun-if-changed={}", s.display());
    }

    if flag("QLORA_RS_NO_CUDA") {
        warn("QLORA_RS_NO_CUDA=1: building WITHOUT CUDA kernels (qlora_rs.build_info()['cuda_kernels'] is False)");
        return;
    }
    if sources.is_empty() {
        warn("no cuda/*.cu sources: building WITHOUT CUDA kernels");
        return;
    }
    let nvcc = match find_nvcc(&root) {
        // nvcc finds its own tools (nvcc.profile) next to the path it was started by: resolve links.
        Ok(Some(nvcc)) => fs::canonicalize(&nvcc).unwrap_or(nvcc),
        Ok(None) => {
            // Installing nvcc later (or changing PATH to reach one) should trigger a rebuild.
            println!("cargo::rerun-if-env-changed=PATH");
            println!("cargo::rerun-if-env-changed=VIRTUAL_ENV");
            warn(
                "nvcc not found: building WITHOUT CUDA kernels (qlora_rs.build_info()['cuda_kernels'] is False; \
                 4-bit ops on CUDA tensors take the slow pure-torch path). To build them: set NVCC=/path/to/nvcc, put nvcc on PATH, \
                 or `pip install nvidia-cuda-nvcc==13.0.*` (or run scripts/bootstrap.sh, which installs it into \
                 .tools/cuda13), then rebuild (`maturin develop --release`).",
            );
            return;
        }
        Err(msg) => {
            fail_or_skip(&msg);
            return;
        }
    };
    println!("cargo::rerun-if-changed={}", nvcc.display());

    let archs = match archs() {
        Ok(a) => a,
        Err(msg) => panic!("{msg}"),
    };
    let version = nvcc_version(&nvcc).unwrap_or_default();
    match compile(&nvcc, &cuda_dir, &sources, &archs, &out_dir) {
        Ok(()) => {
            let newest = archs.iter().max().copied().unwrap_or(90);
            let mut names: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
            names.push(format!("compute_{newest}"));
            println!("cargo::rustc-cfg=qlora_cuda_kernels");
            println!("cargo::rustc-env=QLORA_RS_CUDA_ARCHS={}", names.join(","));
            println!("cargo::rustc-env=QLORA_RS_NVCC_VERSION={version}");
        }
        Err(msg) => fail_or_skip(&msg),
    }
}

fn flag(name: &str) -> bool {
    matches!(env::var(name).as_deref(), Ok("1") | Ok("true") | Ok("yes"))
}

fn warn(msg: &str) {
    println!("cargo::warning=qlora-rs: {msg}");
}

/// Fails the build, or with QLORA_RS_ALLOW_NO_CUDA=1 warns and returns (the build goes on without kernels).
fn fail_or_skip(msg: &str) {
    if flag("QLORA_RS_ALLOW_NO_CUDA") {
        for line in msg.lines().take(40) {
            warn(line);
        }
        warn("QLORA_RS_ALLOW_NO_CUDA=1: continuing WITHOUT CUDA kernels");
    } else {
        panic!(
            "{msg}\n\nqlora-rs: the CUDA kernels did not build. Fix the error above, or set QLORA_RS_ALLOW_NO_CUDA=1 \
             to build without kernels (QLORA_RS_NO_CUDA=1 skips them entirely)."
        );
    }
}

fn listing(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(ext))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn cuda_sources(dir: &Path) -> Vec<PathBuf> {
    listing(dir, "cu")
}

fn headers(dir: &Path) -> Vec<PathBuf> {
    listing(dir, "cuh")
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

/// The nvcc to use; Err when `$NVCC` names something that is not there.
fn find_nvcc(root: &Path) -> Result<Option<PathBuf>, String> {
    if let Some(v) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(&v);
        if is_file(&p) {
            return Ok(Some(p));
        }
        if let Some(found) = search_path(&p) {
            return Ok(Some(found));
        }
        return Err(format!("NVCC={} does not exist", p.display()));
    }
    if let Some(p) = search_path(Path::new("nvcc")) {
        return Ok(Some(p));
    }
    // The project-local toolkit (scripts/bootstrap.sh): .tools/<name>/nvidia/cu13/bin/nvcc.
    let tools = root.join(".tools");
    let mut local: Vec<PathBuf> = vec![tools.join("cuda13/nvidia/cu13/bin/nvcc"), tools.join("nvidia/cu13/bin/nvcc")];
    if let Ok(rd) = fs::read_dir(&tools) {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path().join("nvidia/cu13/bin/nvcc")).collect();
        more.sort();
        local.extend(more);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = env::var_os(var).filter(|v| !v.is_empty()) {
            local.push(PathBuf::from(h).join("bin/nvcc"));
        }
    }
    local.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    if let Some(p) = local.into_iter().find(|p| is_file(p)) {
        return Ok(Some(p));
    }
    Ok(python_nvcc())
}

fn search_path(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return None;
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|d| d.join(name)).find(|p| is_file(p))
}

/// nvcc from the `nvidia-cuda-nvcc` wheel (site-packages/nvidia/cu13/bin/nvcc) of the Python that
/// builds the extension, if any.
fn python_nvcc() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(venv) = env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        if let Ok(rd) = fs::read_dir(PathBuf::from(venv).join("lib")) {
            for e in rd.filter_map(|e| e.ok()) {
                candidates.push(e.path().join("site-packages/nvidia/cu13/bin/nvcc"));
            }
        }
    }
    let pythons: Vec<String> = ["PYO3_PYTHON", "PYTHON_SYS_EXECUTABLE"]
        .iter()
        .filter_map(|v| env::var(v).ok().filter(|s| !s.is_empty()))
        .chain(["python3".to_string()])
        .collect();
    for py in pythons {
        let out = Command::new(&py)
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib']); print(sysconfig.get_paths()['platlib'])",
            ])
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    candidates.push(PathBuf::from(line.trim()).join("nvidia/cu13/bin/nvcc"));
                }
            }
        }
    }
    candidates.into_iter().find(|p| is_file(p))
}

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "Cuda compilation tools, release 13.0, V13.0.88"
    let line = text.lines().find(|l| l.contains("release"))?;
    let v = line.rsplit(", V").next()?.trim();
    Some(v.to_string())
}

fn archs() -> Result<Vec<u32>, String> {
    match env::var("QLORA_RS_CUDA_ARCHS") {
        Ok(s) if !s.trim().is_empty() => {
            let mut v = Vec::new();
            for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let digits = part.trim_start_matches("sm_").trim_start_matches("compute_");
                match digits.parse::<u32>() {
                    Ok(a) if a >= 80 => v.push(a),
                    _ => {
                        return Err(format!(
                            "QLORA_RS_CUDA_ARCHS={s:?}: expected a comma-separated list of compute capabilities \
                             >= 80 such as \"80,86,89,90\" (the kernels use bf16 tensor-core instructions)"
                        ))
                    }
                }
            }
            v.sort_unstable();
            v.dedup();
            Ok(v)
        }
        _ => Ok(DEFAULT_ARCHS.to_vec()),
    }
}

fn compile(nvcc: &Path, cuda_dir: &Path, sources: &[PathBuf], archs: &[u32], out_dir: &Path) -> Result<(), String> {
    // One translation unit that includes every kernel source, so one nvcc call yields one fatbin.
    let unit = out_dir.join("qlora_kernels.cu");
    let mut text = String::from("// Generated by build.rs: every cuda/*.cu in one translation unit.\n");
    for s in sources {
        text.push_str(&format!("#include \"{}\"\n", s.display()));
    }
    fs::write(&unit, text).map_err(|e| format!("writing {}: {e}", unit.display()))?;

    let fatbin = out_dir.join(FATBIN);
    let newest = archs.iter().max().copied().unwrap_or(90);
    let jobs = env::var("NUM_JOBS").ok().and_then(|j| j.parse::<u32>().ok()).unwrap_or(1).max(1);
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin").args(["-O3", "-std=c++17", "--threads"]).arg(jobs.to_string());
    cmd.arg("-I").arg(cuda_dir);
    for a in archs {
        let code = if *a == newest { format!("[sm_{a},compute_{a}]") } else { format!("sm_{a}") };
        cmd.arg(format!("-gencode=arch=compute_{a},code={code}"));
    }
    cmd.arg("-o").arg(&fatbin).arg(&unit);
    let started = Instant::now();
    let out = cmd.output().map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "nvcc failed ({}):\n{:?}\n{}{}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if !is_file(&fatbin) {
        return Err(format!("nvcc succeeded but wrote no {}", fatbin.display()));
    }
    // Visible with `cargo build -vv`; the kernels' share of the build time.
    println!("qlora-rs: nvcc compiled {} kernel source(s) in {:.1}s", sources.len(), started.elapsed().as_secs_f64());
    Ok(())
}
