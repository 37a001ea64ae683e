"""tracer.btf: synthetic BTF blobs for every shape the reader must handle,
and the running kernel's BTF checked against bpftool's own reading of it."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from tracer.btf import VMLINUX_BTF, Btf, BtfError, Member
from tracer.errors import EXIT_KERNEL_VERSION

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19


class BtfBuilder:
    """Encodes types as the kernel lays them out (include/uapi/linux/btf.h).
    Each method returns the new type's id (ids start at 1, 0 is void)."""

    def __init__(self):
        self.records: list[bytes] = []
        self.strings = bytearray(b"\0")

    def _name(self, name: str) -> int:
        if not name:
            return 0
        offset = len(self.strings)
        self.strings += name.encode() + b"\0"
        return offset

    def _add(self, kind, name, size_or_type, vlen=0, kind_flag=False, extra=()):
        info = (kind << 24) | vlen | (int(kind_flag) << 31)
        words = [self._name(name), info, size_or_type, *extra]
        self.records.append(words)
        return len(self.records)

    def int(self, name, size, bits=None, bit_offset=0, signed=False):
        bits = size * 8 if bits is None else bits
        return self._add(INT, name, size, extra=[(int(signed) << 24) | (bit_offset << 16) | bits])

    def composite(self, name, size, members, union=False, kind_flag=False):
        """members: (name, type id, bit offset[, bitfield bits])."""
        extra = []
        for member_name, type_id, bit_offset, *bits in members:
            offset_word = ((bits[0] if bits else 0) << 24 | bit_offset) if kind_flag else bit_offset
            extra += [self._name(member_name), type_id, offset_word]
        return self._add(UNION if union else STRUCT, name, size, len(members), kind_flag, extra)

    def ref(self, kind, type_id, name=""):
        """ptr, typedef, const, volatile, restrict, type_tag, func."""
        return self._add(kind, name, type_id)

    def fwd(self, name, union=False):
        return self._add(FWD, name, 0, kind_flag=union)

    def array(self, element_type, index_type, count):
        return self._add(ARRAY, "", 0, extra=[element_type, index_type, count])

    def every_other_kind(self, int_id):
        """One type of each kind the reader must skip, with items where the
        kind has them, so a wrong record size misplaces every later type."""
        self._add(ENUM, "colour", 4, 2, extra=[self._name("RED"), 0, self._name("BLUE"), 1])
        self._add(ENUM64, "big", 8, 2, extra=[self._name("A"), 1, 0, self._name("B"), 0, 1])
        proto = self._add(FUNC_PROTO, "", int_id, 3,
                          extra=[self._name("a"), int_id, self._name("b"), int_id, 0, 0])
        self._add(FUNC, "handler", proto)
        var = self._add(VAR, "counter", int_id, extra=[1])
        self._add(DATASEC, ".data", 8, 2, extra=[var, 0, 4, var, 4, 4])
        self._add(DECL_TAG, "tag", var, extra=[0xFFFFFFFF])
        self._add(FLOAT, "double", 8)
        self.ref(TYPE_TAG, int_id, "user")
        self.ref(RESTRICT, int_id)
        self.ref(VOLATILE, int_id)
        self.array(int_id, int_id, 3)
        self.fwd("elsewhere", union=True)

    def encode(self, order="<", version=1):
        types = b"".join(struct.pack(f"{order}{len(words)}I", *words) for words in self.records)
        header = struct.pack(f"{order}HBBIIIII", 0xEB9F, version, 0, 24,
                             0, len(types), len(types), len(self.strings))
        return header + types + bytes(self.strings)


