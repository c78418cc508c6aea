"""The package build's one extra step: the fused CPU kernels compiled ahead for each instruction
set of the build machine's architecture into kbitrt/runtime/kernels/_prebuilt/
(kernels/build_prebuilt.py), so a wheel runs them on a machine without a compiler. It needs torch
importable where the wheel is built (`pip wheel --no-build-isolation .`); without it the wheel
carries the sources alone and the kernels are built on first use, as before. KBIT_PREBUILT=0
skips the step. Everything else is in pyproject.toml."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or os.environ.get("KBIT_PREBUILT") == "0":
            return  # an editable install uses the checkout's _prebuilt/ (scripts/setup.sh)
        if subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode:
            print("kbit: torch is not importable here: the wheel ships the CPU kernels' sources "
                  "only (built on first use)", file=sys.stderr)
            return
        out = Path(self.build_lib) / "kbitrt" / "runtime" / "kernels" / "_prebuilt"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        # the checkout's own _prebuilt/ (scripts/setup.sh's), where it matches, is copied
        subprocess.run([sys.executable, "-m", "kbitrt.runtime.kernels.build_prebuilt", "--out",
                        str(out), "--reuse", str(ROOT / "kbitrt" / "runtime" / "kernels" / "_prebuilt")],
                       env=env, check=False)


class BinaryDistribution(Distribution):
    """The wheel holds compiled libraries: tagged for this platform and Python."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithKernels}, distclass=BinaryDistribution)
