"""Packaging: the top-level `kernels/` and `csrc/` folders ship as `erpo_fast.kernels` and `erpo_fast.csrc`.

PyPI already owns the import name `kernels` (Hugging Face's kernel hub, imported by transformers), so our
kernels are never importable under that name: `kernels/` has no `__init__.py` (a namespace folder never
shadows a regular package, even from the repository root) and installs as the namespace package
`erpo_fast.kernels` with its ops `erpo_fast.kernels.fused_linear` and `erpo_fast.kernels.sampling`. csrc/ holds
C++/CUDA sources that are compiled on first use (torch.utils.cpp_extension.load) and cached, so installing never
needs a second torch inside an isolated build environment.
"""

from setuptools import find_packages, setup

kernel_packages = ["erpo_fast.kernels"] + ["erpo_fast.kernels." + p for p in find_packages(where="kernels")]

setup(
    packages=find_packages(include=["erpo_fast", "erpo_fast.*"]) + kernel_packages + ["erpo_fast.csrc"],
    package_dir={"erpo_fast.kernels": "kernels", "erpo_fast.csrc": "csrc"},
    package_data={"erpo_fast.csrc": ["*.cpp", "*.cu", "*.h"]},
    include_package_data=False,
)
