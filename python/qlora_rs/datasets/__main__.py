"""``python -m qlora_rs.datasets``: rewrite the built-in dataset file from its templates."""

from . import generate, path, write

write(path())
print(f"wrote {path()} ({len(generate())} records)")
