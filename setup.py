"""rexedge: an edge runtime for Rex-Omni.

The repository's top-level folders are the subpackages of one namespace: export/ is
rexedge.export, runtime/ is rexedge.runtime, and so on. Nothing else is installed at
the top of site-packages.
"""

import sys

from setuptools import Extension, find_packages, setup

SUBPACKAGES = ["export", "runtime", "kernels", "calib", "bench"]

warnings = ["/W4", "/WX"] if sys.platform == "win32" else ["-Wall", "-Wextra", "-Werror", "-std=c99"]

TORCH = "torch==2.13.0"
# tested with 2.60; the Ray Data APIs used (ActorPoolStrategy(size=), from_items(override_num_blocks=)) are older
RAY = "ray[data]>=2.40"

setup(
    name="rexedge",
    version="0.1.0",
    description="Edge runtime for Rex-Omni: ONNX / TensorRT export, Triton kernels, structured decoding",
    python_requires=">=3.10",
    # rexedge itself is a namespace package (no __init__.py); each folder maps to one
    # subpackage, its own subfolders (runtime/backends) coming along
    packages=[f"rexedge.{p}{'.' + q if q else ''}" for p in SUBPACKAGES for q in ["", *find_packages(where=p)]],
    package_dir={f"rexedge.{p}": p for p in SUBPACKAGES},
    package_data={"rexedge.runtime": ["assets/*", "assets/**/*"], "rexedge.export.tensorrt": ["onnx_ops.json"]},
    ext_modules=[
        Extension("rexedge.runtime.decode._grammar", sources=["runtime/decode/_grammar.c"], extra_compile_args=warnings),
    ],
    install_requires=["numpy", "onnxruntime", "tokenizers", "pillow", "tqdm", "threadpoolctl"],
    extras_require={
        "export": [TORCH, "onnx", "safetensors>=0.8"],
        "kernels": [TORCH, "triton"],
        "tensorrt": ["tensorrt", "cuda-python"],
        "video": ["opencv-python-headless"],
        # rexedge calibrate: onnxruntime's quantization tools need onnx (no torch)
        "int8": ["onnx"],
        # rexedge batch --ray: Ray Data's actor pools across a cluster
        "ray": [RAY],
        "dev": [TORCH, RAY, "onnx", "safetensors>=0.8", "triton", "transformers", "pytest", "pytest-benchmark",
                "hypothesis", "opencv-python-headless", "pycocotools", "matplotlib"],
    },
    entry_points={"console_scripts": ["rexedge = rexedge.runtime.cli:main"]},
)
