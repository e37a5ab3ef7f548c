from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="selectivemae-ds",
    version="0.1.0",
    description="DeepSpeed pretraining toolkit for remote-sensing foundation models (SelectiveMAE, MAE, CrossMAE)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["selectivemae_ds", "selectivemae_ds.*", "data_prep", "data_prep.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "deepspeed>=0.16",
        "nvidia-dali-cuda130>=2.0",
        "zarr>=3.0",
        "numcodecs>=0.13",
        "tensorboard",
        "numpy",
        "pillow>=10",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        # CUDA 12 clusters: install with --no-deps for DALI or uninstall the cuda130 build first.
        "cuda12": ["nvidia-dali-cuda120>=1.50"],
        "flash": ["flash-attn>=2.5"],
        "test": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={
        "console_scripts": [
            "smae-pack=data_prep.cli:main",
            "smae-bench=selectivemae_ds.benchmark.cli:main",
            "smae-pretrain=selectivemae_ds.trainer:main",
            "smae-eval=selectivemae_ds.evaluate:main",
            "smae-export=selectivemae_ds.export:main",
            "smae-visualize=selectivemae_ds.visualize:main",
        ],
    },
)
