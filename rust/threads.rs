//! Threads for the core's parallel loops.
//!
//! Whole-file work (conversion, quantization) runs on the rayon pool, sized by
//! `QLORA_RS_NUM_THREADS` (or `RAYON_NUM_THREADS`), else all cores.
//!
//! The per-layer kernels of a forward pass (the fused 4-bit matmul, dequantize) run between
//! PyTorch's own CPU ops, which run on GNU OpenMP's team. After each op that team's threads spin
//! for a while (libgomp's default wait policy) before they sleep, so a second pool's threads
//! would share the cores with spinning ones: measured on 2 cores, 4096x4096 at M = 1 interleaved
//! with `F.linear`, 1.79 ms on the rayon pool against 1.00 ms with OpenMP's threads made passive.
//! [`run_team`] therefore runs such work on the process's OpenMP team when libgomp is loaded (as
//! it is wherever PyTorch is): its spinning threads take the work at once. Elsewhere (cargo tests,
//! a process without OpenMP) the rayon pool runs it. `QLORA_RS_OPENMP=0` keeps to rayon.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

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

/// Threads [`run_team`] would start now: the OpenMP team's size (PyTorch's
/// `torch.get_num_threads()`) when it runs there, capped by [`current`].
pub fn team_size() -> usize {
    let ours = current();
    match openmp::team() {
        Some(omp) => omp.max_threads().clamp(1, ours),
        None => ours,
    }
}

/// Which threads [`run_team`] uses in this process: `"openmp"` or `"rayon"`.
pub fn team_backend() -> &'static str {
    if openmp::team().is_some() {
        "openmp"
    } else {
        "rayon"
    }
}

/// Runs `work` on `threads` threads at once, the calling thread among them, and returns when all
/// have returned. Each call of `work` should take its share from a counter of tasks, so that a
/// thread that starts late or runs slowly leaves its share to the others. A panic in `work` is
/// raised again here once every thread has returned.
pub fn run_team(threads: usize, work: &(dyn Fn() + Sync)) {
    if threads <= 1 {
        work();
        return;
    }
    if let Some(omp) = openmp::team() {
        omp.parallel(threads, work);
        return;
    }
    rayon::in_place_scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| work());
        }
        work();
    });
}

/// Runs `task(t)` for every t in `0..tasks` on up to `threads` threads of [`run_team`], each
/// thread taking the next task from a counter (on the calling thread alone for one).
pub fn run_tasks(threads: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    if threads.min(tasks) <= 1 {
        (0..tasks).for_each(task);
        return;
    }
    let next = AtomicUsize::new(0);
    run_team(threads.min(tasks), &|| loop {
        let t = next.fetch_add(1, Ordering::Relaxed);
        if t >= tasks {
            break;
        }
        task(t);
    });
}

/// GNU OpenMP's entry points, found in the already loaded libgomp (never loaded by us).
mod openmp {
    use super::*;

    #[cfg(unix)]
    use std::ffi::{c_int, c_uint, c_void};

    /// `void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags)`
    #[cfg(unix)]
    type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
    /// `int omp_get_max_threads(void)`
    #[cfg(unix)]
    type MaxThreads = unsafe extern "C" fn() -> c_int;

    pub struct OpenMp {
        #[cfg(unix)]
        parallel: GompParallel,
        #[cfg(unix)]
        max_threads: MaxThreads,
    }

    /// Lookups of libgomp made so far (see [`team`]).
    pub(super) static LOOKUPS: AtomicUsize = AtomicUsize::new(0);

