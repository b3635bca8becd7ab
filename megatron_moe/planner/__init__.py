"""The planner: closed-form parameter and FLOP arithmetic on model configs (no torch).

- `ledger`: parameters per component (total and active) and FLOPs per token of one config; the one source of
  these counts, tested against the built megatron-core model.
- `match`: dense baselines matched to an MoE on active parameters, total parameters or FLOPs per token.
- `family`: equal-resources MoE families (equal N, C and D across activation rates; K or D_e free or held, an
  explicit dense baseline shape, strict or fresh data reuse).
- `format`: the human-readable tables and number formatting the CLI and reports print, and counts read as
  researchers write them (6.5B, 1.4e11).
- `plan`: what `megatron-moe plan` computes for one config (ledger, matched arms as complete run configs).
"""
