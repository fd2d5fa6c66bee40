"""The training layer: the trainer (:mod:`~qlora_rs.training.train`), evaluation, inference
(chat/generate), the memory planner, the built-in datasets and the demos."""
