"""The socket table's readers without a kernel: the ages-in-state histogram
over a table laid out as bpf/tcpstate.h lays it out, and the 4-tuple hash
against a plain-integer transcription of tuple_hash_of."""

from __future__ import annotations

import numpy as np

from tracer.metrics import BUCKET_BOUNDS_SECONDS, NBUCKETS, slot_of_ns, slots_of_ns
from tracer.socket_table import ENTRY_DTYPE, age_histogram, live_entries, row_dtype, tuple_hashes
from tracer.states import NSTATES, code_of

NOW = 10**13  # CLOCK_MONOTONIC ns, as bpf_ktime_get_ns


def table(rows: int = 4, ways: int = 8) -> np.ndarray:
    return np.zeros(rows, row_dtype(ways))


def put(rows: np.ndarray, row: int, way: int, *, state: str, age_ns: int, family: int = 0,
        port_slot: int = 0, sk: int = 0xFFFF888000001000) -> None:
    rows[row]["sk"][way] = sk + 64 * (row * 8 + way)
    entry = rows[row]["entry"][way]
    entry["state"], entry["family"], entry["port_slot"] = code_of(state), family, port_slot
    entry["entered_ns"] = NOW - age_ns


def flat(rows: np.ndarray):
    """The live entries, read as the mapped table is: from its 64-bit words."""
    ways = rows.dtype["sk"].shape[0]
    return (live_entries(rows.view(np.uint64).reshape(len(rows), -1), ways),)


def test_the_layout_is_the_c_structs():
    assert ENTRY_DTYPE.itemsize == 24  # serve's entry stays 24 bytes
    assert row_dtype(8).itemsize == 8 * 8 + 8 * 24
    assert ENTRY_DTYPE.fields["state"][1] == 16 and ENTRY_DTYPE.fields["tuple_hash"][1] == 20


def test_vectorised_slots_are_the_kernels():
    samples = [0, 1, 2, 10**15, 2**53 - 1, 2**53, 2**62]
    samples += [2**bits + delta for bits in range(1, 50) for delta in (-1, 0, 1)]
    assert list(slots_of_ns(samples)) == [slot_of_ns(ns) for ns in samples]


def test_ages_fall_in_the_slot_whose_bound_holds_them():
    rows = table()
    put(rows, 0, 0, state="close_wait", age_ns=2**39)         # exactly on the stuck bound
    put(rows, 0, 1, state="close_wait", age_ns=2**39 + 1)     # just past it
    put(rows, 1, 3, state="close_wait", age_ns=3 * 10**9)
    put(rows, 2, 7, state="established", age_ns=5, family=1, port_slot=2)
    buckets, sums = age_histogram(*flat(rows), NOW, port_slots=3)
    cw = buckets[0, 0, code_of("close_wait")]
    assert cw.sum() == 3
    assert BUCKET_BOUNDS_SECONDS[29] == 549.755813888
    assert cw[29] == 1 and cw[30] == 1 and cw[slot_of_ns(3 * 10**9)] == 1
    assert sums[0, 0, code_of("close_wait")] == 2**39 + 2**39 + 1 + 3 * 10**9
    assert buckets[2, 1, code_of("established"), 0] == 1
    assert buckets.sum() == 4 and buckets.shape == (3, 2, NSTATES, NBUCKETS)


def test_ways_being_claimed_free_or_entered_after_the_read_are_handled():
    rows = table()
    put(rows, 0, 0, state="established", age_ns=100)
    rows[0]["entry"][0]["state"] = 0                  # claimed, not written yet
    put(rows, 0, 1, state="established", age_ns=100)
    rows[0]["sk"][1] = 0                              # released
    put(rows, 1, 0, state="syn_sent", age_ns=-50)     # entered after `now` was taken
    buckets, sums = age_histogram(*flat(rows), NOW, port_slots=1)
    assert buckets.sum() == 1 and buckets[0, 0, code_of("syn_sent"), 0] == 1
    assert sums.sum() == 0


def test_a_table_of_100k_sockets_reads_every_one_with_its_own_fields():
    rows = table(rows=32768)
    rng = np.random.default_rng(1)
    live = rng.choice(rows.size * 8, 100_000, replace=False)
    keys = rows["sk"].reshape(-1).copy()
    entries = rows["entry"].reshape(-1).copy()
    keys[live] = np.arange(1, live.size + 1)
    entries["state"][live] = code_of("established")
    entries["entered_ns"][live] = NOW - rng.integers(0, 2**41, live.size)
    entries["tuple_hash"][live] = live  # which way each came from
    rows["sk"], rows["entry"] = keys.reshape(-1, 8), entries.reshape(-1, 8)
    (found,) = flat(rows)
    assert sorted(found["tuple_hash"]) == sorted(live)
    assert (found["entered_ns"] == entries["entered_ns"][found["tuple_hash"]]).all()
    buckets, _ = age_histogram(found, NOW, port_slots=1)
    assert buckets.sum() == 100_000


# ---- the 4-tuple hash: tuple_hash_of in bpf/tcpstate.h, by hand ----------
def reference_hash(sport: int, dport: int, words: list[int]) -> int:
    value = (sport << 16) | dport
    for word in words:
        value = ((value ^ word) * 0x9E3779B1) & 0xFFFFFFFF
        value ^= value >> 16
    return value


def test_tuple_hash_mirrors_the_programs():
    # 127.0.0.1:47001 -> 127.0.0.2:5432 as /proc/net/tcp prints it
    local, remote = int("0100007F", 16), int("0200007F", 16)
    got = tuple_hashes(np.array([47001]), np.array([5432]), np.array([[local]]),
                       np.array([[remote]]))
    assert int(got[0]) == reference_hash(47001, 5432, [local, remote])
    v6_local = [0, 0, int("FFFF0000", 16), local]
    v6_remote = [int("000080FE", 16), 0, 0, int("01000000", 16)]
    got = tuple_hashes(np.array([1, 65535]), np.array([65535, 0]),
                       np.array([v6_local, v6_remote]), np.array([v6_remote, v6_local]))
    assert [int(h) for h in got] == [reference_hash(1, 65535, v6_local + v6_remote),
                                     reference_hash(65535, 0, v6_remote + v6_local)]
