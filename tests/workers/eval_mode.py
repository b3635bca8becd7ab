"""Worker for tests/train/test_trainer.py::test_evaluation_*: evaluates a fresh trainer once and reports the
model's mode during and after evaluation, the tokens evaluated and a digest of the batches it evaluated."""

import hashlib
import json
import sys


def main() -> None:
    from megatron_moe.config import load_run_config
    from megatron_moe.train.trainer import Trainer

    out_path, overrides = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_run_config(None, overrides), quiet=True)
    modes, seen = [], []
    for module in trainer.chunks[0].modules():
        if type(module).__name__ == "GPTModel":
            module.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    run_schedule = trainer._run_schedule

    def recording(batch, forward_only):  # the batches evaluate() actually runs
        seen.append(batch.tobytes())
        return run_schedule(batch, forward_only)

    trainer._run_schedule = recording
    ev = trainer.evaluate()
    digest = hashlib.sha256(b"".join(seen)).hexdigest()
    json.dump({"modes": modes, "training_after": trainer.chunks[0].training, "val_tokens": ev["val_tokens"],
               "valid_tokens": trainer.data.valid.num_tokens, "digest": digest}, open(out_path, "w"))


if __name__ == "__main__":
    main()
