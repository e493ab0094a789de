"""The native kernels' library is loaded only when its recorded hashes vouch for it."""

import json
import os
import shutil

import pytest

from jaxlab import native


@pytest.fixture
def library(tmp_path, monkeypatch):
    """A copy of the verified build (and its record) as the only candidate."""
    try:
        built = native.build()
    except RuntimeError as e:
        pytest.skip(f"no native build here: {e}")
    path = tmp_path / built.name
    shutil.copy2(built, path)
    shutil.copy2(native._record_of(built), native._record_of(path))
    monkeypatch.setattr(native, "_candidates", lambda: [path])
    assert native._unverified(path) is None
    return path


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)


def test_tampered_or_unrecorded_libraries_are_refused(library):
    record = native._record_of(library)
    good = record.read_text()

    _flip_a_byte(library)
    assert "does not match its recorded SHA-256" in native._unverified(library)
    _flip_a_byte(library)
    assert native._unverified(library) is None  # the same bytes again

    record.write_text(json.dumps(dict(json.loads(good), build_key="0" * 64)))
    assert "another source, flags or CPU" in native._unverified(library)
    record.unlink()
    assert "no readable record" in native._unverified(library)
    record.write_text(good)

    if os.name == "posix":
        os.chmod(library, 0o777)
        assert "others can write it" in native._unverified(library)
        os.chmod(library, 0o755)
    assert native._unverified(library) is None


def test_build_never_returns_a_refused_library(library, monkeypatch):
    _flip_a_byte(library)
    monkeypatch.setenv("CXX", "no-such-compiler-here")  # it cannot be rebuilt here
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        native.build()
