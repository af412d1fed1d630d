"""The one set-up step behind `make demo` and `make test`: a virtualenv at .venv with torch, the build and test tools,
and a current build of the extension. Idempotent: when everything is in place it checks and returns in about a second.

    python3 tools/bootstrap.py

1. Reuse .venv, or create it. Where the Python running this script can already import torch (a CUDA host, say), the
   venv gets --system-site-packages and that torch is used as is; otherwise torch==2.13.0 is installed into it.
2. Upgrade pip inside the venv when it is too old to install a setup.py project editable without build isolation.
3. Install what is missing or too old: ninja, numpy, pytest, expecttest, hypothesis, setuptools, wheel, the pinned
   test-only transformers (and nvidia-cutlass for a CUDA build; see README "Building").
4. Build the extension (`pip install -e . --no-build-isolation --no-deps`) when the built library is missing, older
   than a file under csrc/, setup.py or tools/kernel_matrix.py, built against another torch, or registered for
   another checkout.

Only the standard library is used here, so any Python >= 3.10 can run it. pip's own settings (PIP_INDEX_URL,
PIP_FIND_LINKS, PIP_NO_INDEX, pip.conf) apply to every install, so it works offline given local wheels; MAX_JOBS,
NVCC_THREADS and the DMATTN_* build knobs pass through to the build.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_PY = VENV / "bin" / "python"
TORCH_SPEC = "torch==2.13.0"

# distribution -> minimum version (None: any). The pip 23.2 that Python 3.11's venv ships fails at
# `pip install -e . --no-build-isolation` on this setup.py project; newer pips go through setuptools' PEP 660 hooks.
# The setuptools 65 it ships predates bdist_wheel moving into setuptools (70.1), which the py_limited_api wheel tag
# in setup.py relies on; 70.1 and newer is what the build is tested with.
# numpy is optional for torch, which warns on import without it.
TOOLS = {"pip": "24.0", "setuptools": "70.1", "wheel": None, "ninja": None, "numpy": None, "pytest": None,
         "expecttest": None, "hypothesis": None}
# Test-only dependencies pinned to one version (tests/test_transformers_integration.py runs tiny models of it).
PINNED = {"transformers": "5.17.0"}

# What the build depends on: a change to any of these makes the built library stale (under a folder, its source files:
# csrc/cuda/README.md edited is no reason to rebuild).
BUILD_INPUTS = ["csrc", "setup.py", "tools/kernel_matrix.py"]
SOURCE_SUFFIXES = {".cpp", ".h", ".cu", ".cuh"}

# Run inside the venv, from / so that the current directory hides nothing: versions, what is missing, and where
# `import dmattn_ops` leads, without importing torch.
PROBE = r"""
import importlib.metadata as md, importlib.util as iu, json, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
names = json.loads(sys.argv[1])
spec = iu.find_spec("dmattn_ops")
json.dump({"versions": {n: version(n) for n in names}, "dmattn_ops": spec.origin if spec else None,
           "cutlass": iu.find_spec("cutlass_library") is not None}, sys.stdout)
