"""Worker for tests/train/test_upcycle.py: builds the upcycled MoE's trainer (train.init_from = a dense run) and
reports the largest difference between its logits and the dense run's model's on the same tokens, before any
training step."""

import json
import sys


def main() -> None:
    import torch

    from megatron_moe.config import load_run_config
    from megatron_moe.export.hf import load_trained_model
    from megatron_moe.train.trainer import Trainer

    out_path, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_run_config(None, overrides)
    trainer = Trainer(cfg, quiet=True)
    moe = trainer.chunks[0].module.eval()
    _, dense, _ = load_trained_model(cfg.train.init_from)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=gen)
    positions = torch.arange(cfg.model.seq_length).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ours, theirs = moe(ids, positions, None), dense(ids, positions, None)
    experts = [p for n, p in moe.named_parameters() if "local_experts.0.linear_fc1" in n]
    dense_fc1 = [p for n, p in dense.named_parameters() if n.endswith("mlp.linear_fc1.weight")]
    json.dump({"worst": (ours - theirs).abs().max().item(), "scale": theirs.std().item(),
               "expert0_is_dense_ffn": all(torch.equal(e, d) for e, d in zip(experts, dense_fc1))},
              open(out_path, "w"))


if __name__ == "__main__":
    main()
