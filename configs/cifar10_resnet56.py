r"""ResNet-56 on CIFAR-10: the recipe of He et al. 2016, section 4.2.

Run (prepare the data once: `python -m resnet_jax.data.prepare cifar10`, see the README's Data section):
  python train.py --config configs/cifar10_resnet56.py --workdir runs/cifar10_resnet56

Expect: about 93.0% test accuracy (the paper reports 6.97% error; not measured in this repository).
Batch 128, SGD momentum 0.9, lr 0.1 divided by 10 at 32k and 48k iterations, 64k iterations in all, weight
decay 1e-4, 4-pixel pad + random 32x32 crop + horizontal flip, per-channel normalization.
"""

from resnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "cifar_resnet56"
    config.dataset = "cifar10"
    config.train_split = "train"
    config.image_size = 32
    config.augment = "cifar"
    config.crop_padding = 4
    config.normalization = "dataset"

    config.batch_size = 128
    config.num_train_steps = 64_000  # iterations, as the paper counts them
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.nesterov = False
    config.learning_rate = 0.1
    config.lr_schedule = "step"
    config.lr_decay_steps = (32_000, 48_000)
    config.lr_decay_factor = 0.1
    config.weight_decay = 1e-4
    config.label_smoothing = 0.0

    config.log_every_steps = 100
    config.eval_every_steps = 2_000
    config.checkpoint_every_steps = 2_000
    return config
