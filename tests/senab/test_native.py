"""Building and loading compiled operators (senab.native), on a small source of the test's own."""

from __future__ import annotations

import os
import stat
import time

import pytest

import senab.native as native

SOURCE = "probe.cpp"


@pytest.fixture
def csrc(tmp_path, monkeypatch):
    """A private source directory and SENAB_HOME, with one small C++ file."""
    directory = tmp_path / "csrc"
    directory.mkdir()
    (directory / SOURCE).write_text("extern \"C\" int senab_probe() { return 7; }\n")
    monkeypatch.setattr(native, "CSRC", directory)
    monkeypatch.setenv("SENAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CXX", raising=False)
    return directory


needs_compiler = pytest.mark.skipif(native.shutil.which("g++") is None, reason="no g++ on this machine")


@needs_compiler
def test_header_change_builds_again(csrc):
    """A library is cached by the headers it may include too, so changing one builds it again."""
    (csrc / "probe.h").write_text("constexpr int kProbe = 7;\n")
    (csrc / SOURCE).write_text('#include "probe.h"\nextern "C" int senab_probe() { return kProbe; }\n')
    first = native.build(SOURCE, native.COMMON_FLAGS)
    (csrc / "probe.h").write_text("constexpr int kProbe = 8;\n")
    second = native.build(SOURCE, native.COMMON_FLAGS)
    assert second != first
    assert second.exists()


@needs_compiler
def test_library_is_readable_and_checksummed(csrc):
    library = native.build(SOURCE, native.COMMON_FLAGS)
    assert stat.S_IMODE(library.stat().st_mode) == 0o755
    assert native.cached_library_problem(library) is None
    assert list(library.parent.glob("*.partial")) == []


@needs_compiler
def test_truncated_library_is_built_again(csrc):
    library = native.build(SOURCE, native.COMMON_FLAGS)
    size = library.stat().st_size
    os.truncate(library, size // 2)
    assert "does not match its checksum" in native.cached_library_problem(library)
    assert native.build(SOURCE, native.COMMON_FLAGS) == library
    assert library.stat().st_size == size
    assert native.cached_library_problem(library) is None


@needs_compiler
def test_truncated_library_without_compiler(csrc, monkeypatch):
    library = native.build(SOURCE, native.COMMON_FLAGS)
    os.truncate(library, 100)
    monkeypatch.setenv("CXX", "senab-no-such-compiler")
    with pytest.raises(native.NativeError, match="does not match its checksum.*no C.. compiler.*delete the library"):
        native.build(SOURCE, native.COMMON_FLAGS)


@needs_compiler
def test_compiler_with_arguments(csrc, monkeypatch):
    monkeypatch.setenv("CXX", "env g++")
    assert native.cached_library_problem(native.build(SOURCE, native.COMMON_FLAGS)) is None


def test_hung_compiler_times_out(csrc, monkeypatch, tmp_path):
    compiler = tmp_path / "slow-compiler"
    compiler.write_text("#!/bin/sh\nsleep 30 &\nwait\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 0.5)
    started = time.monotonic()
    with pytest.raises(native.NativeError, match="timed out after 0.5 s"):
        native.build(SOURCE, native.COMMON_FLAGS)
    assert time.monotonic() - started < 10
    assert list((tmp_path / "home" / "kernels").glob("*.partial")) == []


@needs_compiler
def test_old_partial_files_are_removed(csrc):
    kernels = native.library_path(SOURCE, native.COMMON_FLAGS).parent
    kernels.mkdir(parents=True)
    stale, fresh = kernels / "old.so.partial", kernels / "new.so.partial"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    long_ago = time.time() - 3 * native.BUILD_TIMEOUT_S
    os.utime(stale, (long_ago, long_ago))
    native.build(SOURCE, native.COMMON_FLAGS)
    assert not stale.exists()
    assert fresh.exists()


@needs_compiler
def test_library_missing_operator_unused(csrc):
    reason = native.load(SOURCE, native.COMMON_FLAGS, "senab_probe_namespace::missing")
    assert reason is not None
    assert "missing" in reason or "senab_probe_namespace" in reason


def test_switch_keeps_operators_off(csrc, monkeypatch):
    monkeypatch.setenv("SENAB_NATIVE_KERNELS", "off")
    assert "SENAB_NATIVE_KERNELS" in native.load(SOURCE, native.COMMON_FLAGS, "senab_probe_namespace::missing")


def test_unknown_switch_value_named(csrc, monkeypatch):
    monkeypatch.setenv("SENAB_NATIVE_KERNELS", "maybe")
    reason = native.load(SOURCE, native.COMMON_FLAGS, "senab_probe_namespace::missing")
    assert "invalid SENAB_NATIVE_KERNELS='maybe'" in reason


@needs_compiler
def test_shipped_sources_compile():
    """Every shipped operator compiles here, so that no operator's tests are skipped for a broken source.

    Tests of each operator skip where its blocker reports a reason, and a compile error is one.
    """
    libraries = native.build_all()
    assert libraries
    for library in libraries:
        assert native.cached_library_problem(library) is None
