"""The one list of CUDA kernel instantiations, and the renderer that turns it into .cu files at build time.

Placeholder until the CUDA kernels land (issue 3): no instantiations yet, so a CUDA build contains only the CPU
kernel plus the CUDA registration.
"""

from pathlib import Path

DTYPES = []
HEAD_DIMS = []


def render(out_dir: Path):
    """Writes one .cu file per instantiation group under out_dir and returns their paths."""
    return []