def socket_like(builder=None, kind_flag=True):
    """A miniature of struct sock_common/sock: anonymous unions holding
    anonymous structs, typedefs and const in the way, a bitfield, a forward
    declaration and an empty struct of the same name before the real one."""
    b = builder or BtfBuilder()
    u8 = b.int("unsigned char", 1)
    u16 = b.int("short unsigned int", 2)
    u32 = b.int("unsigned int", 4)
    be16 = b.ref(TYPEDEF, u16, "__be16")
    b.every_other_kind(u32)
    b.fwd("sock_common")
    b.composite("sock_common", 0, [])
    ports = b.composite("", 4, [("skc_dport", be16, 0), ("skc_num", u16, 16)])
    portpair = b.composite("", 4, [("skc_portpair", u32, 0), ("", ports, 0)], union=True)
    common = b.composite("sock_common", 16, [
        ("skc_daddr", u32, 0),
        ("", portpair, 32),
        ("skc_family", b.ref(CONST, u16), 64),
        ("skc_state", b.ref(VOLATILE, u8), 80),
        ("skc_reuse", u8, 88, 4),
        ("skc_v6_daddr", b.array(u8, u32, 4), 96),
    ], kind_flag=kind_flag)
    common_t = b.ref(TYPEDEF, common, "sock_common_t")
    b.composite("sock", 32, [
        ("__sk_common", common_t, 0),
        ("sk_protocol", u16, 136, 8),   # a bitfield: as before Linux 5.6
        ("sk_socket", b.ref(PTR, u32), 192),
    ], kind_flag=True)
    return b


@pytest.fixture
def btf():
    return Btf.from_bytes(socket_like().encode())


def test_member_of_a_plain_struct(btf):
    family = btf.member("sock_common", "skc_family")
    assert family == Member(path="sock_common.skc_family", bit_offset=64, bitfield_size=0,
                            size=2, type_name="short unsigned int", type_kind="int")
    assert family.byte_offset == 8
    assert btf.struct_size("sock_common") == 16
    assert btf.struct_size("sock") == 32


def test_members_inside_anonymous_unions_and_structs(btf):
    assert btf.member("sock_common", "skc_portpair").byte_offset == 4
    dport = btf.member("sock_common", "skc_dport")
    assert (dport.byte_offset, dport.size, dport.type_name) == (4, 2, "short unsigned int")
    assert btf.member("sock_common", "skc_num").byte_offset == 6


def test_dotted_path_through_a_typedef(btf):
    assert btf.member("sock", "__sk_common.skc_num").byte_offset == 6
    assert btf.member("sock", "__sk_common.skc_state").bit_offset == 80
    common = btf.member("sock", "__sk_common")
    assert (common.type_kind, common.type_name, common.size) == ("struct", "sock_common", 16)


def test_sizes_of_arrays_and_pointers(btf):
    assert btf.member("sock", "__sk_common.skc_v6_daddr").size == 4
    socket = btf.member("sock", "sk_socket")
    assert (socket.type_kind, socket.size, socket.byte_offset) == ("ptr", 8, 24)


@pytest.mark.parametrize("kind_flag", [True, False])
def test_bitfield_has_no_byte_offset(kind_flag):
    b = BtfBuilder()
    u8 = b.int("unsigned char", 1)
    u32 = b.int("unsigned int", 4)
    if kind_flag:
        members = [("flags", u8, 0), ("sk_protocol", u32, 12, 8)]
    else:  # the older encoding: the int type itself is 8 bits at bit 4
        members = [("flags", u8, 0), ("sk_protocol", b.int("", 4, bits=8, bit_offset=4), 8)]
    b.composite("sock", 4, members, kind_flag=kind_flag)
    protocol = Btf.from_bytes(b.encode()).member("sock", "sk_protocol")
    assert (protocol.bit_offset, protocol.bitfield_size) == (12, 8)
    with pytest.raises(BtfError, match="8-bit bitfield"):
        protocol.byte_offset


def test_bitfield_from_the_builder_fixture(btf):
    reuse = btf.member("sock_common", "skc_reuse")
    assert (reuse.bit_offset, reuse.bitfield_size) == (88, 4)
    protocol = btf.member("sock", "sk_protocol")
    assert (protocol.bit_offset, protocol.bitfield_size) == (136, 8)


def test_unaligned_member_has_no_byte_offset():
    b = BtfBuilder()
    b.composite("odd", 2, [("x", b.int("unsigned char", 1), 3)])
    with pytest.raises(BtfError, match="not on a byte boundary"):
        Btf.from_bytes(b.encode()).member("odd", "x").byte_offset


def test_big_endian_blob_reads_the_same():
    blob = socket_like().encode(order=">")
    assert Btf.from_bytes(blob).member("sock", "__sk_common.skc_dport").byte_offset == 4


def test_struct_without_kind_flag():
    b = socket_like(kind_flag=False)
    btf = Btf.from_bytes(b.encode())
    assert btf.member("sock", "__sk_common.skc_family").byte_offset == 8


