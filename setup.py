"""Setuptools entry point. The package is pure Python at install time: its C++ (and, where torch
has CUDA, CUDA) update kernels are compiled from csrc/ with the C++ compiler / nvcc on first use, so installing
never needs a compiler or a particular torch build. A wheel carries csrc/ as llc_fast/csrc."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"


class BuildPyWithSources(build_py):
    """Copies csrc/*.{h,cpp,cu} into the built package (llc_fast/csrc) for non-editable installs."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "llc_fast" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in CSRC.iterdir():
            if source.suffix in (".h", ".cpp", ".cu"):
                shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithSources})
