"""Package layout that pyproject.toml alone cannot say: the CUDA sources live in the top-level
`cuda_ops/` folder (beside the Python packages, as the kernels' home) and install as the data
package `vrwkv_core.cuda_ops`, so a wheel and an editable install both find them with
importlib.resources and nothing claims a top-level `cuda_ops` name in site-packages."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["vrwkv_core", "vrwkv_core.*", "vrwkv_cli", "vrwkv_cli.*"]) + ["vrwkv_core.cuda_ops"],
    package_dir={"vrwkv_core.cuda_ops": "cuda_ops"},
)
