"""Building and loading the C++ operators in `senab/csrc`.

Each operator library is compiled with the system's C++ compiler (`$CXX`, else `g++`)
against the installed torch the first time a process needs it, in about 6 s. It is cached
under `$SENAB_HOME/kernels` by a digest of its source, the headers beside it, its flags and torch. Compiling needs
no special CPU, so an image can be built on any x86 machine (the Dockerfile does) and a
server started from it loads the library without a compiler. `SENAB_NATIVE_KERNELS=0`
keeps every compiled operator off, and the Python paths serve instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
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
    value = os.environ.get(SWITCH, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return None
    if value in ("0", "false", "no", "off"):
        return f"{SWITCH} turns compiled operators off"
    return f"invalid {SWITCH}={os.environ[SWITCH]!r} keeps compiled operators off; set it to 1 or 0"


def library_path(source: str, flags: tuple[str, ...]) -> Path:
    """Return where the library built from `source` (a file in senab/csrc) with `flags` is cached."""
    # Every header in csrc counts too: a source may include any of them.
    headers = [header.read_text() for header in sorted(CSRC.glob("*.h"))]
    digest = hashlib.sha256(b"\0".join(part.encode() for part in (
        (CSRC / source).read_text(), *headers, " ".join(flags), torch.__version__, torch.__file__))).hexdigest()[:16]
    from senab.models import senab_home  # here, because senab.models imports modules that import this one

    return senab_home() / "kernels" / f"senab_{Path(source).stem}-{digest}.so"


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def cached_library_problem(library: Path) -> str | None:
    """Return what is wrong with a cached library, or None when it is whole.

    A library cut short (an interrupted copy of the cache, a full disk) can kill the process
    with SIGBUS when it is loaded, so every library is checked against the SHA-256 written
    beside it when it was built.
    """
    from senab.models import file_sha256  # here, because senab.models imports modules that import this one

    checksum = _checksum_path(library)
    try:
        expected = checksum.read_text().strip()
        actual = file_sha256(library)
    except OSError as error:
        return f"cannot read {library} and its checksum: {error}"
    if actual != expected:
        return f"{library} does not match its checksum {checksum.name}"
    return None


def _compiler() -> list[str]:
    """Return the compiler command of `$CXX` (words allowed, as in "ccache g++"), else g++."""
    words = shlex.split(os.environ.get("CXX", "g++"))
    path = shutil.which(words[0]) if words else None
    if path is None:
        raise NativeError(f"no C++ compiler {os.environ.get('CXX', 'g++')!r} found; install g++ or set CXX")
    return [path, *words[1:]]


def _remove_stale_partials(directory: Path) -> None:
    """Delete half-built files that a killed build left, once they are older than any build could be."""
    for partial in directory.glob("*.partial*"):
        with contextlib.suppress(OSError):
            if time.time() - partial.stat().st_mtime > 2 * BUILD_TIMEOUT_S:
                partial.unlink()


def build(source: str, flags: tuple[str, ...]) -> Path:
    """Compile `source` with `flags` unless it is cached and whole, and return the library. Raises NativeError."""
    library = library_path(source, flags)
    damaged = None
    if library.exists():
        damaged = cached_library_problem(library)
        if damaged is None:
            return library
    try:
        compiler = _compiler()
    except NativeError as error:
        if damaged:
            raise NativeError(f"{damaged}, and {error}; delete the library and its checksum, or install a "
                              "compiler to build it again") from None
        raise
    if damaged:
        logger.warning("building %s again: %s", source, damaged)
    logger.info("compiling %s with %s (about 6 s, once per source and torch)", source, compiler[0])
    from torch.utils import cpp_extension  # imports setuptools, so only when building

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = [argument for path in cpp_extension.library_paths() for argument in (f"-L{path}", f"-Wl,-rpath,{path}")]
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(library.parent)
        # Built beside its final name and renamed, so that processes building at once never load half a file.
        handle, partial = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".so.partial")
    except OSError as error:
        raise NativeError(f"cannot write {library.parent} to build {source}: {error}") from error
    os.close(handle)
    command = [*compiler, *flags, *includes, str(CSRC / source), "-o", partial, *libraries, "-ltorch_cpu", "-lc10"]
    started = time.perf_counter()
    checksum_partial = partial + ".sha256"
    try:
        _run_compiler(command, source)
        # Readable by every user, like the models: a cache built by one user may serve another.
        os.chmod(partial, 0o755)
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        from senab.models import file_sha256

        Path(checksum_partial).write_text(file_sha256(Path(partial)) + "\n")
        os.chmod(checksum_partial, 0o644)
        os.replace(partial, library)
        os.replace(checksum_partial, _checksum_path(library))
    except OSError as error:
        raise NativeError(f"cannot write the library built from {source} to {library.parent}: {error}") from error
    finally:
        for leftover in (partial, checksum_partial):
            if os.path.exists(leftover):
                os.unlink(leftover)
    logger.info("built %s in %.1f s: %s", source, time.perf_counter() - started, library)
    return library


def _run_compiler(command: list[str], source: str) -> None:
    """Run the compiler in its own process group, so that a timeout stops its subprocesses too."""
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    except OSError as error:
        raise NativeError(f"building {source} with {command[0]} failed: {error}") from error
    try:
        stdout, stderr = process.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise NativeError(f"building {source} with {command[0]} timed out after {BUILD_TIMEOUT_S} s") from None
    if process.returncode != 0:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        raise NativeError(f"building {source} with {command[0]} failed (exit {process.returncode}): "
                          + " | ".join(tail))


def build_all() -> list[Path]:
    """Compile every operator library that can run on this architecture (for images built ahead).

    Returns their paths. The 4-bit products for batches, the decode attention and the AVX2 float32
    product are x86-only.
    """
    from senab import fastdecode, int4_batch, nca, packed  # here, because they import this module

    sources = [(nca.NATIVE_SOURCE, nca.NATIVE_FLAGS), (fastdecode.LAYER_SOURCE, fastdecode.LAYER_FLAGS)]
    if platform.machine().lower() in ("x86_64", "amd64"):
        sources += [(product.source, product.flags) for product in int4_batch.PRODUCTS]
        sources += [(kernel.source, kernel.flags) for kernel in fastdecode.ATTENTION_KERNELS.values()]
        sources.append((packed.PANEL_SOURCE, packed.PANEL_FLAGS))
    return [build(source, flags) for source, flags in sources]


def load(source: str, flags: tuple[str, ...], operator: str) -> str | None:
    """Build (or find) and load `source`, whose library defines `operator` ("namespace::name").

    Returns why it cannot serve, or None.
    """
    problem = switched_off()
    if problem:
        return problem
    try:
        library = build(source, flags)
        torch.ops.load_library(str(library))
        namespace, name = operator.split("::")
        getattr(getattr(torch.ops, namespace), name)
    except (NativeError, OSError, RuntimeError, AttributeError) as error:
        reason = str(error)
        if error.__cause__ is not None and str(error.__cause__) not in reason:
            reason += f" ({error.__cause__})"
        logger.warning("the operators of %s are not used: %s", source, reason)
        return reason
    logger.info("loaded %s from %s", operator, library)
    return None
