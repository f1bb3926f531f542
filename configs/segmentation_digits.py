r"""Semantic segmentation of digit canvases on the default run's backbone: FPN + head, trained on CPU.

Run (the first line is the default classification run whose backbone this starts from):
  python train.py --config configs/default.py --workdir runs/default
  python train.py --config configs/segmentation_digits.py --workdir runs/seg --config.init_from=runs/default
Baseline for the benefit of pretraining (the same model from a random backbone, trained at the head's rate):
  python train.py --config configs/segmentation_digits.py --workdir runs/seg_scratch \
    --config.backbone_lr_multiplier=1.0
Smoke test (same config, a few steps):
  python train.py --config configs/segmentation_digits.py --workdir /tmp/seg_smoke --config.num_train_steps=10

Data: `resnet_jax.dense.canvases.DigitCanvases`, the dataset "digit_canvases": 2-4 of scikit-learn's digits,
upsampled to `canvas_digit_sizes` px, on a `canvas_size` canvas over faint noise; label map 0 (background)
or digit + 1. Train, validation and test canvases draw from disjoint digit images (test from the digits'
fixed test split, which the default run never trained on). Normalized with the digits' own statistics,
which is what the pretrained backbone saw. The run writes `predictions.png` (input, truth, prediction for
the first validation canvases) to its workdir at the end; mIoU is in metrics.jsonl and curves.png.

Measured (2026-12-01, AMD EPYC, 2 cores shared with other jobs: load average 9-14, both runs at once):
test mIoU over the 256 test canvases (11 classes, background included) after 384 steps
  from runs/default (test accuracy 98.89%)         0.696  (validation 0.369 / 0.667 / 0.704 at steps 128/256/384)
  random backbone, backbone_lr_multiplier=1.0      0.713  (validation 0.282 / 0.638 / 0.747)
Pretraining leads while the head is young and is caught up by 384 steps: at this length the measured
benefit is in the early steps only (README, "Segmentation on the backbone"). Each run took 19.5 min wall
under that load, 214 s user + 58 s system CPU; the 2-idle-core wall time was not measured. Picture:
<workdir>/predictions.png (measured in runs/seg_v2 and runs/seg_v2_scratch; runs/ is not committed).
"""

from resnet_jax.config import base_config


def get_config():
    config = base_config()
    config.task = "segmentation"
    # The backbone: the default run's network, so --config.init_from=runs/default fits it.
    config.model = "cifar_resnet20"
    config.fpn_channels = 32
    config.head_channels = 32
    config.head_norm = "group"  # no state; right for small batches of mostly background

    config.dataset = "digit_canvases"
    config.canvas_size = 32
    config.image_size = config.canvas_size  # the canvas is the model input
    # The default run's backbone saw 16 px digits: canvases of digits around that size.
    config.canvas_digit_sizes = (12, 20)
    config.canvas_train_examples = 2048  # canvases are generated on access, deterministically
    config.canvas_eval_examples = 256  # validation and test canvases each
    config.augment = "none"  # flips change what a digit is; canvases are already randomly laid out

    # Fine-tuning from a classifier: the backbone at 0.3 x the new layers' learning rate. With
    # init_from, "frozen_bn" keeps the classifier's BN statistics and "linear_probe" freezes the backbone.
    config.finetune_mode = "full"
    config.backbone_lr_multiplier = 0.3

    config.batch_size = 32
    config.num_epochs = 6.0  # 384 steps
    config.optimizer = "adamw"
    config.learning_rate_per_256 = 2.4e-2  # 3e-3 at batch 32, applied to the run's batch size
    config.weight_decay = 1e-4
    config.lr_schedule = "cosine"
    config.warmup_epochs = 0.25
    config.best_metric = "eval_mean_iou"  # keep-best ranks checkpoints by mean IoU

    config.log_every_steps = 20
    config.eval_every_steps = 128
    config.checkpoint_every_steps = 128
    return config
