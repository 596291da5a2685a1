"""kd_jax: knowledge distillation toward edge devices, in JAX/Flax."""
import pathlib
import re

from setuptools import find_packages, setup

_HERE = pathlib.Path(__file__).parent
_VERSION = re.search(r'__version__ = "([^"]+)"',
                     (_HERE / "kd_jax" / "__init__.py").read_text()).group(1)

# Versions verified together on Python 3.11 (CPU). Accelerator users install the
# matching jax[cuda12] / jax[tpu] wheel of the same version on top.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "ai-edge-litert==2.3.0",
    "numpy>=2.0",
    "scikit-learn>=1.4",  # ships the offline digits dataset of the default run
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",  # the plots of `kd-jax report` and `kd-jax profile`
    # oneDNN's convolutions for the CPU training path: `kd_jax.models.onednn` compiles
    # its XLA FFI handlers against these on first use (a C++ compiler is needed; without
    # one, or elsewhere, XLA's own convolutions run).
    *(f'{name}==2023.2.0; platform_system == "Linux" and platform_machine == "x86_64"'
      for name in ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")),
]

setup(
    name="kd_jax",
    version=_VERSION,
    description="Knowledge distillation toward edge devices in JAX/Flax: "
                "distill, compress, export to TFLite and measure.",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # experiments/ ships inside the package so the embedded default runs anywhere.
    packages=find_packages(include=["kd_jax", "kd_jax.*"]) + ["kd_jax.experiments"],
    package_dir={"kd_jax.experiments": "experiments"},
    package_data={"kd_jax.models": ["native/*.cc"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
                 # tests/test_notebooks.py executes notebooks/*.ipynb
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
    },
    entry_points={"console_scripts": ["kd-jax=kd_jax.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
