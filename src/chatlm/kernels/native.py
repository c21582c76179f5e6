"""Builds chatlm's C kernels (``cpu_kernels.c``, ``gguf_kernels.c``) on first use and loads them with ctypes.

The library is compiled for this very CPU (``-march=native``) with the C compiler found (``$CC``, ``cc``, ``gcc``
or ``clang``) into ``~/.cache/chatlm/kernels`` (or ``$CHATLM_CACHE``), named by a hash of the source, the compiler,
the flags and the CPU, so later runs load it in milliseconds and a changed machine or source builds afresh. It
links OpenMP by soname, so it shares the runtime (and the thread count) torch already loaded.

Without a compiler, or with ``CHATLM_NATIVE_KERNELS=0``, ``library()`` returns None and callers use torch's
kernels; ``status()`` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_kernels.c", "gguf_kernels.c")]
# No contraction of a * b + c into FMAs: the elementwise code rounds as torch does (the vector code uses FMAs
# where it means to).
# $CHATLM_MARCH picks another target than this CPU (e.g. x86-64-v3 for AVX2 only: how the tests check the other
# code paths of the kernels).
FLAGS = [
    "-O3",
    f"-march={os.environ.get('CHATLM_MARCH', 'native')}",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fopenmp",
]
_lock = threading.Lock()
_state: dict[str, object] = {}

_i64, _f32, _ptr, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
SIGNATURES = {
    "chatlm_q8_matmul": [_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr],
    "chatlm_attend_one": [_ptr, _ptr, _ptr, _int, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _f32, _ptr],
    "chatlm_rms_norm": [_ptr, _ptr, _int, _i64, _i64, _f32, _ptr],
    "chatlm_q4_torch_layout_matmul": [_ptr, _i64, _i64, _ptr, _ptr, _int, _i64, _i64, _ptr],
    "chatlm_has_int4_kernel": [],
    "chatlm_gguf_supports": [_int],
    "chatlm_gguf_matmul": [_ptr, _i64, _i64, _ptr, _int, _i64, _i64, _ptr],
    "chatlm_gguf_matmul_precise": [_ptr, _i64, _i64, _ptr, _int, _i64, _i64, _ptr],
    "chatlm_gguf_dequantize": [_ptr, _int, _i64, _i64, _i64, _ptr, _int],
    "chatlm_decode_layer": [
        _ptr,
        _i64,
        _i64,
        _i64,
        _ptr,
        _ptr,
        _ptr,
        _ptr,
        _i64,
        _ptr,
        _ptr,
        _i64,
        _i64,
        _ptr,
    ]
    + [_i64, _i64, _i64, _f32],
    "chatlm_decode_attention": [_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _int, _i64, _ptr, _ptr]
    + [_i64, _i64, _ptr, _int, _i64, _i64, _i64, _i64, _f32, _ptr],
}


RESTYPES = {
    "chatlm_q4_torch_layout_matmul": _int,
    "chatlm_has_int4_kernel": _int,
    "chatlm_gguf_supports": _int,
    "chatlm_gguf_matmul": _int,
    "chatlm_gguf_matmul_precise": _int,
    "chatlm_gguf_dequantize": _int,
}  # 0: not built for this CPU (no AVX-512)


def cache_dir() -> Path:
    root = os.environ.get("CHATLM_CACHE") or Path.home() / ".cache" / "chatlm"
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (empty elsewhere)."""
    if "flags" not in _state:
        flags: set[str] = set()
        for line in _cpu_signature().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.partition(":")[2].split())
        _state["flags"] = frozenset(flags)
    return _state["flags"]


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    source = b"\0".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()])
    )
    target = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        flags = FLAGS
        result = subprocess.run(
            [compiler, *flags, *map(str, SOURCES), "-o", str(built), "-lm"], capture_output=True, text=True
        )
        if result.returncode != 0 and "-fopenmp" in flags:  # e.g. Apple clang: no OpenMP, one thread
            flags = [f for f in flags if f != "-fopenmp"]
            result = subprocess.run(
                [compiler, *flags, *map(str, SOURCES), "-o", str(built), "-lm"],
                capture_output=True,
                text=True,
            )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: a concurrent process sees the whole library or none
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them if needed; None where they cannot be had (see ``status``)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _load()
    return _state["lib"]


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("CHATLM_NATIVE_KERNELS", "1") == "0":
        return None, "disabled by CHATLM_NATIVE_KERNELS=0"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    import torch  # noqa: F401  (loads torch's OpenMP runtime first, so that the kernels share it)

    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building the kernels failed: {e}"
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, RESTYPES.get(name)
    return lib, f"built with {compiler} for this CPU ({path})"


def status() -> str:
    """One line: whether the native kernels are in use, and why not."""
    lib = library()
    return ("native kernels: " if lib else "native kernels: off, ") + str(_state["why"])
