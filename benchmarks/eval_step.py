"""Eval (inference) throughput, images/s: our jitted forward vs torchvision + PyTorch, side by side.

    python benchmarks/eval_step.py            # resnet18/resnet50 x 32/128 px, float32
    python benchmarks/eval_step.py --quick    # resnet18 at 32 px, float32

Same cases, flags and rules as train_step.py, timing `model.apply(variables, x, train=False)` under `jax.jit`
against `model.eval()` under `torch.inference_mode()` (and `torch.compile` for `--torch_compile` models).
Writes `<results_dir>/eval_step.json`.
"""

from __future__ import annotations

import train_step


def main() -> None:
    train_step.run_cases(train_step.parse_args(__doc__, name="eval_step"), "eval")


if __name__ == "__main__":
    main()
