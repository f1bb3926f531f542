r"""The default job: a CIFAR-style ResNet-20 on scikit-learn's bundled handwritten digits, on CPU.

Run:
  python train.py --config configs/default.py --workdir runs/default
Smoke test (same config, a few steps):
  python train.py --config configs/default.py --workdir /tmp/smoke --config.num_train_steps=30

Expect: >= 98% test accuracy on the 360 held-out digits in a few minutes on 2 CPU cores
(see the README's "Training" section for the measured accuracy and wall time).

The digits are 8x8 grey scans. They are upsampled to 16x16 so that ResNet-20's three stages see 16x16, 8x8
and 4x4 maps, and trained without augmentation: flips and crops change what a digit is.
"""

from resnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "cifar_resnet20"
    config.dataset = "digits"
    config.image_size = 16
    config.augment = "none"

    config.batch_size = 64
    config.num_epochs = 15.0
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.nesterov = True
    # The linear scaling rule (Goyal et al. 2017): 0.1 per 256 examples.
    config.learning_rate = 0.1 * config.batch_size / 256
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    config.weight_decay = 5e-4
    config.label_smoothing = 0.1

    config.log_every_steps = 20
    config.eval_every_steps = 0  # every epoch
    config.checkpoint_every_steps = 0  # every epoch
    return config
