"""Building and loading the C++ operators in `senab/csrc`.

Each operator library is compiled with the system's C++ compiler (`$CXX`, else `g++`)
against the installed torch the first time a process asks for it (about 6 s) and cached
under `$SENAB_HOME/kernels` by a digest of its source, its flags and torch. Compiling needs
no special CPU, so an image can be built on any x86 machine (the Dockerfile does) and a
server started from it loads the library without a compiler. `SENAB_NATIVE_KERNELS=0`
keeps every compiled operator off, and the Python paths serve instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
COMMON_FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 300
SWITCH = "SENAB_NATIVE_KERNELS"


class NativeError(RuntimeError):
    """A compiled operator could not be built or loaded."""


def switched_off() -> str | None:
    """Return why compiled operators are off by the environment, or None when they may serve."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{SWITCH} turns compiled operators off"
    return None


def library_path(source: str, flags: tuple[str, ...]) -> Path:
    """Return where the library built from `source` (a file in senab/csrc) with `flags` is cached."""
    digest = hashlib.sha256(b"\0".join(part.encode() for part in (
        (CSRC / source).read_text(), " ".join(flags), torch.__version__, torch.__file__))).hexdigest()[:16]
    from senab.models import senab_home  # here, because senab.models imports modules that import this one

    return senab_home() / "kernels" / f"senab_{Path(source).stem}-{digest}.so"


def build(source: str, flags: tuple[str, ...]) -> Path:
    """Compile `source` with `flags` unless it is cached, and return the library. Raises NativeError."""
    library = library_path(source, flags)
    if library.exists():
        return library
    compiler = os.environ.get("CXX", "g++")
    compiler_path = shutil.which(compiler)
    if compiler_path is None:
        raise NativeError(f"no C++ compiler {compiler!r} found to build {source}; install g++ or set CXX")
    from torch.utils import cpp_extension  # imports setuptools, so only when building

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = [argument for path in cpp_extension.library_paths() for argument in (f"-L{path}", f"-Wl,-rpath,{path}")]
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final name and renamed, so that processes building at once never load half a file.
        handle, partial = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".so.partial")
    except OSError as error:
        raise NativeError(f"cannot write {library.parent} to build {source}: {error}") from error
    os.close(handle)
    command = [compiler_path, *flags, *includes, str(CSRC / source), "-o", partial, *libraries, "-ltorch_cpu",
               "-lc10"]
    started = time.perf_counter()
    try:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as error:
            raise NativeError(f"building {source} with {compiler} failed: {error}") from error
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise NativeError(f"building {source} with {compiler} failed (exit {result.returncode}): "
                              + " | ".join(tail))
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("built %s in %.1f s: %s", source, time.perf_counter() - started, library)
    return library


def build_all() -> list[Path]:
    """Compile every operator library unless cached (for images built ahead), and return their paths."""
    from senab import amx, nca  # here, because both import this module

    return [build(amx.SOURCE, amx.FLAGS), build(nca.NATIVE_SOURCE, nca.NATIVE_FLAGS)]


def load(source: str, flags: tuple[str, ...]) -> str | None:
    """Build (or find) and load the operators of `source`; return why they cannot serve, or None."""
    problem = switched_off()
    if problem:
        return problem
    try:
        torch.ops.load_library(str(build(source, flags)))
    except (NativeError, OSError, RuntimeError) as error:
        logger.warning("the operators of %s are not used: %s", source, error)
        return str(error)
    return None
