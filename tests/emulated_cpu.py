"""An emulated x86-64 CPU with AVX-512 (Bochs, through the ``bochscpu-python`` wheel) that runs
qlora-rs's CPU kernels at the instruction-set levels this machine lacks, over this process's own
memory, so that the AVX-512 kernels are tested on every machine and not only on AVX-512 ones.

How: ``qlora_rs._lib.set_cpu_emulator(emulator)`` makes the cpu_* kernels call
``emulator(isa, entry, job)`` for a level this CPU lacks, after checking their arguments here;
the emulator runs the machine code at ``entry`` (the compiled kernel call) with ``job`` in rdi on
the emulated CPU and returns when it does. The emulated CPU runs in 64-bit mode at ring 0 with
paging on: each 1 GiB region of the address space this process maps is a 1 GiB page backed by a
guest-physical slot, and each 4 KiB page of a slot is this process's own page at that address,
inserted when the emulated code first touches it (so the kernel reads its inputs and writes its
output in place). The call returns to a page of ``hlt``; a ``syscall`` lands on another, where
the memory calls an allocator makes (mmap, munmap, brk, ...) are made for it natively, and any
other call stops the run with an error. The emulated CPU's model is the wheel's (AVX-512 F, BW,
VL, DQ, CD, IFMA, VBMI; no AVX512-BF16, no AMX): :attr:`EmulatedCpu.levels` says what it runs,
read from its CPUID.

The wheel is built for a C library newer than some machines have (it needs ``__isoc23_strtoull``
and ``__isoc23_sscanf``, from glibc 2.38); a two-function shim compiled with the system's C
compiler provides them first.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import gc
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from typing import Optional

from qlora_rs import _lib

PAGE = 4096
GIB = 1 << 30
# System calls made natively for the emulated code: what a memory allocator needs.
MEMORY_CALLS = {9: "mmap", 10: "mprotect", 11: "munmap", 12: "brk", 25: "mremap", 28: "madvise"}
SYS_ARCH_PRCTL, ARCH_GET_FS = 158, 0x1003
# 64-bit code and flat data segments at ring 0 (Bochs' attribute words: access byte + flags).
CODE_SELECTOR, CODE_ATTR = 0x10, 0xA09B
DATA_SELECTOR, DATA_ATTR = 0x18, 0xC093

_SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
unsigned long long __isoc23_strtoull(const char *s, char **end, int base) { return strtoull(s, end, base); }
int __isoc23_sscanf(const char *s, const char *format, ...) {
    va_list args;
    va_start(args, format);
    int n = vsscanf(s, format, args);
    va_end(args);
    return n;
}
"""

# mov eax, 7; xor ecx, ecx; cpuid; mov [rdi], ebx;
# mov eax, 7; mov ecx, 1; cpuid; mov [rdi + 4], eax; ret
_CPUID_PROBE = bytes.fromhex("b807000000" "31c9" "0fa2" "891f" "b807000000" "b901000000" "0fa2" "894704" "c3")

_state: dict = {}


def _load_bochscpu():
    """The bochscpu module, or a string saying why it cannot be had."""
    if "module" in _state:
        return _state["module"]
    try:
        import importlib.util

        if importlib.util.find_spec("bochscpu") is None:
            raise ImportError("the bochscpu-python wheel is not installed")
        try:
            import bochscpu  # noqa: F401
        except ImportError as e:
            if "__isoc23" not in str(e):
                raise
            ctypes.CDLL(_build_shim(), mode=ctypes.RTLD_GLOBAL)
            import bochscpu  # noqa: F401
        import bochscpu.cpu
        import bochscpu.memory

        _state["module"] = bochscpu
    except Exception as e:  # noqa: BLE001 - any failure means: no emulator here, and why
        _state["module"] = f"{type(e).__name__}: {e}"
    return _state["module"]


