"""Worker for tests/train/test_balancing.py: trains a tiny MoE whose routers start skewed toward expert 0 and
writes the training load of that expert per window of steps, the losses and the final expert biases as JSON.

The skew: the routers' inputs are read on the first batch, and each router's expert-0 row is moved along their
mean so that expert 0's logit is `SKEW` higher on the average token. Every method starts from the same skewed
model (same seed, same data); only the balancing differs.
"""

import json
import sys

import torch

SKEW = 4.0
STEPS, WINDOW = 24, 4


def main() -> None:
    from megatron_moe.config import load_run_config
    from megatron_moe.train.trainer import Trainer

    out_path, overrides = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_run_config(None, overrides), quiet=True)
    routers = trainer.load_monitor.routers
    inputs = {}
    hooks = [r.register_forward_pre_hook(lambda r, args: inputs.setdefault(r, args[0].detach())) for r in routers]
    trainer._run_schedule(trainer.data.train_batch(0), forward_only=True)
    for h in hooks:
        h.remove()
    trainer.load_monitor.collect()  # forget the probe's counts
    with torch.no_grad():
        for router in routers:
            mean = inputs[router].reshape(-1, inputs[router].shape[-1]).float().mean(0)
            router.weight[0] += SKEW * mean / mean.square().sum()
    load, losses = [], []
    for _ in range(STEPS // WINDOW):
        for _ in range(WINDOW):
            losses.append(trainer.train_step()["loss"])
        collected = trainer.load_monitor.collect()
        load.append(sum(row[0] for row in collected["expert_load"]) / len(collected["expert_load"]))
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"expert0_load": load, "loss": losses, "bias": collected.get("expert_bias")}, f)


if __name__ == "__main__":
    main()
