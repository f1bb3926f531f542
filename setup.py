"""The one compiled piece: region-of-interest JPEG decoding against the system's libjpeg-turbo.

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler or
libjpeg-turbo's headers (Debian/Ubuntu: `apt install libjpeg-dev`; macOS: `brew install jpeg-turbo`) the
build prints why it skipped it and the package installs without it; the training crop then decodes whole
images (resnet_jax/data/jpeg.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "resnet_jax.data._jpeg_region",
            sources=["resnet_jax/data/_jpeg_region.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
