"""`python -m resnet_jax.convert ...`: see `resnet_jax.convert.cli`."""

import sys

from resnet_jax.convert.cli import main

sys.exit(main())
