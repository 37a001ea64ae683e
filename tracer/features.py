"""What this kernel's BPF can do, asked of the kernel itself at start.

A version number is the wrong test: distribution kernels carry features of
later releases (RHEL's 5.14), and a kernel may be built without one. So each
feature the programs use is tried with the bpf(2) system call directly (no
bcc, no compile): a tiny hand-assembled program the verifier must accept, or
a map the kernel must create. Each probe says yes, or no with the kernel's
errno. Together they take a few milliseconds; BTF (parsed by tracer/btf.py,
~60 ms) is loaded once here and reused for the raw tracepoint's offsets.

For tests: TCPSTATE_MISSING_FEATURES (names separated by commas or spaces)
makes those features count as missing without probing them, so every
refusal and fallback can be reached on a kernel that has them all.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import resource
import struct
import time
from dataclasses import dataclass, field

from .btf import Btf, BtfError
from .errors import EXIT_KERNEL_VERSION, PrerequisiteError, UsageError

RAW_TRACEPOINT = "raw_tracepoint"
CMPXCHG = "cmpxchg"
MMAPABLE = "mmapable"
RINGBUF = "ringbuf"
BTF = "btf"
FEATURES = (RAW_TRACEPOINT, CMPXCHG, MMAPABLE, RINGBUF, BTF)

# For messages: what each feature is, and the mainline release that added it.
DESCRIPTIONS = {
    RAW_TRACEPOINT: "BPF raw tracepoints (Linux 4.17)",
    CMPXCHG: "BPF compare-and-swap, BPF_CMPXCHG (Linux 5.12)",
    MMAPABLE: "memory-mappable BPF arrays, BPF_F_MMAPABLE (Linux 5.5)",
    RINGBUF: "the BPF ring buffer (Linux 5.8)",
    BTF: "kernel BTF, /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)",
}

MISSING_OVERRIDE = "TCPSTATE_MISSING_FEATURES"
FORCED = "forced missing by " + MISSING_OVERRIDE

# The tracepoint the raw tracepoint probe attaches to for an instant.
PROBE_TRACEPOINT = b"inet_sock_set_state"

# ---- bpf(2) ------------------------------------------------------------------
# include/uapi/linux/bpf.h
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 0, 5, 17
BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_RINGBUF = 2, 27
BPF_PROG_TYPE_SOCKET_FILTER, BPF_PROG_TYPE_RAW_TRACEPOINT = 1, 17
BPF_F_MMAPABLE = 1 << 10

# Instruction classes, sizes, modes and operations.
BPF_JMP, BPF_STX, BPF_ALU64 = 0x05, 0x03, 0x07
BPF_DW = 0x18
BPF_MEM, BPF_ATOMIC = 0x60, 0xC0
BPF_K = 0x00
BPF_MOV, BPF_EXIT = 0xB0, 0x90
BPF_FETCH = 0x01
BPF_CMPXCHG = 0xF0 | BPF_FETCH
R0, R1, R10 = 0, 1, 10

_INSTRUCTION = struct.Struct("<BBhi")  # opcode, dst|src<<4, offset, immediate
# union bpf_attr is larger on every newer kernel; the kernel accepts a
# longer one whose unknown tail is zero.
_ATTR_SIZE = 128

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361,
                "s390x": 351, "armv7l": 386, "i686": 357}


def instruction(opcode: int, dst: int = 0, src: int = 0, offset: int = 0, imm: int = 0) -> bytes:
    return _INSTRUCTION.pack(opcode, dst | src << 4, offset, imm)


def mov64_imm(dst: int, imm: int) -> bytes:
    return instruction(BPF_ALU64 | BPF_MOV | BPF_K, dst, imm=imm)


def store64(base: int, offset: int, src: int) -> bytes:
    return instruction(BPF_STX | BPF_DW | BPF_MEM, base, src, offset)


def cmpxchg64(base: int, offset: int, src: int) -> bytes:
    """r0 = cmpxchg(*(u64 *)(base + offset), r0, src)."""
    return instruction(BPF_STX | BPF_DW | BPF_ATOMIC, base, src, offset, BPF_CMPXCHG)


def exit_() -> bytes:
    return instruction(BPF_JMP | BPF_EXIT)


RETURN_ZERO = mov64_imm(R0, 0) + exit_()
# A stack slot set to 0, swapped for 1 where it holds 0 (r0): the verifier
# of a kernel without BPF_CMPXCHG refuses the atomic's immediate.
COMPARE_AND_SWAP = (mov64_imm(R1, 0) + store64(R10, -8, R1) + mov64_imm(R0, 0)
                    + mov64_imm(R1, 1) + cmpxchg64(R10, -8, R1) + RETURN_ZERO)


class BpfRefused(Exception):
    """The kernel refused a probe's call (`call`, e.g. BPF_PROG_LOAD) with `errno`."""

    def __init__(self, call: str, err: int):
        super().__init__(call, err)
        self.call, self.errno = call, err


_libc = None


