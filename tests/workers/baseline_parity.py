"""Worker for tests/bench/test_baseline_parity.py: the megatron-core model a Trainer builds and the plain-PyTorch
model of `bench/baseline.py`, given the same initial weights (copied by name) and the same batches, trained side by
side: megatron-core's optimizer and schedule on one side; torch's AdamW with the same weight-decay groups (no decay
on vectors) and a warm-up-then-cosine schedule written out here on the other. Reports both losses per step."""

import json
import math
import sys


def lr_at(step: int, t) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up from 0, then cosine to min_lr."""
    if step <= t.lr_warmup_steps:
        return t.lr * step / t.lr_warmup_steps
    ratio = (step - t.lr_warmup_steps) / (t.train_steps - t.lr_warmup_steps)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0)))


def copy_weights(plain, megatron, m) -> None:
    """megatron-core's parameters into the plain model, by name; the fused QKV reordered from megatron-core's
    per-group [q..., k, v] rows to the plain model's [all q, all k, all v]."""
    import torch

    from megatron_moe.export.hf import _split_qkv

    sd = megatron.state_dict()
    names = {"emb.weight": "embedding.word_embeddings.weight", "norm.weight": "decoder.final_layernorm.weight",
             "out.weight": "embedding.word_embeddings.weight" if m.tie_embeddings else "output_layer.weight"}
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"blocks.{i}."
        names.update({dst + "norm1.weight": src + "input_layernorm.weight", dst + "norm2.weight":
                      src + "pre_mlp_layernorm.weight", dst + "proj.weight": src + "self_attention.linear_proj.weight"})
        if m.moe.is_moe_layer(i):
            names[dst + "mlp.router.weight"] = src + "mlp.router.weight"
            for j in range(m.moe.num_experts):
                for fc in ("fc1", "fc2"):
                    names[f"{dst}mlp.experts.{j}.{fc}.weight"] = f"{src}mlp.experts.local_experts.{j}.linear_{fc}.weight"
        else:
            names.update({dst + "mlp.fc1.weight": src + "mlp.linear_fc1.weight",
                          dst + "mlp.fc2.weight": src + "mlp.linear_fc2.weight"})
    with torch.no_grad():
        params = dict(plain.named_parameters())
        for mine, theirs in names.items():
            params[mine].copy_(sd[theirs])
        for i in range(m.num_layers):
            params[f"blocks.{i}.qkv.weight"].copy_(torch.cat(_split_qkv(sd[f"decoder.layers.{i}.self_attention.linear_qkv.weight"], m)))
    assert set(names) | {f"blocks.{i}.qkv.weight" for i in range(m.num_layers)} >= set(params), set(params) - set(names)


def main() -> None:
    import torch

    from megatron_moe.bench.baseline import plain_model
    from megatron_moe.config import load_run_config
    from megatron_moe.train.trainer import Trainer

    out_path, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_run_config(None, overrides)
    t = cfg.train
    trainer = Trainer(cfg, quiet=True)
    plain = plain_model(cfg.model)
    copy_weights(plain, trainer.chunks[0].module, cfg.model)
    groups = [[p for p in plain.parameters() if p.dim() > 1], [p for p in plain.parameters() if p.dim() == 1]]
    opt = torch.optim.AdamW([{"params": groups[0], "weight_decay": t.weight_decay},
                             {"params": groups[1], "weight_decay": 0.0}],
                            lr=0.0, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    micro = t.global_batch_size // t.micro_batch_size
    rows = []
    for step in range(t.train_steps):
        batch = torch.from_numpy(trainer.data.train_batch(step))
        ours = trainer.train_step()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for chunk in batch.chunk(micro):
            loss, total = plain(chunk[:, :-1], chunk[:, 1:])
            (total / micro).backward()
            loss_sum += loss.item() / micro
        torch.nn.utils.clip_grad_norm_(plain.parameters(), t.clip_grad)
        opt.step()
        rows.append({"megatron": ours["loss"], "plain": loss_sum, "lr_megatron": ours["lr"], "lr_plain": lr_at(step, t)})
    json.dump(rows, open(out_path, "w"))


if __name__ == "__main__":
    main()
