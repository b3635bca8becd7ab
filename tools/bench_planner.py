"""Benchmark the budget planner: ledger plus active/total/flops-matched dense configs for random configs.

    .venv/bin/python tools/bench_planner.py            # 1,000 configs
    .venv/bin/python tools/bench_planner.py --n 10000
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from megatron_moe.config import ModelConfig, MoEConfig
from megatron_moe.planner.family import equal_resources_family
from megatron_moe.planner.ledger import ledger
from megatron_moe.planner.match import CONTRACTS, match_dense


def random_configs(n: int, seed: int = 0) -> list[tuple[ModelConfig, int]]:
    """`n` valid (model config, tensor-parallel size) pairs, dense and MoE, tiny to 100B-scale."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        heads = rng.choice([4, 8, 16, 32, 64])
        head_dim = rng.choice([32, 64, 128])
        kv = rng.choice([g for g in (1, 2, 4, 8, heads) if heads % g == 0])
        tensor = rng.choice([t for t in (1, 2, 4, 8) if kv % t == 0])
        hidden = heads * head_dim
        layers = rng.randint(2, 64)
        ffn = max(8 * tensor, round(hidden * rng.uniform(2.0, 4.0) / (8 * tensor)) * 8 * tensor)
        moe = MoEConfig()
        if rng.random() < 0.7:
            experts = rng.choice([4, 8, 16, 32, 64, 128])
            top_k = rng.choice([k for k in (2, 4, 8) if k <= experts])
            expert_ffn = max(8 * tensor, ffn // rng.choice([1, 2, 4, 8]) // (8 * tensor) * 8 * tensor)
            moe = MoEConfig(num_experts=experts, top_k=top_k, expert_ffn_hidden_size=expert_ffn,
                            shared_expert_ffn_hidden_size=rng.choice([0, expert_ffn, 2 * expert_ffn]),
                            first_k_dense=rng.choice([0, 0, 1, 2]) % layers, every_n=rng.choice([1, 1, 2]))
        out.append((ModelConfig(
            vocab_size=rng.choice([4096, 32000, 50257, 65536, 128256]), seq_length=rng.choice([256, 2048, 8192]),
            num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=kv,
            ffn_hidden_size=ffn, normalization=rng.choice(["RMSNorm", "LayerNorm"]),
            activation=rng.choice(["swiglu", "gelu"]), tie_embeddings=rng.random() < 0.3, moe=moe,
        ), tensor))
    return out


def bench(n: int = 1000, seed: int = 0) -> float:
    """Seconds to plan `n` configs: the ledger and the three matched dense configs of each."""
    configs = random_configs(n, seed)
    start = time.perf_counter()
    for m, tensor in configs:
        ledger(m, tensor)
        for contract in CONTRACTS:
            match_dense(m, contract, tensor)
    return time.perf_counter() - start


def bench_family(n: int = 10, seed: int = 0) -> float:
    """Seconds per equal-resources family (r_a 0.1..0.3, top-k 2..8, up to 256 experts)."""
    configs = [m for m, _ in random_configs(4 * n, seed) if m.is_moe][:n]
    start = time.perf_counter()
    for m in configs:
        equal_resources_family(m, (m.moe.top_k / m.moe.num_experts,), r_a_rel_tolerance=10.0)
    return (time.perf_counter() - start) / len(configs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="configs to plan (default 1000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats; the best is reported (default 5)")
    args = parser.parse_args()
    bench(min(args.n, 100))  # warm-up
    times = sorted(bench(args.n) for _ in range(args.repeat))
    best, median = times[0], times[len(times) // 2]
    print(f"planned {args.n:,} configs (ledger + active/total/flops matches): best {best:.3f} s "
          f"({args.n / best:,.0f} configs/s), median {median:.3f} s of {args.repeat} repeats")
    print(f"equal-resources family: {1000 * bench_family():.1f} ms each")


if __name__ == "__main__":
    main()
