"""The I/O layer: the one checkpoint reader (:mod:`~qlora_rs.io.checkpoint`, headers through the
Rust reader), conversion (:mod:`~qlora_rs.io.convert`, :mod:`~qlora_rs.io.conversion`,
:mod:`~qlora_rs.io.calibrate`, :mod:`~qlora_rs.io.gguf_metadata`), single-process loading and saving
(:mod:`~qlora_rs.io.loading`, :mod:`~qlora_rs.io.skeleton`), training data files
(:mod:`~qlora_rs.io.data`) and the transformers and PEFT plug-ins (:mod:`~qlora_rs.io.hf_quantizer`,
:mod:`~qlora_rs.io.peft_integration`)."""
