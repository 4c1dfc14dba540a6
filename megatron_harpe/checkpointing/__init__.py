"""Checkpoints: what the trainer, the evaluator and the converter read and write.

checkpoint.py saves and loads layout-independent checkpoints (any TP x CP x DP, sharded or not);
fsdp_entries.py describes the training engine's FSDP2 shards as the global tensors; extra_state.py
loads with or without Transformer Engine's `_extra_state`; integrity.py tells whether an iteration
is intact; run_lock.py keeps two runs from writing one directory; resume_check.py refuses a resume
whose config changed what the checkpoint holds; pretrained.py starts a run from pretrained weights.
"""