"""


def say(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"[bootstrap] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd, **kwargs) -> None:
    result = subprocess.run([str(c) for c in cmd], **kwargs)
    if result.returncode != 0:
        fail(f"`{' '.join(str(c) for c in cmd)}` failed with exit code {result.returncode}")


@contextlib.contextmanager
def timed(label: str):
    """Prints `label ...` before a slow step and how long it took after."""
    say(f"{label} ...")
    start = time.perf_counter()
    yield
    say(f"{label}: done in {time.perf_counter() - start:.0f} s")


def version_tuple(text: str):
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:  # 1.2rc1: stop after the number the pre-release tag is glued to
            break
    return tuple(parts)


def pip_install(*args: str) -> None:
    run([VENV_PY, "-m", "pip", "install", "--quiet", *args])


def system_has_torch() -> bool:
    """Whether the Python running this script imports torch (tried in a subprocess: a failed import can be slow)."""
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def ensure_venv() -> None:
    if VENV_PY.exists():
        if subprocess.run([VENV_PY, "-c", "pass"], capture_output=True).returncode != 0:
            fail(f"{VENV} exists but its python does not run; move it away and run this again")
        return
    if sys.version_info < (3, 10):
        fail(f"dmattn_ops needs Python >= 3.10, this is {sys.version.split()[0]} ({sys.executable})")
    shared = system_has_torch()
    flags = ["--system-site-packages"] if shared else []
    say(f"creating {VENV.relative_to(ROOT)} with {sys.executable}"
        + (" (--system-site-packages: using the torch already installed there)" if shared else ""))
    run([sys.executable, "-m", "venv", *flags, VENV])


def probe() -> dict:
    out = subprocess.run([VENV_PY, "-c", PROBE, json.dumps(["torch", *TOOLS, *PINNED])], capture_output=True,
                         text=True, cwd="/")
    if out.returncode != 0:
        fail(f"could not inspect {VENV}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def ensure_packages() -> dict:
    facts = probe()
    have = facts["versions"]
    pip_min = TOOLS["pip"]
    if have["pip"] is None or version_tuple(have["pip"]) < version_tuple(pip_min):
        with timed(f"upgrading pip {have['pip']} in the venv to >= {pip_min}"):
            pip_install("--upgrade", f"pip>={pip_min}")
    if have["torch"] is None:
        with timed(f"installing {TORCH_SPEC} (a large wheel: a minute or more)"):
            pip_install(TORCH_SPEC)
    wanted = []
    for name, minimum in TOOLS.items():
        if name == "pip":
            continue
        if have[name] is None:
            wanted.append(name if minimum is None else f"{name}>={minimum}")
        elif minimum is not None and version_tuple(have[name]) < version_tuple(minimum):
            wanted.append(f"{name}>={minimum}")
    wanted += [f"{name}=={version}" for name, version in PINNED.items() if have[name] != version]
    if wanted:
        with timed(f"installing {' '.join(wanted)}"):
            pip_install(*wanted)
    return probe() if (wanted or have["torch"] is None) else facts


def built_library():
    libs = sorted((ROOT / "dmattn_ops").glob("_C*.so"))
    return libs[0] if libs else None


def built_torch_version():
    """The torch version recorded in dmattn_ops/_build_config.py by the last build, or None."""
    path = ROOT / "dmattn_ops" / "_build_config.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CONFIG" for t in node.targets):
            return ast.literal_eval(node.value).get("torch_version")
    return None


def newest_input():
    """(mtime, path) of the newest file the build reads."""
    newest = (0.0, None)
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES]
        else:
            files = [path]
        for f in files:
            newest = max(newest, (f.stat().st_mtime, f), key=lambda item: item[0])
    return newest


def why_rebuild(facts: dict):
    """The reason the extension must be (re)built, or None when the build is current."""
    lib = built_library()
    if lib is None:
        return "not built yet"
    found = facts["dmattn_ops"]
    if found is None or Path(found).resolve() != ROOT / "dmattn_ops" / "__init__.py":
        return f"the venv's dmattn_ops is {found or 'not installed'}, not this checkout"
    if built_torch_version() != facts["versions"]["torch"]:
        return f"built against torch {built_torch_version()}, the venv has {facts['versions']['torch']}"
    mtime, path = newest_input()
    if mtime > lib.stat().st_mtime:
        return f"{path.relative_to(ROOT)} is newer than {lib.relative_to(ROOT)}"
    return None


def wants_cuda_build() -> bool:
    """Mirrors setup.py's choice: CUDA unless DMATTN_BACKENDS=cpu, when torch has CUDA and nvcc is found."""
    if os.environ.get("DMATTN_BACKENDS", "auto").strip().lower() == "cpu":
        return False
    check = "import torch, torch.utils.cpp_extension as e; print(bool(torch.version.cuda and e.CUDA_HOME))"
    out = subprocess.run([VENV_PY, "-c", check], capture_output=True, text=True, cwd="/")
    return out.stdout.strip() == "True"


def build(reason: str, facts: dict) -> None:
    if wants_cuda_build() and not facts["cutlass"] and not os.environ.get("DMATTN_CUTLASS_DIR"):
        with timed("installing nvidia-cutlass (CuTe headers for the CUDA build)"):
            pip_install("nvidia-cutlass==4.2.0.0")
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # torch's build looks up `ninja` on PATH
    if shutil.which("ninja", path=env["PATH"]) is None:  # ninja's package seen through --system-site-packages
        found = subprocess.run([VENV_PY, "-c", "import ninja; print(ninja.BIN_DIR)"], capture_output=True, text=True)
        if found.returncode == 0:
            env["PATH"] = f"{found.stdout.strip()}{os.pathsep}{env['PATH']}"
    env.setdefault("PYTHONWARNINGS", "ignore:Editable installation")  # setuptools' banner about editable installs
    jobs = env.get("MAX_JOBS", "ninja's default")
    with timed(f"building dmattn_ops ({reason}; MAX_JOBS={jobs}; 1-3 minutes for the CPU build on 2 cores)"):
        run([VENV_PY, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "-e", "."], cwd=ROOT,
            env=env)
    run([VENV_PY, "-m", "dmattn_ops"], cwd="/")


def main() -> int:
    start = time.perf_counter()
    ensure_venv()
    facts = ensure_packages()
    reason = why_rebuild(facts)
    if reason:
        build(reason, facts)
    say(f"{VENV.relative_to(ROOT)} ready (torch {facts['versions']['torch']}, "
        f"{'built now' if reason else 'build up to date'}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
