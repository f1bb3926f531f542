r"""ResNet-50 on ImageNet-1k: torchvision's "how to train state-of-the-art models" recipe (its IMAGENET1K_V2 weights).

Run (prepare the data once: `python -m resnet_jax.data.prepare imagenet2012`, see the README's Data section):
  python train.py --config configs/imagenet_resnet50_v2recipe.py --workdir runs/imagenet_resnet50_v2recipe \
      --config.data_dir=/path/to/tensorflow_datasets
On a pod or several hosts add --coordinator_address/--num_processes/--process_id (auto on TPU and SLURM).

Not run in this repository (no ImageNet, no accelerator here): its accuracy here is unmeasured. torchvision
reports 80.858% top-1 / 95.434% top-5 for its weights trained with this recipe (evaluated at resize 232, center
crop 224): 600 epochs on 8 GPUs x 128 images, i.e. days on a pod slice.

torchvision's command (references/classification):
  torchrun --nproc_per_node=8 train.py --model resnet50 --batch-size 128 --lr 0.5 \
    --lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear \
    --auto-augment ta_wide --epochs 600 --random-erase 0.1 --weight-decay 0.00002 \
    --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0 \
    --train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4

Every flag above but the sampler's has its key below (values checked against torchvision's references/classification README
and presets.py: RandomResizedCrop(176) + flip + TrivialAugmentWide (bilinear) + Normalize + RandomErasing(0.1);
eval Resize(232) + CenterCrop(224)). Differences from torchvision's run:
- EMA: torchvision updates every 32 steps with decay 1 - (1 - 0.99998) * 1024 * 32 / 600 (its adjustment
  to batch size and epochs) and resets the EMA to the model during warmup; here the EMA is updated every
  step with the per-step equivalent decay (that decay ** (1 / 32)), from step 0. It is computed for global
  batch 1024 and 600 epochs: recompute it if you override either.
- Warmup starts at lr 0, torchvision's at 0.01 x lr (--lr-warmup-decay 0.01).
- The learning rate moves every step; torchvision's warmup and cosine step once per epoch (its scheduler
  is stepped at each epoch's end), so its lr is constant within an epoch.
- Weight decay skips BN parameters (as --norm-weight-decay 0.0) and also biases (the classifier's bias only).
- Mixup/CutMix mix the global batch (topology independent); torchvision mixes each GPU's 128 images.
- Repeated augmentation (--ra-sampler --ra-reps 4) is not implemented; it is optional and off here.
"""

from resnet_jax.config import base_config

GLOBAL_BATCH_SIZE = 1024
NUM_EPOCHS = 600.0
# torchvision's EMA: decay 0.99998 adjusted by batch * ema_steps / epochs, applied every 32 steps.
EMA_STEPS = 32
EMA_DECAY_PER_UPDATE = 1.0 - min(1.0, (1.0 - 0.99998) * GLOBAL_BATCH_SIZE * EMA_STEPS / NUM_EPOCHS)


def get_config():
    config = base_config()
    config.model = "resnet50"
    config.dataset = "imagenet2012"
    config.train_split = "train"
    config.eval_split = "validation"
    config.image_size = 176  # train resolution (FixRes: train low, evaluate higher)
    config.eval_image_size = 224  # eval center crop ...
    config.eval_crop_fraction = 224 / 232  # ... of the image resized to 232
    config.augment = "imagenet"  # random-resized crop + horizontal flip
    config.auto_augment = "trivial_augment"  # TrivialAugmentWide, after crop and flip
    config.random_erasing_prob = 0.1  # after normalization, erased to 0 (the mean)
    config.normalization = "imagenet"
    config.num_workers = 8

    config.batch_size = GLOBAL_BATCH_SIZE  # global; 128 per device on 8 devices, as torchvision
    config.num_epochs = NUM_EPOCHS
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.nesterov = False
    config.learning_rate_per_256 = 0.125  # 0.5 at batch 1024; follows --config.batch_size
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5.0
    config.weight_decay = (
        2e-5  # kernels only: no decay on BN parameters (torchvision: norm layers 0)
    )
    config.label_smoothing = 0.1
    config.mixup_alpha = 0.2
    config.cutmix_alpha = 1.0
    config.mix_prob = 1.0  # every batch is mixed ...
    config.switch_prob = 0.5  # ... by mixup or CutMix with equal odds (RandomChoice)
    config.ema_decay = EMA_DECAY_PER_UPDATE ** (1.0 / EMA_STEPS)  # per step; see the docstring

    config.log_every_steps = 100
    config.eval_every_steps = 0  # every epoch
    config.checkpoint_every_steps = 0  # every epoch
    return config
