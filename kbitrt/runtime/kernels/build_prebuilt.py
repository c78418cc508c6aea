"""The build step of the fused CPU kernels: every instruction-set variant of this architecture
compiled ahead of use into the package's `_prebuilt/` (kernels/cpu_build.py), so the first
command after install loads them instead of compiling. Run by scripts/setup.sh and by setup.py
when a wheel is built; needs a C++ compiler and torch, nothing else.

    python -m kbitrt.runtime.kernels.build_prebuilt [--out DIR] [--variants avx2,portable] [--jobs N]
        [--reuse DIR]

A variant already built from the same sources, torch, flags and compiler (in --out, or a --reuse
folder: setup.py passes the checkout's own _prebuilt/) is copied, not compiled again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from kbitrt.errors import RunError
from kbitrt.runtime.kernels.cpu import HEADERS, SOURCE
from kbitrt.runtime.kernels.cpu_build import build_all, machine, prebuilt_dir, variants


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default: the package's _prebuilt/")
    ap.add_argument("--variants", default=None, help="comma list (default: all of "
                    f"{', '.join(variants()) or 'none'})")
    ap.add_argument("--jobs", type=int, default=None, help="compilers at once (default: cores)")
    ap.add_argument("--reuse", type=Path, action="append", default=[],
                    help="a folder of prebuilt kernels to copy matching variants from")
    args = ap.parse_args(argv)
    if sys.platform != "linux" or not variants():
        print(f"kbit: no prebuilt CPU kernels on {sys.platform}/{machine()} (they are built on "
              "first use where they can be)", file=sys.stderr)
        return 0
    out = args.out or prebuilt_dir()
    names = args.variants.split(",") if args.variants else None
    try:
        manifest = build_all(out, SOURCE, HEADERS, names, args.jobs, args.reuse)
    except (OSError, RuntimeError, RunError) as e:
        print(f"kbit: the prebuilt CPU kernels did not build ({e}); they are built on first use "
              "instead", file=sys.stderr)
        return 1
    reused = f" ({', '.join(manifest['reused'])} up to date, copied)" if manifest["reused"] else ""
    print(f"kbit: prebuilt CPU kernels {', '.join(manifest['variants'])} in {out}{reused}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
