"""Training one run on megatron-core.

- `trainer`: the training loop (megatron-core DDP, optimizer, LR schedule, forward-backward schedules).
- `monitors`: the loop's side work: metrics sinks, throughput and MFU, expert load, MoE losses.
- `checkpoint`: saving, verifying and resuming the full train state.
- `rundir`: start-up checks of a run directory (its lock, the checkpoint to resume, config changes).
- `result`: result.json, the record a finished run leaves (no torch at import).
- `stop`: the stop-signal and exit-code contract with whoever runs the trainer (no torch at import).
"""
