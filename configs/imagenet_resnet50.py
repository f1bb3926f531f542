r"""ResNet-50 on ImageNet-1k: the standard 90-epoch recipe (Goyal et al. 2017, as torchvision trains it).

Run (prepare the data once: `python -m resnet_jax.data.prepare imagenet2012`, see the README's Data section):
  python train.py --config configs/imagenet_resnet50.py --workdir runs/imagenet_resnet50 \
      --config.data_dir=/path/to/tensorflow_datasets
On a pod or several hosts add --coordinator_address/--num_processes/--process_id (auto on TPU and SLURM).

Expect: about 76-77% top-1 on the validation set after 90 epochs (the published figure for this recipe; not
measured in this repository). SGD with Nesterov momentum 0.9, peak lr 0.1 x batch/256 after 5 linear warmup
epochs, cosine decay to 0, weight decay 1e-4 on kernels only (not BN or biases), label smoothing 0.1, bf16 compute.
"""

from resnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "resnet50"
    config.dataset = "imagenet2012"
    config.train_split = "train"
    config.eval_split = "validation"
    config.image_size = 224
    config.augment = "imagenet"
    config.normalization = "imagenet"
    config.num_workers = 8
    config.dtype = "bfloat16"

    config.batch_size = 1024  # global; 128 per device on 8 devices
    config.num_epochs = 90.0
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.nesterov = True
    # The linear scaling rule: 0.1 per 256 examples (Goyal et al. 2017).
    config.learning_rate = 0.1 * config.batch_size / 256
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5.0
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1

    config.log_every_steps = 100
    config.eval_every_steps = 0  # every epoch
    config.checkpoint_every_steps = 0  # every epoch
    return config
