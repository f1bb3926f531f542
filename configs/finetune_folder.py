r"""Fine-tune torchvision's ImageNet ResNet-50 on your own folder of images (root/<class>/*.jpg).

Run, from a checkout (the first line needs network access once, to download torchvision's weights):
  python -c "import torch, torchvision; torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V2').state_dict(), 'resnet50.pth')"
  python -m resnet_jax.convert from-torch resnet50.pth ckpt/resnet50
  python train.py --config configs/finetune_folder.py --workdir runs/finetune \
      --config.init_from=ckpt/resnet50 --config.dataset=folder:/path/to/root
and, to take the fine-tuned network back to PyTorch:
  python -m resnet_jax.convert to-torch runs/finetune resnet50_finetuned.safetensors

The folder is root/<class>/<image> (10% of each class held out for eval) or root/train/<class>/... plus
root/val/<class>/...; the number of classes comes from the folder. The classifier (`fc`) is new, sized for those
classes; every other parameter and BatchNorm statistic comes from the checkpoint, and a checkpoint that does not
fit (another architecture, other widths) fails with one error listing every differing path.

Modes (`--config.finetune_mode=...`): "full" (default: everything trains, the backbone at
`backbone_lr_multiplier` x the head's learning rate), "frozen_bn" (the same, but BatchNorm keeps ImageNet's
running statistics: better for small batches), "linear_probe" (only the classifier trains; the backbone and its
statistics stay bit-identical). For a linear probe raise the learning rate, e.g. `--config.learning_rate=0.1`.

Inputs: torchvision's ImageNet recipe (random-resized crop 224 + flip for training; resize 256, center crop 224
for eval) and ImageNet's mean/std normalization, which is what the converted weights expect. Expect one epoch of
a 10,000-image folder to take minutes on one GPU with `--config.dtype=bfloat16`, hours on CPU; add
`--config.num_workers=8` (Grain worker processes) when JPEG decoding is the bottleneck.
"""

from resnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "resnet50"
    # Where the convert command above writes; a missing checkpoint is an error, never a silent scratch run.
    config.init_from = "ckpt/resnet50"
    config.finetune_mode = "full"
    config.backbone_lr_multiplier = (
        0.1  # the pretrained backbone moves 10x slower than the new head
    )

    config.dataset = (
        "folder:/path/to/root"  # set on the command line: --config.dataset=folder:/your/images
    )
    config.image_size = 224
    config.augment = "imagenet"
    config.normalization = "imagenet"  # the statistics the torchvision weights were trained with
    config.num_workers = 4

    config.batch_size = 64
    config.num_epochs = 10.0
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.nesterov = True
    # The linear scaling rule at a tenth of the from-scratch rate (0.1 per 256): the backbone starts trained.
    config.learning_rate = 0.01 * config.batch_size / 256
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1

    config.log_every_steps = 20
    config.eval_every_steps = 0  # every epoch
    config.checkpoint_every_steps = 0  # every epoch
    return config