def _build_shim() -> str:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise ImportError("bochscpu needs glibc 2.38 symbols and no C compiler is here to build a shim for them")
    folder = tempfile.mkdtemp(prefix="qlora-rs-bochs-shim-")
    source, lib = os.path.join(folder, "shim.c"), os.path.join(folder, "shim.so")
    with open(source, "w") as f:
        f.write(_SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", lib, source], check=True, capture_output=True)
    return lib


def _mapped_ranges() -> list:
    """The readable mappings of this process in the lower half of the address space."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(v, 16) for v in span.split("-"))
            if "r" in perms and end <= 1 << 47:
                ranges.append((start, end))
    return ranges


class EmulationError(RuntimeError):
    pass


class EmulatedCpu:
    """One emulated CPU (a Bochs session); call :meth:`installed` to run kernels on it."""

    def __init__(self):
        bochscpu = _load_bochscpu()
        if isinstance(bochscpu, str):
            raise EmulationError(f"no CPU emulator: {bochscpu}")
        self._b = bochscpu
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._session = bochscpu.Session()
        self._session.missing_page_handler = self._missing_page
        self._hook = bochscpu.Hook()
        self._hook.hlt = lambda session, cpu: session.stop()
        self._hook.exception = self._exception
        self._fault: Optional[str] = None
        self._host_pages = []  # pages allocated for the emulator: tables, stops, stack
        self._tables = 0
        self._slot_region: dict = {}  # guest-physical 1 GiB slot -> region of the address space
        self._region_slot: dict = {}
        self._pdpts: dict = {}
        self._pml4_gpa, self._pml4 = self._table_page()
        self._returned = self._host_page(0xF4)  # hlt: the emulated call returns here
        self._syscalled = self._host_page(0xF4)  # hlt: a syscall lands here
        self._stack = ctypes.create_string_buffer(1 << 20)
        # The emulated code runs with the thread-local storage of a thread parked for it, so that
        # its memory allocator keeps to that thread's arena: the emulated code shares this
        # process's memory, the allocator's locks included, and may be stopped holding one while
        # this thread runs Python (a page to insert, a system call to make), which allocates.
        self._guest_fs = None
        self._parked = threading.Event()
        self._release = threading.Event()
        threading.Thread(target=self._park, name="emulated-cpu-tls", daemon=True).start()
        self._parked.wait()
        self._ranges = _mapped_ranges()
        self._map_new_regions()
        self.kernel_calls = 0  # kernel calls run here (see __call__)
        self._code_pages: dict = {}
        self.levels = self._probe_levels()

    # -- memory ------------------------------------------------------------------------------

    def _host_page(self, fill: int) -> int:
        page = self._b.memory.allocate_host_page()
        if not page:
            raise EmulationError("could not allocate a host page for the emulator")
        ctypes.memset(page, fill, PAGE)
        self._host_pages.append(page)
        return page

    def _table_page(self):
        """A zeroed page-table page at the next guest-physical page of slot 0."""
        page = self._host_page(0)
        self._tables += 1
        gpa = self._tables * PAGE
        self._b.memory.page_insert(gpa, page)
        return gpa, page

    def _map_new_regions(self) -> None:
        """Maps every 1 GiB region the process maps now and the page tables do not yet."""
        for start, end in self._ranges:
            for region in range(start // GIB, (end - 1) // GIB + 1):
                if region in self._region_slot:
                    continue
                slot = len(self._region_slot) + 1
                self._region_slot[region], self._slot_region[slot] = slot, region
                top = region >> 9
                if top not in self._pdpts:
                    self._pdpts[top] = self._table_page()
                    ctypes.memmove(self._pml4 + 8 * top, struct.pack("<Q", self._pdpts[top][0] | 0x7), 8)
                # present, writable, user, 1 GiB page
                ctypes.memmove(self._pdpts[top][1] + 8 * (region & 511), struct.pack("<Q", slot * GIB | 0x87), 8)

    def _missing_page(self, gpa: int) -> None:
        region = self._slot_region.get(gpa // GIB)
        if region is not None:
            address = region * GIB + (gpa % GIB) // PAGE * PAGE
            for _ in range(2):
                if any(start <= address < end for start, end in self._ranges):
                    self._b.memory.page_insert(gpa // PAGE * PAGE, address)
                    return
                self._ranges = _mapped_ranges()
        self._fault = f"the emulated code touched guest-physical {gpa:#x}, which no page of this process backs"
        self._session.stop()

    def _exception(self, session, cpu, vector: int, code: int) -> None:
        self._fault = (
            f"the emulated code raised exception {vector} (error code {code:#x}) at rip {session.cpu.rip:#x}"
            f" (6: an instruction the emulated CPU lacks; 14: a page fault, cr2 {session.cpu.cr2:#x})"
        )
        session.stop()

    # -- calls -------------------------------------------------------------------------------

    def _park(self) -> None:
        self._guest_fs = self._fs_base()
        self._parked.set()
        self._release.wait()

    def _fs_base(self) -> int:
        base = ctypes.c_ulong()
        if self._libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_FS, ctypes.byref(base)) != 0:
            raise EmulationError("arch_prctl(ARCH_GET_FS) failed")
        return base.value

    def call(self, entry: int, *args: int, limit_s: float = 600.0) -> int:
        """Runs the function at ``entry`` with up to six integer arguments; returns rax."""
        if len(args) > 6:
            raise ValueError("at most six register arguments")
        b = self._b
        self._ranges = _mapped_ranges()
        self._map_new_regions()
        top = (ctypes.addressof(self._stack) + len(self._stack) - 64) // 16 * 16 - 8
        ctypes.memmove(top, struct.pack("<Q", self._returned), 8)
        state = b.State()
        b.cpu.set_long_mode(state)
        # + OSFXSR, OSXMMEXCPT, OSXSAVE; XCR0: x87, SSE, AVX, opmask, upper and high zmm
        state.cr4 = state.cr4 | (1 << 9) | (1 << 10) | (1 << 18)
        state.xcr0 = 0xE7
        state.cr3 = self._pml4_gpa
        state.cs = self._segment(CODE_SELECTOR, CODE_ATTR)
        for name in ("ss", "ds", "es", "gs"):
            setattr(state, name, self._segment(DATA_SELECTOR, DATA_ATTR))
        state.fs = self._segment(0, DATA_ATTR, self._guest_fs)
        state.star = CODE_SELECTOR << 32
        state.lstar = self._syscalled
        state.sfmask = 0
        state.rflags = 0x202
        state.mxcsr = 0x1F80
        state.rsp = top
        state.rip = entry
        for name, value in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args):
            setattr(state, name, value)
        self._session.cpu.set_state(state)
        start = time.monotonic()
        while True:
            self._fault = None
            self._session.run([self._hook])
            if self._fault:
                raise EmulationError(self._fault)
            cpu = self._session.cpu
            page = cpu.rip // PAGE * PAGE
            if page == self._returned:
                return cpu.rax
            if page != self._syscalled:
                raise EmulationError(f"the emulated CPU halted at rip {cpu.rip:#x}")
            self._system_call(cpu)
            if time.monotonic() - start > limit_s:
                raise EmulationError(f"the emulated call ran past {limit_s} s")

    def _segment(self, selector: int, attr: int, base: int = 0):
        segment = self._b.Segment()
        segment.present, segment.selector, segment.base, segment.limit, segment.attr = True, selector, base, 0xFFFFFFFF, attr
        return segment

    def _system_call(self, cpu) -> None:
        number = cpu.rax
        if number not in MEMORY_CALLS:
            raise EmulationError(f"the emulated code made system call {number}, which the emulator does not make for it")
        args = [ctypes.c_long(v - (1 << 64) if v >= 1 << 63 else v) for v in (cpu.rdi, cpu.rsi, cpu.rdx, cpu.r10, cpu.r8, cpu.r9)]
        result = self._libc.syscall(ctypes.c_long(number), *args)
        if result == -1:
            result = -ctypes.get_errno() if ctypes.get_errno() else -errno.EINVAL
        self._ranges = _mapped_ranges()
        self._map_new_regions()
        cpu.rax = result & (1 << 64) - 1
        cpu.rflags = cpu.r11
        cpu.rip = cpu.rcx

    def run_code(self, code: bytes, *args: int) -> int:
        """Runs machine code (a function: System V ABI, up to six integer arguments); returns rax."""
        if len(code) > PAGE:
            raise ValueError("at most a page of code")
        # A page for each piece of code, never rewritten: the emulator keeps the instructions it
        # has decoded and would not see a page's new code.
        page = self._code_pages.get(code)
        if page is None:
            page = self._code_pages[code] = self._host_page(0xCC)  # int3 after the code
            ctypes.memmove(page, code, len(code))
        return self.call(page, *args)

    def _probe_levels(self) -> tuple:
        out = (ctypes.c_uint32 * 2)()
        self.run_code(_CPUID_PROBE, ctypes.addressof(out))
        leaf7_ebx, leaf7_1_eax = out[0], out[1]
        avx512 = all(leaf7_ebx >> bit & 1 for bit in (5, 16, 30, 31))  # AVX2, F, BW, VL
        levels = ["avx512"] if avx512 else []
        if avx512 and leaf7_1_eax >> 5 & 1:
            levels.insert(0, "avx512bf16")
        return tuple(levels)

    # -- the kernels' hook -------------------------------------------------------------------

    def __call__(self, isa: str, entry: int, job: int) -> None:
        if isa not in self.levels:
            raise EmulationError(f"the emulated CPU does not run {isa!r} either (it runs {', '.join(self.levels) or 'none'})")
        self.kernel_calls += 1
        self.call(entry, job)

    @contextlib.contextmanager
    def installed(self):
        """Within: kernels at a level this CPU lacks run on this emulated CPU (this thread)."""
        previous = _lib.set_cpu_emulator(self)
        try:
            yield self
        finally:
            _lib.set_cpu_emulator(previous)


    def close(self) -> None:
        """Ends the session; its callbacks referred back to this object (a cycle the bindings
        keep from the garbage collector, and report as leaked at exit)."""
        self._release.set()
        self._session.missing_page_handler = _no_page
        self._hook.hlt = self._hook.exception = _no_hook
        self._session = self._hook = None


def _no_page(gpa: int) -> None:
    raise EmulationError(f"the emulator is closed (page {gpa:#x})")


def _no_hook(*args) -> None:
    pass


def emulator() -> EmulatedCpu | str:
    """The process's emulated CPU (made once), or a string saying why there is none."""
    if "cpu" not in _state:
        # The CPU's features are read (and cached for the process) natively before any
        # emulated code runs, which would read the emulated CPU's.
        _lib.cpu_isas()
        try:
            _state["cpu"] = EmulatedCpu()
            atexit.register(_close)
        except Exception as e:  # noqa: BLE001
            _state["cpu"] = f"{type(e).__name__}: {e}"
    return _state["cpu"]


def _close() -> None:
    cpu = _state.pop("cpu", None)
    if isinstance(cpu, EmulatedCpu):
        cpu.close()
    gc.collect()
