"""``python -m qlora_rs.training.datasets``: rewrite the built-in dataset files from their sources."""

from . import facts, generate, path, write

write(path())
print(f"wrote {path()} ({len(generate())} records)")
facts.write(facts.path())
print(f"wrote {facts.path()} ({len(facts.records())} records)")
