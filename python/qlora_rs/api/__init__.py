"""The public entry points that choose between one process and many: :func:`from_pretrained`
(a model directory loaded here, or sharded over a device mesh) and :func:`save_adapter` (written
here, or gathered from the ranks first). They sit above both the I/O layer and
:mod:`qlora_rs.distributed`, so neither of those needs to know the other.
"""
