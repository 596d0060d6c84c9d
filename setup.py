"""drivlm-jax: domain adaptation of compact driving VLMs in JAX (DriVLM)."""
import setuptools

# Run directories and sweeps in a bucket (--workdir gs://...): epath's gcsfs backend, and
# google-cloud-storage for TensorBoard's gs:// writer.
CLOUD = ["gcsfs>=2024.2", "google-cloud-storage>=2.14"]
# JAX -> ONNX -> TensorRT (export/): not needed on the accelerator hosts that train.
# jax2onnx 0.17.1, the newest, fails on jax 0.12 (it reads `jax._src.core.ClosedJaxpr`, gone
# there): with the export, Python 3.12 resolves jax 0.11.2, where it and our suite pass.
EXPORT = ["onnx>=1.17,<2", "onnxruntime>=1.20,<2", "jax2onnx>=0.17,<0.18", "jax<0.12"]

setuptools.setup(
    name="drivlm-jax",
    version="0.1.0",
    description="DriVLM: domain adaptation of compact vision-language models for driving, in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["drivlm_jax*", "configs*", "experiments*",
                                               "data_builders*", "export*"]),
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11",   # [export]'s jax2onnx 0.17 pins it below 0.11.37
        "ml-collections>=1.0,<2",
        "absl-py>=2.0,<3",
        "etils[epath]>=1.7",
        "tensorflow-datasets>=4.9.9,<5",
        "grain>=0.2.12,<0.3",
        "transformers>=5.0,<6",
        "tokenizers>=0.21,<1",
        "safetensors>=0.5,<1",
        "numpy>=2.0,<3",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "pillow>=10",
        "importlib_resources>=6",
        "pycocoevalcap>=1.2",   # DriveLM's language scores: its PTB tokenizer (needs java)
        "scikit-learn>=1.4",    # experiments.select: domain classifiers (DEV, proxy A-distance)
        "scipy>=1.11",          # report intervals, Spearman
        # float32 GEMMs on an Intel CPU and the deployed student's packed-weight kernel on
        # any AVX-512 CPU (drivlm_jax.model.cpu_gemm, one library compiled on first use);
        # 2026.2.1 works too (checked with jax 0.11.2) but may round differently: the README's
        # Intel figures are 2025.3.1's
        "mkl>=2024,<2026; platform_machine == 'x86_64' and sys_platform == 'linux'",
    ],
    package_data={"drivlm_jax.model": ["cpu_gemm.cc"]},
    extras_require={
        "cloud": CLOUD,
        "export": EXPORT,
        "demo": EXPORT + ["matplotlib>=3.8"],   # `make demo`: the export and the report's plots
        # nuscenes-devkit itself is installed with --no-deps by the Makefile (it pins
        # numpy<2, which jax cannot use); these are the parts of it that it really needs.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "scikit-learn>=1.4",
                 "pyquaternion>=0.9", "shapely>=2.0", "matplotlib>=3.8",
                 "opencv-python-headless>=4.9", "cachetools>=5",
                 "gcp-storage-emulator>=2024.8"]   # a local GCS API
                + CLOUD + EXPORT,
        "tf": ["tensorflow-cpu>=2.18"],
    },
)
