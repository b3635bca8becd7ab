"""The training monitors against quantities computed independently of them."""

from __future__ import annotations

import torch

from megatron_moe.config import ModelConfig, MoEConfig, ParallelConfig


def test_expert_load_equals_the_top_k_of_the_router_logits_on_a_fixed_batch(single_process):
    """The monitor's per-layer loads are the counts of each expert among the top-k logits of every token,
    recomputed here from each router's input and weight; evaluation passes are not counted."""
    from megatron_moe.model import build_model
    from megatron_moe.train.monitors import ExpertLoadMonitor

    cfg = ModelConfig(vocab_size=1000, seq_length=16, num_layers=3, hidden_size=64, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=128,
                      moe=MoEConfig(num_experts=8, top_k=3, expert_ffn_hidden_size=32, first_k_dense=1))
    model = build_model(cfg, ParallelConfig())
    monitor = ExpertLoadMonitor(model, cfg.num_layers, 8, 3)
    inputs = {}
    for router in monitor.routers:
        router.register_forward_pre_hook(lambda r, args: inputs.__setitem__(r.layer_number - 1, args[0].detach()))
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(cfg.seq_length).expand(4, -1)

    model.eval()
    with torch.no_grad():
        model(tokens, positions, None)
    model.train()
    assert monitor.collect() == {}  # nothing counted in eval mode

    model(tokens, positions, None, labels=tokens).sum().backward()
    got = monitor.collect()
    expected = []
    for layer in (1, 2):
        router = next(r for r in monitor.routers if r.layer_number - 1 == layer)
        logits = inputs[layer].reshape(-1, 64).float() @ router.weight.detach().float().t()
        counts = torch.bincount(logits.topk(3, dim=-1).indices.flatten(), minlength=8).double()
        assert counts.sum() == 4 * 16 * 3
        expected.append(counts / counts.sum())
    assert len(got["expert_load"]) == 2  # the dense first layer has no router
    for row, want in zip(got["expert_load"], expected):
        assert torch.allclose(torch.tensor(row, dtype=torch.float64), want, atol=1e-5), (row, want)
    imbalance = [float(w.max() / w.mean()) for w in expected]
    assert got["layer_imbalance"] == [round(x, 4) for x in imbalance]
    assert abs(got["load_imbalance"] - sum(imbalance) / 2) < 1e-9
    assert got["dropped_fraction"] == 0.0
    assert max(imbalance) > 1.0  # a fixed random batch is not perfectly balanced: the comparison has teeth


def test_peak_flops_by_exact_device_name():
    """Parts of one chip differ (SXM, PCIe, NVL): a substring match would give the PCIe and NVL parts the SXM peak."""
    from megatron_moe.train.monitors import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", fp8=False) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", fp8=False) == 756e12
    assert peak_flops("NVIDIA H100 NVL", fp8=False) == 835e12
    assert peak_flops("NVIDIA H200", fp8=False) == 989e12
    assert peak_flops("NVIDIA H200 NVL", fp8=True) == 2 * 835e12
    assert peak_flops("NVIDIA H100 SXM-like prototype", fp8=False) is None
