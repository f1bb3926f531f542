r"""WRN-28-10 on CIFAR-10: the recipe of Zagoruyko & Komodakis 2016 ("Wide Residual Networks"), section 4.

Run (prepare the data once: `python -m resnet_jax.data.prepare cifar10`, see the README's Data section):
  python train.py --config configs/cifar10_wrn28_10.py --workdir runs/cifar10_wrn28_10

Not run in this repository. Expect about 96.0% test accuracy (the paper reports 4.00% error for WRN-28-10 with
dropout 0.3, 4.17% without; median of 5 runs), i.e. 200 epochs of a 36.5M-parameter net (36,479,194 here):
hours on one modern GPU, days on CPU.

The paper's recipe: batch 128, SGD with Nesterov momentum 0.9, lr 0.1 multiplied by 0.2 at epochs 60, 120 and
160, 200 epochs, weight decay 5e-4, dropout 0.3 between the two convs of each block, random crops of the image
padded by 4 pixels and horizontal flips, per-channel mean/std normalization.
Differences from the paper: it pads by reflection, the "cifar" augmentation here pads with zeros; its weight
decay (Torch's optim.sgd) also decays BatchNorm parameters and biases, ours only kernels.
Dropout 0.3 is `config.dropout_rate` (the step draws its masks from (seed, step, device)).
Model selection: validation is 10% of the train split held out by index hash; the test split is reported once
at the end (`test_accuracy`), as the paper's error rates are.
"""

from resnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "wide_resnet28_10"
    config.dataset = "cifar10"
    config.train_split = "train"
    config.image_size = 32
    config.augment = "cifar"
    config.crop_padding = 4
    config.normalization = "dataset"

    config.batch_size = 128
    config.num_epochs = 200.0
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.nesterov = True
    config.learning_rate = 0.1
    config.lr_schedule = "step"
    config.warmup_epochs = 0.0
    config.lr_decay_epochs = (60, 120, 160)
    config.lr_decay_factor = 0.2
    config.weight_decay = 5e-4
    config.label_smoothing = 0.0
    config.dropout_rate = 0.3

    config.log_every_steps = 100
    return config
