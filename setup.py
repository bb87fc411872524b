"""perception3d: sparse 3D perception and rendering toolkit.

Install with the README's command (it pins the CPU build of torch first):
    pip install -e .[test]
"""
from setuptools import find_packages, setup

setup(
    name="perception3d",
    version="0.1.0",
    description="Sparse 3D perception (spconv detectors) and Gaussian splatting on one core",
    python_requires=">=3.10",
    license="Apache-2.0",
    packages=find_packages(include=["perception3d*", "detection*", "splatting*", "p3d*"]),
    entry_points={
        # one command line: p3d train | eval | bench | view | export ... (p3d/cli.py)
        "console_scripts": ["p3d = p3d.cli:main"],
        # the nerfstudio plugin (splatting/ns_plugin.py): `ns-train p3d-3dgs --data ...` on a CPU too
        "nerfstudio.method_configs": [
            "p3d-3dgs = splatting.ns_plugin:p3d_3dgs",
            "p3d-compact3dgs = splatting.ns_plugin:p3d_compact3dgs",
            "p3d-coherentgs = splatting.ns_plugin:p3d_coherentgs",
        ],
    },
    install_requires=[
        # torch is pinned by the install script (CPU build from local disk); a looser
        # range here is satisfied by it and pulls nothing more.
        "torch>=2.1",
        "spconv==2.3.8",
        "numpy>=1.24",
        "numba>=0.59",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "pillow>=10",
        "shapely>=2.0",
        "scipy>=1.10",
        # splatting: gsplat's CUDA rasterizer and densification strategy, kornia's SSIM, and
        # ninja to JIT-build our C++ CPU rasterizer (splatting/_ext.py).
        "gsplat==1.4.0",
        "kornia>=0.7",
        "ninja>=1.11",
        # Compact 3DGS: canonical Huffman coding of the vector-quantization indices
        "bitarray>=2.9",
        # the model zoo's shipped weights (tools/export_weights.py)
        "safetensors>=0.4",
    ],
    extras_require={
        "viewer": ["open3d-cpu==0.20.0"],
        "nerfstudio": ["nerfstudio==1.1.5"],
        # ONNX export of the DSVT backbone and running it with onnxruntime
        "deploy": ["onnx>=1.16", "onnxruntime>=1.18"],
        # The tests also use nuscenes-devkit 1.2.0 (tests/perception3d/test_metrics_nuscenes.py) and
        # the KITTI devkit's python port from mmdet3d 1.4.0 (tests/perception3d/test_metrics_kitti.py):
        # not listed here, as the devkit's numpy<2 / Shapely~=2.0.3 pins would downgrade numpy and
        # mmdet3d needs mmcv; scripts/install.sh installs both without their dependencies.
        "test": ["pytest>=8", "open3d-cpu==0.20.0", "scikit-image>=0.22", "onnx>=1.16", "onnxruntime>=1.18"],
    },
)
