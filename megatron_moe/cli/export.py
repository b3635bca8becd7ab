"""`megatron-moe export`: a trained run in another tool's format."""

from __future__ import annotations

import argparse

EXPORT_EPILOG = """examples:
  megatron-moe export hf runs/tiny_moe -o runs/tiny_moe-hf      # then: AutoModelForCausalLM.from_pretrained(...)
  lm_eval --model hf --model_args pretrained=runs/tiny_moe-hf --tasks hellaswag   # on a GPU machine
"""


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained run as a Hugging Face model (dense: Llama, MoE: Mixtral)",
        description="Write a run directory's newest verified checkpoint (trained under any parallel layout) as a "
        "Hugging Face model: config.json, model.safetensors and, when the run's tokenizer is a tokenizer.json, "
        "the tokenizer. Dense models become Llama, MoE models Mixtral; a model neither can express exactly "
        "(a shared expert, dense layers between MoE layers, sigmoid or non-renormalised routing, the "
        "aux-loss-free expert bias, a capacity factor) is refused, saying why.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", choices=["hf"], help="hf: Hugging Face transformers")
    p.add_argument("run_dir", help="run directory (train.output_dir) with a checkpoint")
    p.add_argument("-o", "--output-dir", required=True, help="new directory for the exported model")
    p.set_defaults(func=export_main)


def export_main(args: argparse.Namespace) -> int:
    from megatron_moe.export.hf import export_hf

    out = export_hf(args.run_dir, args.output_dir)
    print(f"wrote {out} (load with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0
