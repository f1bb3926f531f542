"""resnet_jax: ResNets in JAX/Flax, torchvision-exact, with the training system around them."""

from resnet_jax.models import ResNet, create_model, list_models

__all__ = ["ResNet", "create_model", "list_models"]
__version__ = "0.1.0"
