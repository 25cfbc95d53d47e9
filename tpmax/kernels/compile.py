"""NVRTC compilation of the `.cu` kernels without a GPU or a driver: ctypes on the NVRTC
library of the pip package `nvidia-cuda-nvrtc-cu12` (headers from `nvidia-cuda-runtime-cu12`),
the same on a machine with or without CuPy (on a GPU, `gpu_ops` loads the sources through
CuPy's `RawModule` instead).

`compile_cubin` returns the CUBIN for a real architecture (`sm_80`, `sm_90`); `kernel_resources`
reads each kernel's register count from the CUBIN's `.nv.info` attributes and ptxas's own
report (`--ptxas-options=-v` in the NVRTC log) for spill stores/loads.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import glob
import os
import re
import struct
from pathlib import Path

KERNEL_DIR = Path(__file__).parent
# Every kernel, by source file (the docs, the compile test and gpu_ops read this table).
KERNELS = {
    "gemv.cu": ("gemv_bf16", "gemv_residual_bf16", "rmsnorm_gemv_bf16", "rmsnorm_gemv_glu_bf16", "rmsnorm_gemv_f32",
                "rms_norm_bf16", "residual_add_bf16", "glu_bf16"),
    "qkv_rope.cu": ("qkv_rope_kv_write",),
    "flash_decode.cu": ("flash_decode_split", "flash_decode_combine"),
    "sample.cu": ("sample_tokens",),
    "dequant_gemv.cu": ("gptq_int4_gemv", "fp8_e4m3_gemv"),
}
SOURCES = tuple(KERNELS)
ARCHS = ("sm_80", "sm_90")


class CompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds its log."""


def source(name: str) -> str:
    """The text of kernel source `name` (one of `SOURCES`)."""
    if name not in SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; known: {', '.join(SOURCES)}")
    return (KERNEL_DIR / name).read_text()


def _package_dir(module: str) -> Path | None:
    try:
        mod = __import__(module, fromlist=["_"])
    except ImportError:
        return None
    return Path(list(mod.__path__)[0])


@functools.cache
def include_dirs() -> tuple[str, ...]:
    """Directories holding `cuda_bf16.h` / `cuda_fp8.h`: the pip runtime headers, else
    `$CUDA_PATH/include`."""
    dirs = []
    rt = _package_dir("nvidia.cuda_runtime")
    if rt is not None and (rt / "include" / "cuda_bf16.h").exists():
        dirs.append(str(rt / "include"))
    cuda_path = os.environ.get("CUDA_PATH", "/usr/local/cuda")
    if (Path(cuda_path) / "include" / "cuda_bf16.h").exists():
        dirs.append(str(Path(cuda_path) / "include"))
    return tuple(dirs)


@functools.cache
def _libnvrtc() -> ctypes.CDLL:
    """The NVRTC shared library of the pip package (or the system's)."""
    pkg = _package_dir("nvidia.cuda_nvrtc")
    candidates = sorted(glob.glob(str(pkg / "lib" / "libnvrtc.so*"))) if pkg is not None else []
    candidates = [c for c in candidates if "builtins" not in c and ".alt." not in c] + ["libnvrtc.so"]
    errors = []
    for c in candidates:
        try:
            lib = ctypes.CDLL(c)
        except OSError as e:
            errors.append(str(e))
            continue
        vp = ctypes.c_void_p
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                           ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcCompileProgram.argtypes = [vp, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for f in ("nvrtcGetProgramLogSize", "nvrtcGetCUBINSize", "nvrtcGetPTXSize"):
            getattr(lib, f).argtypes = [vp, ctypes.POINTER(ctypes.c_size_t)]
        for f in ("nvrtcGetProgramLog", "nvrtcGetCUBIN", "nvrtcGetPTX"):
            getattr(lib, f).argtypes = [vp, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(vp)]
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    raise RuntimeError("NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 "
                       f"(tried {candidates}: {errors})")


def nvrtc_available() -> bool:
    try:
        _libnvrtc()
    except RuntimeError:
        return False
    return bool(include_dirs())


def options(arch: str) -> list[str]:
    """NVRTC options: the real architecture (so the output is a CUBIN), C++17, the headers,
    and ptxas's resource report in the log."""
    if arch not in ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(ARCHS)}")
    return [f"--gpu-architecture={arch}", "--std=c++17", "--ptxas-options=-v",
            *(f"--include-path={d}" for d in include_dirs())]


def compile_cubin(name: str, arch: str) -> tuple[bytes, str]:
    """Compile kernel source `name` for `arch`. Returns (cubin, NVRTC log); raises
    `CompileError` with the log on failure."""
    lib, vp = _libnvrtc(), ctypes.c_void_p
    prog = vp()
    src = source(name).encode()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(), 0, None, None), "create")
    try:
        opts = [o.encode() for o in options(arch)]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if rc != 0:
            raise CompileError(f"{name} for {arch}: {lib.nvrtcGetErrorString(rc).decode()}\n{log}")
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "get cubin")
        return cubin.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check(lib, rc: int, what: str) -> None:
    if rc != 0:
        raise CompileError(f"nvrtc {what}: {lib.nvrtcGetErrorString(rc).decode()}")


# ------------------------------------------------------------------------------------------
# Resources per kernel.


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What ptxas gave one kernel: registers, spill bytes, stack frame bytes."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int


_PTXAS_FUNC = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def kernel_resources(cubin: bytes, log: str) -> dict[str, KernelResources]:
    """Registers of every kernel (from the CUBIN's `EIATTR_REGCOUNT` attributes) and its
    spills / stack frame (from ptxas's `-v` report in the NVRTC log)."""
    regs = cubin_registers(cubin)
    spills: dict[str, tuple[int, int, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_FUNC.search(line):
            current = m.group(1)
        elif current and (m := _PTXAS_SPILL.search(line)):
            spills[current] = tuple(int(g) for g in m.groups())
    if set(spills) != set(regs):
        raise CompileError(f"ptxas report names {sorted(spills)}, the cubin holds {sorted(regs)}")
    return {k: KernelResources(k, regs[k], spills[k][1], spills[k][2], spills[k][0]) for k in regs}


_EIATTR_REGCOUNT = 0x2F
_EIFMT_SVAL = 0x04


def cubin_registers(cubin: bytes) -> dict[str, int]:
    """Kernel name -> registers, read from the ELF `.nv.info*` sections of a CUBIN."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise CompileError("not a 64-bit ELF cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]

    def cstr(off):
        return cubin[off:cubin.index(b"\0", off)].decode()

    by_name = {cstr(names_off + s[0]): s for s in sections}
    symtab = by_name[".symtab"]
    strtab_off = sections[symtab[6]][4]  # sh_link -> the symbol names
    n_syms = symtab[5] // 24
    sym_names = [cstr(strtab_off + struct.unpack_from("<I", cubin, symtab[4] + i * 24)[0]) for i in range(n_syms)]
    regs: dict[str, int] = {}
    for name, s in by_name.items():
        if not name.startswith(".nv.info"):
            continue
        off, end = s[4], s[4] + s[5]
        while off + 4 <= end:
            fmt, attr, size = cubin[off], cubin[off + 1], struct.unpack_from("<H", cubin, off + 2)[0]
            if fmt != _EIFMT_SVAL:  # the other formats hold at most 2 bytes of value: 4 in all
                off += 4
                continue
            if attr == _EIATTR_REGCOUNT:
                sym, n = struct.unpack_from("<II", cubin, off + 4)
                regs[sym_names[sym]] = n
            off += 4 + size
    return regs