def test_only_forward_declared_or_empty_struct_has_no_members():
    b = BtfBuilder()
    b.fwd("sock")
    b.composite("sock", 0, [])
    btf = Btf.from_bytes(b.encode())
    assert btf.struct_size("sock") == 0
    with pytest.raises(BtfError, match="no member 'x'"):
        btf.member("sock", "x")


@pytest.mark.parametrize("struct_name, path, message", [
    ("nosuch", "x", "no struct or union named 'nosuch'"),
    ("sock", "sk_missing", r"sock \(struct sock\) has no member 'sk_missing'"),
    ("sock", "__sk_common.skc_nope", r"sock.__sk_common \(struct sock_common\) has no member"),
    ("sock", "sk_socket.x", "sock.sk_socket is a ptr, not a struct or union"),
    ("sock", "sk_protocol.x", "is a int, not a struct or union"),
    ("sock", "a..b", "bad member path"),
    ("sock", "", "bad member path"),
])
def test_missing_struct_or_member(btf, struct_name, path, message):
    with pytest.raises(BtfError, match=message) as raised:
        btf.member(struct_name, path)
    assert "\n" not in str(raised.value)
    assert raised.value.exit_code == EXIT_KERNEL_VERSION


def test_missing_file(tmp_path):
    with pytest.raises(BtfError, match=r"cannot read BTF .*/nope: No such file"):
        Btf.load(str(tmp_path / "nope"))


@pytest.mark.parametrize("blob, message", [
    (b"", "too short for a BTF header"),
    (b"\x7fELF" + bytes(40), "not BTF"),
    (socket_like().encode(version=2), "BTF version 2"),
])
def test_malformed_header(blob, message):
    with pytest.raises(BtfError, match=message):
        Btf.from_bytes(blob)


def test_every_truncation_is_a_one_line_error():
    blob = socket_like().encode()
    for length in range(len(blob)):
        with pytest.raises(BtfError) as raised:
            Btf.from_bytes(blob[:length])
        assert "\n" not in str(raised.value)


def test_type_section_that_ends_inside_a_record():
    b = BtfBuilder()
    b.composite("s", 4, [("a", 0, 0), ("b", 0, 0)])
    blob = bytearray(b.encode())
    blob[12:16] = struct.pack("<I", 12 + 12)  # type_len: header + one of two members
    with pytest.raises(BtfError, match="type section truncated in type 1"):
        Btf.from_bytes(bytes(blob))


def test_unknown_kind():
    b = BtfBuilder()
    b._add(25, "future", 4)
    with pytest.raises(BtfError, match="type 1 has unknown kind 25"):
        Btf.from_bytes(b.encode())


def test_reference_to_a_type_that_does_not_exist():
    b = BtfBuilder()
    b.composite("s", 4, [("a", 99, 0)])
    with pytest.raises(BtfError, match="reference to type 99"):
        Btf.from_bytes(b.encode()).member("s", "a")


def test_struct_containing_itself_anonymously_ends():
    b = BtfBuilder()
    b.composite("loop", 4, [("", 1, 0), ("", 1, 0)])
    with pytest.raises(BtfError, match="no member 'x'"):
        Btf.from_bytes(b.encode()).member("loop", "x")


def test_typedef_cycle_ends():
    b = BtfBuilder()
    b.ref(TYPEDEF, 2, "a")
    b.ref(TYPEDEF, 1, "b")
    b.composite("s", 4, [("x", 1, 0)])
    with pytest.raises(BtfError, match="typedef chain"):
        Btf.from_bytes(b.encode()).member("s", "x")


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_bytes_give_btf_error_or_an_answer(corruptions):
    blob = bytearray(socket_like().encode())
    for position, value in corruptions:
        blob[position % len(blob)] = value
    try:
        btf = Btf.from_bytes(bytes(blob))
        for struct_name, path in [("sock", "__sk_common.skc_dport"), ("sock", "sk_socket"),
                                  ("sock_common", "skc_v6_daddr")]:
            btf.member(struct_name, path)
        btf.struct_size("sock")
    except BtfError as error:
        assert "\n" not in str(error)


# -- the running kernel ---------------------------------------------------

# What the raw-tracepoint program reads (issue 13).
PROGRAM_MEMBERS = [("sock", f"__sk_common.{name}") for name in (
    "skc_family", "skc_state", "skc_num", "skc_dport", "skc_rcv_saddr", "skc_daddr",
    "skc_v6_rcv_saddr", "skc_v6_daddr", "skc_net")] + [
    ("sock", "sk_protocol"), ("sock", "sk_err"), ("sock", "sk_socket"),
    ("inet_sock", "inet_sport"), ("net", "net_cookie")]


