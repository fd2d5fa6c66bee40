//! The rayon thread pool: sized by `QLORA_RS_NUM_THREADS` (or `RAYON_NUM_THREADS`), else all cores.

use std::sync::Once;

static INIT: Once = Once::new();

/// Builds the global pool once, honouring `QLORA_RS_NUM_THREADS`. Safe to call repeatedly.
pub fn init() {
    INIT.call_once(|| {
        if let Some(n) = std::env::var("QLORA_RS_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()) {
            // Fails only if a pool already exists (e.g. built by a host application); keep that one.
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global();
        }
    });
}

/// Threads the core's parallel loops use.
pub fn current() -> usize {
    init();
    rayon::current_num_threads()
}
