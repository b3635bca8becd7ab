"""Worker for tests/train/test_trainer.py::test_load_balancing_gradient_*: prints the router's load-balancing gradient.

Run under torchrun with overrides; every sequence of the global batch is the same, so every micro-batch on
every rank holds identical tokens and the correctly scaled aux-loss gradient cannot depend on how the batch
is split. The gradient is isolated as grad(coefficient 1) - grad(coefficient 0) of the router weight of
layer 1, read from megatron-core's reduced gradient buffer.
"""

import json
import sys

import numpy as np
import torch


def main() -> None:
    from megatron_moe.config import load_run_config
    from megatron_moe.train.trainer import Trainer

    out_path, overrides = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_run_config(None, overrides), quiet=True)
    batch = trainer.data.train_batch(0)
    same = np.repeat(batch[:1], batch.shape[0], axis=0)
    router = next(m for m in trainer.chunks[0].modules() if type(m).__name__ == "TopKRouter")
    grads = []
    for coeff in (1.0, 0.0):
        router.config.moe_aux_loss_coeff = coeff
        trainer.chunks[0].zero_grad_buffer()
        trainer._run_schedule(same, forward_only=False)
        grads.append(router.weight.main_grad.detach().clone())
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump((grads[0] - grads[1]).flatten().tolist(), f)


if __name__ == "__main__":
    main()
