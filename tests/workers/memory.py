"""Worker for tests/planner/test_memory.py: builds a trainer, takes one optimizer step (Adam's state exists from the
first step on) and reports, per rank, the bytes its model weights, gradient buffers and optimizer state hold."""

import json
import os
import sys


def _storages(tensors) -> dict[int, int]:
    """Distinct storages of `tensors`: data pointer -> bytes (views of one buffer count once)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def main() -> None:
    from megatron_moe.config import load_run_config
    from megatron_moe.train.trainer import Trainer

    out_path, overrides = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_run_config(None, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1"))), quiet=True)
    trainer.train_step()
    params = {id(p): p for chunk in trainer.chunks for p in chunk.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    model_storage = _storages(params)
    grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                for ddp in trainer.chunks for b in (*ddp.buffers, *ddp.expert_parallel_buffers))
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    held = []
    for opt in inner:
        torch_opt = opt.optimizer
        held += [p for group in torch_opt.param_groups for p in group["params"]]
        held += [v for state in torch_opt.state.values() for k, v in state.items() if k != "step"]
    optimizer = sum(n for ptr, n in _storages(held).items() if ptr not in model_storage)
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"pp_rank": trainer.par.pp_rank, "weights": weights, "grads": grads, "optimizer": optimizer}, f)


if __name__ == "__main__":
    main()