    /// The loaded libgomp, looked up once it is there (a process may load PyTorch after us).
    /// While it is not, it is looked up again only once the process has loaded another shared
    /// object: a failed `dlopen` searches the library path, ~35 us, which every product of a
    /// process without OpenMP (a Rust user's, cargo's tests) paid (measured on a 2-core Zen 3,
    /// 576x576 at M = 1 on one thread: 44 -> 24 cycles per 64 values).
    pub fn team() -> Option<&'static OpenMp> {
        static FOUND: OnceLock<OpenMp> = OnceLock::new();
        static DISABLED: OnceLock<bool> = OnceLock::new();
        /// The count of loaded objects when a lookup last failed (u64::MAX: none failed).
        static MISSED_AT: AtomicU64 = AtomicU64::new(u64::MAX);
        if *DISABLED.get_or_init(|| std::env::var("QLORA_RS_OPENMP").is_ok_and(|v| v.trim() == "0")) {
            return None;
        }
        if let Some(found) = FOUND.get() {
            return Some(found);
        }
        let loaded = objects_loaded();
        if loaded.is_some_and(|n| n == MISSED_AT.load(Ordering::Relaxed)) {
            return None;
        }
        LOOKUPS.fetch_add(1, Ordering::Relaxed);
        match lookup() {
            Some(found) => Some(FOUND.get_or_init(|| found)),
            None => {
                if let Some(n) = loaded {
                    MISSED_AT.store(n, Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// How many shared objects the process has loaded so far (the C library's running count,
    /// which only grows), or None where it is not kept.
    #[cfg(target_os = "linux")]
    fn objects_loaded() -> Option<u64> {
        unsafe extern "C" fn first(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
            // SAFETY: both pointers are valid for this call (the loader's entry, our u64).
            unsafe { *(data as *mut u64) = (*info).dlpi_adds };
            1 // every entry carries the same count: stop at the first
        }
        let mut adds = 0u64;
        // SAFETY: the callback only reads the entry it is given and writes `adds`.
        let stopped = unsafe { libc::dl_iterate_phdr(Some(first), &mut adds as *mut u64 as *mut c_void) };
        (stopped == 1).then_some(adds)
    }

    #[cfg(not(target_os = "linux"))]
    fn objects_loaded() -> Option<u64> {
        None
    }

    #[cfg(unix)]
    fn lookup() -> Option<OpenMp> {
        // SAFETY: RTLD_NOLOAD only returns a library already in the process (never runs
        // constructors); the symbols have GCC's documented signatures, stable since GCC 4.9.
        unsafe {
            let lib = libc::dlopen(c"libgomp.so.1".as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY);
            if lib.is_null() {
                return None;
            }
            let parallel = libc::dlsym(lib, c"GOMP_parallel".as_ptr());
            let max_threads = libc::dlsym(lib, c"omp_get_max_threads".as_ptr());
            // The process keeps the library loaded; dropping our reference leaves it so.
            libc::dlclose(lib);
            if parallel.is_null() || max_threads.is_null() {
                return None;
            }
            Some(OpenMp {
                parallel: std::mem::transmute::<*mut c_void, GompParallel>(parallel),
                max_threads: std::mem::transmute::<*mut c_void, MaxThreads>(max_threads),
            })
        }
    }

    #[cfg(not(unix))]
    fn lookup() -> Option<OpenMp> {
        None
    }

    impl OpenMp {
        pub fn max_threads(&self) -> usize {
            #[cfg(unix)]
            // SAFETY: a plain query of the loaded runtime.
            return unsafe { (self.max_threads)() }.max(1) as usize;
            #[cfg(not(unix))]
            1
        }

        pub fn parallel(&self, threads: usize, work: &(dyn Fn() + Sync)) {
            #[cfg(unix)]
            {
                struct Job<'a> {
                    work: &'a (dyn Fn() + Sync),
                    panicked: AtomicBool,
                }
                extern "C" fn body(data: *mut c_void) {
                    // SAFETY: `data` is the Job below, alive until GOMP_parallel returns.
                    let job = unsafe { &*(data as *const Job<'_>) };
                    // A panic must not unwind into C: note it and raise it after the region.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job.work)).is_err() {
                        job.panicked.store(true, Ordering::Relaxed);
                    }
                }
                let job = Job { work, panicked: AtomicBool::new(false) };
                // SAFETY: GOMP_parallel runs `body` on `threads` threads (the caller's included)
                // and returns after all of them; `job` outlives the call.
                unsafe { (self.parallel)(body, &job as *const Job<'_> as *mut c_void, threads as c_uint, 0) };
                if job.panicked.load(Ordering::Relaxed) {
                    panic!("a parallel task panicked");
                }
            }
            #[cfg(not(unix))]
            {
                let _ = threads;
                work();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// `work` runs `threads` times at once; tasks taken from a counter are each done once.
    fn check_team() {
        for threads in [1, 2, 3] {
            let calls = AtomicUsize::new(0);
            let next = AtomicUsize::new(0);
            let done = Mutex::new(Vec::new());
            let ids = Mutex::new(HashSet::new());
            run_team(threads, &|| {
                calls.fetch_add(1, Ordering::Relaxed);
                ids.lock().unwrap().insert(std::thread::current().id());
                loop {
                    let t = next.fetch_add(1, Ordering::Relaxed);
                    if t >= 100 {
                        break;
                    }
                    done.lock().unwrap().push(t);
                }
            });
            assert_eq!(calls.load(Ordering::Relaxed), threads, "{}", team_backend());
            // OpenMP starts exactly that many threads; rayon may run two calls on one pool thread.
            let distinct = ids.lock().unwrap().len();
            if team_backend() == "openmp" {
                assert_eq!(distinct, threads, "one call per OpenMP thread");
            } else {
                assert!((1..=threads).contains(&distinct));
            }
            let mut done = done.into_inner().unwrap();
            done.sort();
            assert_eq!(done, (0..100).collect::<Vec<_>>());
        }
    }

    /// Without libgomp a failed lookup is not repeated on every call (only after the process
    /// loads another object: other tests may, so a few more are allowed); with it, it is found
    /// once and kept.
    #[test]
    fn libgomp_is_not_looked_up_on_every_call() {
        let before = openmp::LOOKUPS.load(Ordering::Relaxed);
        for _ in 0..100 {
            let _ = team_size();
        }
        let looked = openmp::LOOKUPS.load(Ordering::Relaxed) - before;
        assert!(looked <= 5, "{looked} lookups in 100 calls");
    }

    #[test]
    fn a_team_runs_every_task_once_on_rayon_and_on_openmp() {
        check_team();
        // The system's GNU OpenMP, loaded as PyTorch loads its own: the same work on its team.
        #[cfg(target_os = "linux")]
        {
            // SAFETY: loading a shared library; libgomp's constructors only set up its runtime.
            let lib = unsafe { libc::dlopen(c"libgomp.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if lib.is_null() {
                eprintln!("no libgomp.so.1 on this system: the OpenMP team is not tested here");
                return;
            }
            assert_eq!(team_backend(), "openmp");
            check_team();
            let caught = std::panic::catch_unwind(|| run_team(2, &|| panic!("task failed")));
            assert!(caught.is_err(), "a panic in a task is raised in the caller");
        }
    }
}
