r"""Semantic segmentation of digit canvases on the default run's backbone: FPN + head, trained on CPU.

NOT RUNNABLE YET: the trainer does not dispatch on a task and has no "digit_canvases" dataset yet (training
stops at the dataset lookup). The keys it will need are in `PENDING_KEYS` below, not yet in
`resnet_jax.config.base_config()`, so this recipe validates today; the integration adds them to the schema
and moves them into `get_config()`.

Run (after integration; the first line is the default classification run whose backbone this starts from):
  python train.py --config configs/default.py --workdir runs/default
  python train.py --config configs/segmentation_digits.py --workdir runs/seg --config.init_from=runs/default
Baseline for the benefit of pretraining (the same head on a random backbone):
  python train.py --config configs/segmentation_digits.py --workdir runs/seg_scratch

Data: `resnet_jax.dense.canvases.DigitCanvases`: 2-4 of scikit-learn's digits, 12-24 px, on a 64x64 canvas
over faint noise; label map 0 (background) or digit + 1. Train, validation and test canvases draw from
disjoint digit images (test from the digits' fixed test split). Normalized with the digits' own statistics,
which is what the pretrained backbone saw.

Expect: the measured mean IoU on the test canvases and the wall time on 2 CPU cores go here and in the
README once the integrated command has run (not measured yet). Measured so far, one train step at global
batch 32 (cifar_resnet20 backbone, FPN/head 32 channels) on 2 busy CPU cores: 0.63 s at 48x48 canvases,
2.8 s at 64x64 (the CIFAR stem keeps stage1 at full resolution); the first compile takes 1.5-3 min with
conv autotuning. So the smoke mode below uses 48 px canvases; a full run at 64 px wants a GPU or more cores.
"""

from resnet_jax.config import base_config

# Keys the integration adds to base_config(), with this recipe's values.
PENDING_KEYS = {
    "task": "segmentation",  # "classification" (default) | "segmentation"
    "fpn_channels": 32,  # FPN width (64 in the tiny example of the issue)
    "head_channels": 32,  # per-level conv width of the segmentation head
    "head_norm": "group",  # "group" (no state; small batches) | "batch"
    "canvas_size": 48,  # canvas side = model input (image_size follows it)
    "canvas_digit_sizes": (10, 20),  # digit side range in px (the backbone saw 16 px digits)
    "canvas_train_examples": 4096,  # canvases per split (generated on access, deterministic)
    "canvas_eval_examples": 512,  # validation and test canvases each
    "best_metric": "eval_mean_iou",  # keep-best ranks by mean IoU, not eval_accuracy
}


def get_config():
    config = base_config()
    # The backbone: the default run's network, so --config.init_from=runs/default fits it.
    config.model = "cifar_resnet20"

    config.dataset = "digit_canvases"  # a new dataset name: resnet_jax.dense.canvases
    config.image_size = 48  # = PENDING_KEYS["canvas_size"]
    config.augment = "none"  # flips change what a digit is; canvases are already randomly laid out
    config.normalization = "dataset"  # the digits' train statistics (DigitCanvases.stats)
    config.eval_split = "validation"

    # Fine-tuning from a classifier: the backbone at a tenth of the new layers' learning rate. With
    # init_from, "frozen_bn" keeps the classifier's BN statistics (batches of mostly background skew
    # them) and "linear_probe" freezes the backbone; "full" also trains from scratch (the baseline).
    config.finetune_mode = "full"
    config.backbone_lr_multiplier = 0.1

    config.batch_size = 32
    config.num_epochs = 3.0  # 384 steps
    config.optimizer = "adamw"
    config.learning_rate = 1e-3 * config.batch_size / 32  # linear scaling from 1e-3 at batch 32
    config.weight_decay = 1e-4
    config.lr_schedule = "cosine"
    config.warmup_epochs = 0.25
    config.label_smoothing = 0.0  # per-pixel cross-entropy takes no smoothing

    config.log_every_steps = 20
    config.eval_every_steps = 128
    config.checkpoint_every_steps = 128
    return config