def _cannot_run(reason: str) -> None:
    # As tests/kernel/conftest.py: CI must prove this, not skip it.
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a BTF test cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def kernel_btf():
    if not Path(VMLINUX_BTF).exists():
        _cannot_run(f"{VMLINUX_BTF} is absent (kernel without CONFIG_DEBUG_INFO_BTF)")
    return Btf.load()


@pytest.fixture(scope="module")
def bpftool_types(kernel_btf):
    """bpftool's raw dump, as {id: (kind, name, size, [(member, type id,
    bit offset, bitfield bits)])}, plus the id each qualifier refers to."""
    bpftool = shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")
    if not bpftool:
        _cannot_run("bpftool is not installed (make setup-test installs it)")
    dump = subprocess.run([bpftool, "btf", "dump", "file", VMLINUX_BTF, "format", "raw"],
                          check=True, capture_output=True, text=True).stdout
    types, current = {}, None
    header = re.compile(r"\[(\d+)\] (\w+) '([^']*)'(.*)")
    member = re.compile(r"\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?")
    for line in dump.splitlines():
        if found := header.fullmatch(line):
            attributes = dict(re.findall(r"(\w+)=(\w+)", found[4]))
            current = types[int(found[1])] = {
                "kind": found[2], "name": found[3], "members": [],
                "size": int(attributes.get("size", 0)),
                "type_id": int(attributes.get("type_id", 0))}
        elif current and current["kind"] in ("STRUCT", "UNION") and (found := member.match(line)):
            current["members"].append(
                (found[1], int(found[2]), int(found[3]), int(found[4] or 0)))
    return types


def _bpftool_struct(types, name):
    return next(t for t in types.values()
                if t["kind"] == "STRUCT" and t["name"] == name and t["members"])


def _flatten(types, struct, base=0):
    """Every named member, entering anonymous ones as C does."""
    for name, type_id, bit_offset, bits in struct["members"]:
        if name != "(anon)":
            yield name, base + bit_offset, bits
            continue
        inner = types[type_id]
        while inner["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            inner = types[inner["type_id"]]
        if inner["kind"] in ("STRUCT", "UNION"):
            yield from _flatten(types, inner, base + bit_offset)


@pytest.mark.parametrize("struct_name", ["sock_common", "sock", "inet_sock", "net"])
def test_every_member_agrees_with_bpftool(kernel_btf, bpftool_types, struct_name):
    expected = _bpftool_struct(bpftool_types, struct_name)
    assert kernel_btf.struct_size(struct_name) == expected["size"]
    flattened = list(_flatten(bpftool_types, expected))
    assert len(flattened) > 3
    for name, bit_offset, bits in flattened:
        found = kernel_btf.member(struct_name, name)
        assert (found.bit_offset, found.bitfield_size) == (bit_offset, bits), name


def test_program_members_resolve_on_this_kernel(kernel_btf, bpftool_types):
    flat = {struct_name: {name: (offset, bits) for name, offset, bits in
                          _flatten(bpftool_types, _bpftool_struct(bpftool_types, struct_name))}
            for struct_name in ("sock", "sock_common", "inet_sock", "net")}
    common_at = flat["sock"]["__sk_common"][0]
    for struct_name, path in PROGRAM_MEMBERS:
        found = kernel_btf.member(struct_name, path)
        if path.startswith("__sk_common."):
            offset, bits = flat["sock_common"][path.split(".")[1]]
            offset += common_at
        else:
            offset, bits = flat[struct_name][path]
        assert (found.bit_offset, found.bitfield_size) == (offset, bits), path
        if path != "sk_protocol" or not bits:  # a bitfield before Linux 5.6
            assert found.byte_offset == offset // 8
    # inet_sock embeds struct sock first: the same socket, the same offsets
    assert kernel_btf.member("inet_sock", "sk").bit_offset == 0
    assert (kernel_btf.member("inet_sock", "sk.__sk_common.skc_dport")
            == Member(**{**kernel_btf.member("sock", "__sk_common.skc_dport").__dict__,
                         "path": "inet_sock.sk.__sk_common.skc_dport"}))
