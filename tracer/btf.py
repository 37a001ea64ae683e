"""Offsets of kernel struct members, from the running kernel's BTF.

The raw-tracepoint program receives `struct sock *` and reads its fields
itself, so it must know where they are in *this* kernel: headers (often only
"near" ones are installed) can be wrong, BTF (/sys/kernel/btf/vmlinux) is what
the kernel was built with. This is a small reader of raw BTF (header, type
section, string section) that answers "where is sock.__sk_common.skc_dport"
and nothing more; the probe turns the answers into cflags.

Speed: it runs at every start. One pass over the type section records where
each type starts (and which ones are structs/unions, by name offset); a
struct's name is searched for only when asked, among the structs/unions. Measured on
kernel 6.18 (5.5 MB of BTF, 126,611 types), load + 15 member lookups, three
runs of 11 on 2 cores at load average ~4.9 (other agents' tests): medians
0.055, 0.072, 0.094 s; min 0.043 s, max 0.155 s. Most of it is the indexing
pass (~60 ms); reading the file ~5 ms. Measured with:
    python -m tracer.btf --time

Not handled: split BTF (kernel modules' BTF refers to vmlinux's types).
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass

from .errors import EXIT_KERNEL_VERSION, TcpstateError

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

_MAGIC = 0xEB9F
_HEADER = struct.Struct("HBBIIIII")  # magic version flags hdr_len type_off/len str_off/len

# BTF kinds (include/uapi/linux/btf.h)
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC = 9, 10, 11, 12, 13, 14, 15
_FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = 16, 17, 18, 19

KIND_NAMES = ("unknown", "int", "ptr", "array", "struct", "union", "enum", "fwd",
              "typedef", "volatile", "const", "restrict", "func", "func_proto",
              "var", "datasec", "float", "decl_tag", "type_tag", "enum64")

# Size of each kind's record in 32-bit words: 3 for struct btf_type, plus the
# fixed extra data, plus words per vlen item. 0 marks a kind this reader does
# not know (and so cannot skip).
_FIXED_WORDS = [0] * 32
_VLEN_WORDS = [0] * 32
for _kind in range(_INT, _ENUM64 + 1):
    _FIXED_WORDS[_kind] = 3
_FIXED_WORDS[_INT] += 1        # encoding, bit offset, bits
_FIXED_WORDS[_ARRAY] += 3      # element type, index type, nelems
_FIXED_WORDS[_VAR] += 1        # linkage
_FIXED_WORDS[_DECL_TAG] += 1   # component index
_VLEN_WORDS[_STRUCT] = _VLEN_WORDS[_UNION] = 3   # name, type, offset
_VLEN_WORDS[_ENUM] = 2                            # name, value
_VLEN_WORDS[_FUNC_PROTO] = 2                      # name, type
_VLEN_WORDS[_DATASEC] = 3                         # type, offset, size
_VLEN_WORDS[_ENUM64] = 3                          # name, value low, value high
del _kind

# Kinds that only qualify or rename another type: walked through.
_TRANSPARENT = frozenset((_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG))
_SIZED = frozenset((_INT, _STRUCT, _UNION, _ENUM, _FLOAT, _ENUM64))
_COMPOSITE = frozenset((_STRUCT, _UNION))
# BTF does not record the pointer size; the kernel's is the running Python's
# on every platform tcpstate runs on (same machine, same ABI).
_POINTER_SIZE = struct.calcsize("P")
_MAX_CHAIN = 64  # typedef/const/... hops: more means a malformed cycle


class BtfError(TcpstateError):
    """No BTF, unreadable or malformed BTF, or a struct/member it lacks.

    Exit 9 ("kernel lacks a feature the command needs"): a kernel without BTF is an
    old one or one built without CONFIG_DEBUG_INFO_BTF, and a missing member
    is a layout the raw path does not know. Callers on the `auto` path catch
    it and fall back to the classic tracepoint.
    """

    exit_code = EXIT_KERNEL_VERSION


@dataclass(frozen=True)
class Member:
    """Where a (possibly nested) member lies in its outermost struct.

    Offsets are in bits because bitfields are not byte-aligned: a program
    cannot read those with a plain load, so `byte_offset` refuses them.
    """

    path: str            # "sock.__sk_common.skc_family"
    bit_offset: int      # from the start of the outermost struct
    bitfield_size: int   # bits; 0 when not a bitfield
    size: int            # bytes of the member's type (typedefs etc. resolved)
    type_name: str       # that type's name ("" for pointers, arrays, anonymous)
    type_kind: str       # "int", "ptr", "struct", "array", ... (KIND_NAMES)

    @property
    def byte_offset(self) -> int:
        if self.bitfield_size:
            raise BtfError(f"{self.path} is a {self.bitfield_size}-bit bitfield: "
                           "it has no byte offset")
        if self.bit_offset % 8:
            raise BtfError(f"{self.path} starts at bit {self.bit_offset}, "
                           "not on a byte boundary")
        return self.bit_offset // 8


class Btf:
    """One BTF blob's types. Build with `load` or `from_bytes`."""

    def __init__(self, words: array, starts: list[int], composites: dict[int, list[int]],
                 strings: bytes, source: str):
        self._words = words            # the type section as u32, native order
        self._starts = starts          # type id -> index of its record in _words
        self._composites = composites  # name offset -> ids of structs/unions
        self._strings = strings
        self._source = source
        self._by_name: dict[str, list[int]] = {}  # filled as names are asked

    @classmethod
    def load(cls, path: str = VMLINUX_BTF) -> "Btf":
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise BtfError(f"cannot read BTF {path}: {exc.strerror or exc}") from None
        return cls.from_bytes(data, source=path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "BTF data") -> "Btf":
        if len(data) < _HEADER.size:
            raise BtfError(f"{source}: {len(data)} bytes is too short for a BTF header")
        if data[:2] == _MAGIC.to_bytes(2, "little"):
            order = "<"
        elif data[:2] == _MAGIC.to_bytes(2, "big"):
            order = ">"
        else:
            raise BtfError(f"{source}: not BTF (magic {data[:2].hex()}, "
                           f"expected {_MAGIC:#06x})")
        (_, version, _, header_len, type_off, type_len,
         str_off, str_len) = struct.unpack_from(order + _HEADER.format, data)
        if version != 1:
            raise BtfError(f"{source}: BTF version {version}, this reader knows 1")
        if header_len < _HEADER.size or header_len > len(data):
            raise BtfError(f"{source}: bad BTF header length {header_len}")
        types_at, strings_at = header_len + type_off, header_len + str_off
        if types_at + type_len > len(data) or strings_at + str_len > len(data):
            raise BtfError(f"{source}: truncated ({len(data)} bytes, sections end at "
                           f"{max(types_at + type_len, strings_at + str_len)})")
        if type_len % 4 or types_at % 4:
            raise BtfError(f"{source}: type section not 4-byte aligned")
        words = array("I")
        if words.itemsize != 4:  # pragma: no cover - every Linux ABI has a 4-byte int
            raise BtfError("this Python's array('I') is not 32-bit")
        words.frombytes(memoryview(data)[types_at:types_at + type_len])
        if order != ("<" if sys.byteorder == "little" else ">"):
            words.byteswap()
        strings = bytes(data[strings_at:strings_at + str_len])
        starts, composites = _index_types(words, source)
        return cls(words, starts, composites, strings, source)

    def struct_size(self, name: str) -> int:
        """Byte size of struct (or union) `name`."""
        return self._words[self._starts[self._composite_id(name)] + 2]

    def member(self, struct_name: str, path: str) -> Member:
        """Where `path` (dotted: "__sk_common.skc_family") lies in `struct_name`.

        Anonymous struct/union members are entered transparently, as C does;
        typedefs, const, volatile, restrict and type tags are looked through.
        """
        parts = path.split(".")
        if not all(parts):
            raise BtfError(f"bad member path {path!r}")
        type_id = self._composite_id(struct_name)
        where = struct_name
        bit_offset = bitfield_size = 0
        for part in parts:
            start = self._start(type_id)
            if self._kind(start) not in _COMPOSITE:
                raise BtfError(f"{self._source}: {where} is a "
                               f"{KIND_NAMES[self._kind(start)]}, not a struct or union")
            found = self._find_member(type_id, part, set(), 0)
            if found is None:
                raise BtfError(f"{self._source}: {where} (struct "
                               f"{self._composite_name(type_id)}) has no member {part!r}")
            member_type, member_offset, bitfield_size = found
            bit_offset += member_offset
            type_id = self._resolve(member_type)
            where = f"{where}.{part}"
        start = self._start(type_id)
        kind = self._kind(start)
        if not bitfield_size and kind == _INT:
            # Without kind_flag a bitfield is a member whose int type is narrower
            # than its size, or starts at a bit offset of its own.
            encoding = self._words[start + 3]
            bits, int_offset = encoding & 0xFF, (encoding >> 16) & 0xFF
            if int_offset or bits != self._words[start + 2] * 8:
                bitfield_size = bits
                bit_offset += int_offset
        return Member(path=where, bit_offset=bit_offset, bitfield_size=bitfield_size,
                      size=self._size(type_id), type_name=self._name(self._words[start]),
                      type_kind=KIND_NAMES[kind])

    # -- internals -------------------------------------------------------

    def _find_member(self, type_id: int, name: str, searched: set[int], depth: int):
        """(type id, bit offset, bitfield bits) of `name` in a struct/union,
        searching its anonymous struct/union members too; None if absent.
        `searched` keeps malformed BTF (a struct inside itself) from looping."""
        searched.add(type_id)
        if depth > _MAX_CHAIN:
            raise BtfError(f"{self._source}: anonymous members nested too deep")
        words, strings = self._words, self._strings
        wanted = name.encode() + b"\0"
        start = self._start(type_id)
        info = words[start + 1]
        kind_flag = info >> 31
        members = range(start + 3, start + 3 + 3 * (info & 0xFFFF), 3)
        anonymous = []
        for at in members:
            name_off, member_type, offset_word = words[at], words[at + 1], words[at + 2]
            if kind_flag:
                member_offset, bits = offset_word & 0xFFFFFF, offset_word >> 24
            else:
                member_offset, bits = offset_word, 0
            if strings.startswith(wanted, name_off):
                return member_type, member_offset, bits
            if name_off == 0 or strings.startswith(b"\0", name_off):
                anonymous.append((member_type, member_offset))
        for member_type, member_offset in anonymous:
            inner = self._resolve(member_type)
            if inner not in searched and self._kind(self._start(inner)) in _COMPOSITE:
                found = self._find_member(inner, name, searched, depth + 1)
                if found is not None:
                    return found[0], member_offset + found[1], found[2]
        return None

    def _composite_id(self, name: str) -> int:
        """The struct/union named `name`, preferring one with members: a
        struct declared but not defined somewhere may appear empty."""
        ids = self._by_name.get(name)
        if ids is None:
            # Compare bytes in place rather than decode ~10,000 struct names.
            wanted, strings = name.encode() + b"\0", self._strings
            ids = [type_id for name_off, with_name in self._composites.items()
                   if strings.startswith(wanted, name_off) for type_id in with_name]
            self._by_name[name] = ids
        if not ids:
            raise BtfError(f"{self._source}: no struct or union named {name!r}")
        for type_id in ids:
            if self._words[self._starts[type_id] + 1] & 0xFFFF:
                return type_id
        return ids[0]

    def _composite_name(self, type_id: int) -> str:
        return self._name(self._words[self._start(type_id)]) or "(anonymous)"

    def _start(self, type_id: int) -> int:
        if not 0 < type_id < len(self._starts):
            raise BtfError(f"{self._source}: reference to type {type_id}, which "
                           f"does not exist ({len(self._starts) - 1} types)")
        return self._starts[type_id]

    def _kind(self, start: int) -> int:
        return (self._words[start + 1] >> 24) & 0x1F

    def _resolve(self, type_id: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the real type."""
        for _ in range(_MAX_CHAIN):
            if type_id == 0:
                return 0
            start = self._start(type_id)
            if self._kind(start) not in _TRANSPARENT:
                return type_id
            type_id = self._words[start + 2]
        raise BtfError(f"{self._source}: typedef chain longer than {_MAX_CHAIN} (a cycle?)")

    def _size(self, type_id: int, depth: int = 0) -> int:
        type_id = self._resolve(type_id)
        if type_id == 0:
            raise BtfError(f"{self._source}: a member of type void has no size")
        start = self._start(type_id)
        kind = self._kind(start)
        if kind in _SIZED:
            return self._words[start + 2]
        if kind == _PTR:
            return _POINTER_SIZE
        if kind == _ARRAY and depth < _MAX_CHAIN:
            return self._words[start + 5] * self._size(self._words[start + 3], depth + 1)
        raise BtfError(f"{self._source}: type {type_id} ({KIND_NAMES[kind]}) has no size")

    def _name(self, name_off: int) -> str:
        strings = self._strings
        if name_off >= len(strings):
            raise BtfError(f"{self._source}: name offset {name_off} is past the "
                           f"string section ({len(strings)} bytes)")
        end = strings.find(b"\0", name_off)
        if end < 0:
            raise BtfError(f"{self._source}: string section does not end with NUL")
        return strings[name_off:end].decode("utf-8", "replace")


def _index_types(words: array, source: str) -> tuple[list[int], dict[int, list[int]]]:
    """Where each type's record starts (index 0 is void, which has none), and
    the struct/union ids by name offset. The hot loop of `load`: kept flat."""
    fixed, per_item = _FIXED_WORDS, _VLEN_WORDS
    starts = [0]
    composites: dict[int, list[int]] = {}
    record_start = starts.append
    at, end = 0, len(words)
    try:
        while at < end:
            record_start(at)
            info = words[at + 1]
            kind = (info >> 24) & 0x1F
            step = fixed[kind]
            if not step:
                raise BtfError(f"{source}: type {len(starts) - 1} has unknown kind {kind}")
            if kind == _STRUCT or kind == _UNION:
                composites.setdefault(words[at], []).append(len(starts) - 1)
            at += step + per_item[kind] * (info & 0xFFFF)
    except IndexError:
        at = end + 1
    if at != end:
        raise BtfError(f"{source}: type section truncated in type {len(starts) - 1}")
    return starts, composites


def _time_vmlinux() -> None:
    """`python -m tracer.btf --time`: the figure quoted in the docstring."""
    import statistics
    import time

    lookups = [("sock", "__sk_common." + name) for name in (
        "skc_family", "skc_state", "skc_num", "skc_dport", "skc_rcv_saddr",
        "skc_daddr", "skc_v6_rcv_saddr", "skc_v6_daddr", "skc_net")]
    lookups += [("sock", "sk_protocol"), ("sock", "sk_err"), ("sock", "sk_socket"),
                ("inet_sock", "inet_sport"), ("net", "net_cookie"),
                ("sock_common", "skc_dport")]
    times = []
    for _ in range(11):
        began = time.perf_counter()
        btf = Btf.load()
        for struct_name, path in lookups:
            btf.member(struct_name, path)
        times.append(time.perf_counter() - began)
    print(f"load + {len(lookups)} lookups, 11 runs: median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s, max {max(times):.3f} s")
    for struct_name, path in lookups:
        print(f"  {struct_name}.{path}: {btf.member(struct_name, path)}")


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--time"]:
        _time_vmlinux()
    else:
        sys.exit("usage: python -m tracer.btf --time")