def _bpf(command: int, attr: bytes, call: str) -> int:
    """bpf(command, attr): a descriptor, or BpfRefused with the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        raise BpfRefused(call, errno.ENOSYS)
    buffer = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    for attempt in range(2):
        result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(command), buffer,
                               ctypes.c_uint(_ATTR_SIZE))
        if result >= 0:
            return result
        err = ctypes.get_errno()
        # Before 5.11 BPF memory counts against RLIMIT_MEMLOCK (64 KiB by
        # default); bcc lifts it too.
        if err != errno.EPERM or attempt or not _lift_memlock():
            raise BpfRefused(call, err)
    raise AssertionError("unreachable")


def _lift_memlock() -> bool:
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return True
    except (ValueError, OSError):
        return False


def load_program(program_type: int, instructions: bytes) -> int:
    code = ctypes.create_string_buffer(instructions, len(instructions))
    license = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack("<IIQQ", program_type, len(instructions) // _INSTRUCTION.size,
                       ctypes.addressof(code), ctypes.addressof(license))
    return _bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD")


def create_map(map_type: int, key_size: int, value_size: int, entries: int,
               flags: int = 0) -> int:
    attr = struct.pack("<IIIII", map_type, key_size, value_size, entries, flags)
    return _bpf(BPF_MAP_CREATE, attr, "BPF_MAP_CREATE")


# ---- the probes ---------------------------------------------------------------
def _probe_cmpxchg() -> None:
    os.close(load_program(BPF_PROG_TYPE_SOCKET_FILTER, COMPARE_AND_SWAP))


def _probe_mmapable() -> None:
    fd = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, 1, BPF_F_MMAPABLE)
    try:
        try:
            view = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise BpfRefused("mmap", exc.errno) from None
        view.close()
    finally:
        os.close(fd)


def _probe_ringbuf() -> None:
    os.close(create_map(BPF_MAP_TYPE_RINGBUF, 0, 0, mmap.PAGESIZE))


def _probe_raw_tracepoint() -> None:
    program = load_program(BPF_PROG_TYPE_RAW_TRACEPOINT, RETURN_ZERO)
    try:
        name = ctypes.create_string_buffer(PROBE_TRACEPOINT)
        attr = struct.pack("<QI", ctypes.addressof(name), program)
        os.close(_bpf(BPF_RAW_TRACEPOINT_OPEN, attr, "BPF_RAW_TRACEPOINT_OPEN"))
    finally:
        os.close(program)


_PROBES = {RAW_TRACEPOINT: _probe_raw_tracepoint, CMPXCHG: _probe_cmpxchg,
           MMAPABLE: _probe_mmapable, RINGBUF: _probe_ringbuf}


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    why_not: str = ""  # e.g. "BPF_PROG_LOAD: EINVAL (Invalid argument)"
    seconds: float = 0.0


@dataclass
class Features:
    probes: dict[str, Probe]
    btf: Btf | None = field(default=None, repr=False)  # when BTF loaded

    def has(self, name: str) -> bool:
        return self.probes[name].ok

    def summary(self) -> str:
        """`kernel features: raw_tracepoint cmpxchg ... btf`, a missing one
        as `no ringbuf (BPF_MAP_CREATE: EINVAL)`."""
        parts = [probe.name if probe.ok else f"no {probe.name} ({probe.why_not})"
                 for probe in self.probes.values()]
        return "kernel features: " + " ".join(parts)

    def require(self, needs: dict[str, str]) -> None:
        """Exit 9 naming the first missing feature of `needs`: feature ->
        who uses it for what (`serve counts with it`)."""
        for name, use in needs.items():
            probe = self.probes[name]
            if not probe.ok:
                raise PrerequisiteError(
                    f"this kernel lacks {DESCRIPTIONS[name]}, feature {name}: "
                    f"{use} ({probe.why_not})",
                    EXIT_KERNEL_VERSION,
                )


def forced_missing(environ=os.environ) -> frozenset[str]:
    names = frozenset(environ.get(MISSING_OVERRIDE, "").replace(",", " ").split())
    unknown = sorted(names - set(FEATURES))
    if unknown:
        raise UsageError(f"{MISSING_OVERRIDE}: unknown feature {', '.join(unknown)}: "
                         f"expected some of {', '.join(FEATURES)}")
    return names


def _describe(refused: BpfRefused) -> str:
    name = errno.errorcode.get(refused.errno, str(refused.errno))
    return f"{refused.call}: {name} ({os.strerror(refused.errno)})"


def probe(name: str) -> tuple[Probe, Btf | None]:
    started = time.perf_counter()
    btf = None
    try:
        if name == BTF:
            btf = Btf.load()
        else:
            _PROBES[name]()
        ok, why_not = True, ""
    except BpfRefused as refused:
        ok, why_not = False, _describe(refused)
    except BtfError as exc:
        ok, why_not = False, str(exc)
    return Probe(name, ok, why_not, time.perf_counter() - started), btf


def probe_kernel(environ=os.environ) -> Features:
    """Every feature, each tried once (needs the privileges to load BPF)."""
    missing = forced_missing(environ)
    probes: dict[str, Probe] = {}
    btf = None
    for name in FEATURES:
        if name in missing:
            probes[name] = Probe(name, False, FORCED)
            continue
        probes[name], loaded = probe(name)
        btf = btf or loaded
    return Features(probes, btf)


def main() -> int:
    """`python -m tracer.features`: each probe's answer and time."""
    for name in FEATURES:
        result, _ = probe(name)
        print(f"{name:15} {'yes' if result.ok else 'no':3} {result.seconds * 1000:7.2f} ms"
              f"  {result.why_not}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
