"""Packaging: the top-level `kernels/` and `csrc/` folders ship as `erpo_fast.kernels` and `erpo_fast.csrc`.

PyPI already owns the import name `kernels` (Hugging Face kernel hub), so our kernels are never importable
under that name. csrc/ holds C++/CUDA sources that are compiled on first use (torch.utils.cpp_extension.load)
and cached, so installing never needs a second torch inside an isolated build environment.
"""

from setuptools import find_packages, setup

kernel_packages = ["erpo_fast.kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]

setup(
    packages=find_packages(include=["erpo_fast", "erpo_fast.*"]) + kernel_packages + ["erpo_fast.csrc"],
    package_dir={"erpo_fast.kernels": "kernels", "erpo_fast.csrc": "csrc"},
    package_data={"erpo_fast.csrc": ["*.cpp", "*.cu", "*.h"]},
    include_package_data=False,
)
