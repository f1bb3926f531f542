"""torchvision (and timm) ResNet weights <-> resnet_jax variables, exact both ways.

- `mapping`: the key and layout table (derived from `models.py`), `torchvision_to_flax` /
  `flax_to_torchvision`, and `infer_architecture` (which resnet_jax model some weights are).
- `timm`: timm's own names for its variants (ResNet-D, SE-ResNet, ResNetV2, BiT) and how to recognize them.
- `formats`: the files: torch state dicts (.pth/.pt read only with `weights_only=True`; .safetensors without
  torch) and resnet_jax variables checkpoints, each output replaced atomically.
- `cli`: the command line (`python -m resnet_jax.convert --help`):

  python -m resnet_jax.convert from-torch resnet50.pth ckpt/resnet50        # .pth/.pt/.safetensors -> Orbax
  python -m resnet_jax.convert to-torch ckpt/resnet50 resnet50_ft.safetensors  # Orbax -> .pth/.safetensors
  python -m resnet_jax.convert from-torch timm_resnet50d.pth ckpt/resnet50d --model resnet50d  # timm's names

Converting never imports Grain (nor torch, unless a torch file is read or written).
"""

from resnet_jax.convert.cli import main
from resnet_jax.convert.formats import (
    CheckpointFileError,
    load_state_dict_file,
    load_variables_checkpoint,
    save_state_dict_file,
    save_variables_checkpoint,
)
from resnet_jax.convert.mapping import (
    ConversionError,
    flax_to_torchvision,
    infer_architecture,
    torchvision_to_flax,
)

__all__ = [
    "CheckpointFileError",
    "ConversionError",
    "flax_to_torchvision",
    "infer_architecture",
    "load_state_dict_file",
    "load_variables_checkpoint",
    "main",
    "save_state_dict_file",
    "save_variables_checkpoint",
    "torchvision_to_flax",
]
