from pathlib import Path

from setuptools import find_packages, setup

# The DeepSpeed JSONs in ds_configs/ ship inside the package as selectivemae_ds/ds_configs,
# so `smae-bench e2e --deepspeed-config zero2` (its default) works from an installed wheel.
BUNDLED_DS_CONFIGS = "selectivemae_ds.ds_configs"

setup(
    name="selectivemae-ds",
    version="0.1.0",
    description="DeepSpeed pretraining toolkit for remote-sensing foundation models (SelectiveMAE, MAE, CrossMAE)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # tomllib (3.11) reads the configs; numpy 2.4 needs 3.11 too.
    python_requires=">=3.11",
    packages=find_packages(include=["selectivemae_ds", "selectivemae_ds.*", "data_prep", "data_prep.*"])
    + [BUNDLED_DS_CONFIGS],
    package_dir={BUNDLED_DS_CONFIGS: "ds_configs"},
    package_data={BUNDLED_DS_CONFIGS: ["*.json"]},
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
        # Shard index checksums (selectivemae_ds.data.shards imports google_crc32c).
        "google-crc32c>=1.5",
        # Datasets on object storage (selectivemae_ds.data.store).
        "obstore>=0.12",
    ],
    extras_require={
        # CUDA 12 clusters: install with --no-deps for DALI or uninstall the cuda130 build first.
        "cuda12": ["nvidia-dali-cuda120>=1.50"],
        "flash": ["flash-attn>=2.5"],
        "test": ["pytest>=8", "pytest-timeout", "moto[server]>=5.1"],
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
