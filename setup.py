"""Setuptools entry point. The package is pure Python; its C++ (and, where torch has CUDA,
CUDA) update kernels under csrc/ are compiled with ninja on first use, so installing never
needs a compiler or a particular torch build."""
from setuptools import setup

setup()
