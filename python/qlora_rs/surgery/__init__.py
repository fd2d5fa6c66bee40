"""Model surgery: quantize a model's linear layers, add LoRA adapters, prepare for training and
merge (:mod:`~qlora_rs.surgery.model`); adapters in PEFT's layout on disk (:mod:`~qlora_rs.surgery.adapter`)."""
