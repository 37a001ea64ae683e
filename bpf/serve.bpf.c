// SPDX-License-Identifier: Apache-2.0
/*
 * serve.bpf.c — the program of `tcpstate serve`.
 *
 * Every TCP state change of every socket in every network namespace is
 * aggregated here, in per-CPU cells of memory-mapped arrays, so that user
 * space reads totals at scrape time with no system call and does no work
 * per event: transition counters, per-state and per-connection duration
 * histograms, live sockets per state, and (CLOSE_REASONS) closes by reason.
 */
/* With close reasons a close copies sk_err and sk_lock.owned from the
 * socket; it pays for that copy by reading inet_sport only where it needs
 * the port (tcpstate.h): most closes find their port in the table. bench/
 * (figure 1c) also builds the program without reasons with it. */
#if defined(CLOSE_REASONS) && !defined(LAZY_CLOSE_SPORT)
#define LAZY_CLOSE_SPORT
#endif
#include "tcpstate.h"

/* ---- maps the shared code uses (see tcpstate.h) ---------------------------- */

MMAPABLE_ARRAY(counters, u64, NCPUS * NCOUNTERS);
/* Memory-mapped too: the ages in state and `tcpstate sockets` read it with
 * no system call. */
MMAPABLE_ARRAY(socket_table, struct table_row, TABLE_BUCKETS);
#if NPORT_SLOTS > 1
/* port number -> slot (0 = other), written once by user space before the
 * program is attached. */
BPF_ARRAY(service_port_slot, u8, 65536);
/* Listeners per local port, in any namespace: seeded by user space at
 * start, then +1/-1 as listeners open and close. Tells a socket first seen
 * after its birth whether it is a server's (its local port listens) or a
 * client's, whose ephemeral local port may be a service port's number. */
BPF_ARRAY(listeners, s64, 65536);
#endif

static __always_inline void count(u32 cpu, int which)
{
    u32 key = cpu * NCOUNTERS + which;
    u64 *value = counters.lookup(&key);
    if (value)
        CELL_ADD(value, 1);
}

#ifdef RAW_TRACEPOINT
#define TCP_PROTOS 4 /* tcp_proto_known() and tcp_proto_learn() spell out each */
/* struct proto addresses seen on TCP sockets: the few TCP has (v4, v6, and
 * MPTCP's subflow variants), learned as the program meets them. */
struct tcp_protos {
    u64 proto[TCP_PROTOS];
};
BPF_ARRAY(tcp_protos, struct tcp_protos, 1);

/* No loops in this file: Linux 6.1's verifier refuses a loop that clang
 * enters in its middle (its back-edge is then a fall-through: "back-edge
 * from insn N to N+1"), and clang does not unroll every loop that
 * `#pragma unroll` asks it to (one with a compare-and-swap it did not).
 * So repeats are written out. */
static __always_inline bool tcp_proto_known(u64 proto)
{
    u32 zero = 0;
    struct tcp_protos *known = tcp_protos.lookup(&zero);
    if (!known || !proto)
        return false;
    return known->proto[0] == proto || known->proto[1] == proto ||
           known->proto[2] == proto || known->proto[3] == proto;
}

/* Puts proto in an empty slot; true once the slot holds proto (another CPU
 * may have put it there first), false if it holds another. */
static __always_inline bool proto_claim(u64 *slot, u64 proto)
{
    u64 was = *slot;
    if (was == 0)
        was = __sync_val_compare_and_swap(slot, 0, proto);
    return was == 0 || was == proto;
}

static __always_inline void tcp_proto_learn(u64 proto)
{
    u32 zero = 0;
    struct tcp_protos *known = tcp_protos.lookup(&zero);
    if (known && !proto_claim(&known->proto[0], proto) &&
        !proto_claim(&known->proto[1], proto) && !proto_claim(&known->proto[2], proto))
        proto_claim(&known->proto[3], proto);
}
#endif

static __always_inline u32 service_slot(u16 port)
{
#if NPORT_SLOTS > 1
    u32 key = port;
    u8 *slot = service_port_slot.lookup(&key);
    if (slot)
        return *slot % NPORT_SLOTS;
#endif
    return 0;
}

#define TRANSITION_INDEX(port, fam, old, new) \
    ((((port) * NFAMILIES + (fam)) * NSTATES + (old)) * NSTATES + (new))
#define NTRANSITIONS (NPORT_SLOTS * NFAMILIES * NSTATES * NSTATES)
#define LIVE_INDEX(port, fam, state) \
    (((port) * NFAMILIES + (fam)) * NSTATES + (state))
#define NLIVE (NPORT_SLOTS * NFAMILIES * NSTATES)
#define CONN_INDEX(port, fam, side) (((port) * NFAMILIES + (fam)) * NSIDES + (side))
#define NCONN (NPORT_SLOTS * NFAMILIES * NSIDES)

MMAPABLE_ARRAY(transitions, u64, NCPUS * NTRANSITIONS);
MMAPABLE_ARRAY(state_duration_buckets, u64, NCPUS * NTRANSITIONS * NBUCKETS);
MMAPABLE_ARRAY(state_duration_sum_ns, u64, NCPUS * NTRANSITIONS);
MMAPABLE_ARRAY(connection_duration_buckets, u64, NCPUS * NCONN * NBUCKETS);
MMAPABLE_ARRAY(connection_duration_sum_ns, u64, NCPUS * NCONN);
/* Live sockets in the table, per state: +1 on entry, -1 on exit, each in
 * the cell the socket's entry names. */
MMAPABLE_ARRAY(live_tracked, s64, NCPUS * NLIVE);
/* Live sockets not in the table (born before start, or evicted): seeded by
 * user space from every namespace at start, drained by the transitions of
 * sockets the table does not know, never below zero. Shared, so atomics. */
MMAPABLE_ARRAY(live_untracked, s64, NLIVE);

#ifdef CLOSE_REASONS
#define CLOSE_INDEX(port, fam, old, reason) \
    ((((port) * NFAMILIES + (fam)) * NSTATES + (old)) * NREASONS + (reason))
#define NCLOSES (NPORT_SLOTS * NFAMILIES * NSTATES * NREASONS)
MMAPABLE_ARRAY(closes, u64, NCPUS * NCLOSES);
/* evidence -> reason code: written once by user space before attach */
BPF_ARRAY(close_reason, u8, CLOSE_EVIDENCE_CELLS);

static __always_inline u32 reason_of(u32 evidence)
{
    u8 *reason = close_reason.lookup(&evidence);
    return reason ? *reason % NREASONS : REASON_OTHER;
}

static __always_inline void count_close(u32 cpu, u32 index)
{
    u32 key = cpu * NCLOSES + index;
    u64 *value = closes.lookup(&key);
    if (value)
        CELL_ADD(value, 1);
}
#endif

static __always_inline void add_cell(u64 *cell, u64 value)
{
    if (cell)
        CELL_ADD(cell, value);
}

static __always_inline void count_transition(u32 cpu, u32 index)
{
    u32 key = cpu * NTRANSITIONS + index;
    add_cell(transitions.lookup(&key), 1);
}

/* Their sum over cells is the table's entries: no insert or remove
 * counters needed. */
static __always_inline void live_add(u32 cpu, u32 index, s64 delta)
{
    u32 key = cpu * NLIVE + index;
    s64 *value = live_tracked.lookup(&key);
    if (value)
        CELL_ADD(value, delta);
}

static __always_inline u32 live_index_of(const struct sock_entry *entry)
{
    return LIVE_INDEX(entry->port_slot % NPORT_SLOTS, entry->family & 1,
                      entry->state % NSTATES);
}

static __always_inline void untracked_add(u32 index)
{
    s64 *value = live_untracked.lookup(&index);
    if (value)
        __sync_fetch_and_add(value, 1);
}

/* Take one from a shared count, never below zero. The program may not use
 * an atomic add's result here (no BPF_FETCH from bcc's clang), so it
 * compares and swaps; each failure means another CPU changed the count,
 * so it succeeds within a few tries unless many CPUs hit one cell at once:
 * after TAKE_TRIES it gives up, and that is counted. Written out, not a
 * loop (see tcp_proto_known). Returns false when the count was zero. */
#define TAKE_TRY()                                                          \
    do {                                                                    \
        seen = *value;                                                      \
        if (seen <= 0)                                                      \
            return false;                                                   \
        if (__sync_val_compare_and_swap(value, seen, seen - 1) == seen)     \
            return true;                                                    \
    } while (0)
#define TAKE_TRY4() do { TAKE_TRY(); TAKE_TRY(); TAKE_TRY(); TAKE_TRY(); } while (0)
#define TAKE_TRIES 16

static __always_inline bool take_one(u32 cpu, s64 *value)
{
    s64 seen;
    TAKE_TRY4();
    TAKE_TRY4();
    TAKE_TRY4();
    TAKE_TRY4();
    count(cpu, C_CONTENDED);
    return true;
}

/* Take one socket out of the untracked pool: a socket whose state was
 * never counted must not decrement another's. Returns false when the pool
 * was empty: this socket was counted nowhere. */
static __always_inline bool untracked_drain(u32 cpu, u32 index)
{
    s64 *value = live_untracked.lookup(&index);
    return !value || take_one(cpu, value);
}

/* A full row pushed a socket out: its count moves to the untracked pool. */
static __always_inline void table_evicted(u32 cpu, const struct sock_entry *gone)
{
    u32 index = live_index_of(gone);
    live_add(cpu, index, -1);
    untracked_add(index);
}

/* A stale entry's count leaves the cell it was in. */
static __always_inline void table_stale(u32 cpu, struct sock_entry *stale, bool birth)
{
    live_add(cpu, live_index_of(stale), -1);
    if (!birth)
        count(cpu, C_STALE_ENTRIES);
}

/* One function per histogram: bcc binds a map only where it is named. */
static __always_inline void observe_state(u32 cpu, u32 index, u64 ns)
{
    u32 key = (cpu * NTRANSITIONS + index) * NBUCKETS + duration_slot(ns);
    add_cell(state_duration_buckets.lookup(&key), 1);
    key = cpu * NTRANSITIONS + index;
    add_cell(state_duration_sum_ns.lookup(&key), ns);
}

static __always_inline void observe_connection(u32 cpu, u32 index, u64 ns)
{
    u32 key = (cpu * NCONN + index) * NBUCKETS + duration_slot(ns);
    add_cell(connection_duration_buckets.lookup(&key), 1);
    key = cpu * NCONN + index;
    add_cell(connection_duration_sum_ns.lookup(&key), ns);
}

/* A socket's service port: the local port of listeners and accepted
 * sockets, the remote port of outgoing connections (whose ephemeral local
 * port may well be a service port's number). Fixed at birth. */
static __always_inline u32 port_slot_at_birth(const struct state_change *c)
{
    return service_slot(c->new == TCP_SYN_SENT ? c->dport : c->sport);
}

/* A socket first seen later is a server's if something listens on its
 * local port, else a client's: the same slot its birth would have given
 * (tracer/probe.py seeds with the same rule). */
static __always_inline u32 port_slot_unseen(const struct state_change *c)
{
#if NPORT_SLOTS > 1
    u32 key = c->sport;
    s64 *listening = listeners.lookup(&key);
    if (listening && *listening > 0)
        return service_slot(c->sport);
    u32 slot = service_slot(c->dport);
    return slot ? slot : service_slot(c->sport);
#else
    return 0;
#endif
}

static __always_inline void count_listeners(const struct state_change *c)
{
#if NPORT_SLOTS > 1
    u32 key = c->sport;
    s64 *listening;
    if (c->new == TCP_LISTEN) {
        listening = listeners.lookup(&key);
        if (listening)
            __sync_fetch_and_add(listening, 1);
    } else if (c->old == TCP_LISTEN && c->new == TCP_CLOSE) {
        listening = listeners.lookup(&key);
        if (listening)
            take_one(c->cpu, listening);
    }
#endif
}

STATE_CHANGE_HANDLER(on_state_change)
{
    struct state_change c = {};
    int read = read_change(ctx, &c);
    if (read) {
        if (read > 0)
            count(bpf_get_smp_processor_id(), C_OTHER_PROTOCOL);
        return 0;
    }
    u32 cpu = c.cpu;
    if (c.old == TCP_LISTEN)
        resolve_sport(ctx, &c);
    count_listeners(&c);
    u64 now = bpf_ktime_get_ns();
    u32 row_index = row_of(c.sk);
    struct table_row *row = socket_table.lookup(&row_index);
    if (!row)
        return 0;
    u32 way;
    struct sock_entry *entry = entry_of(cpu, row, &c, &way);
    if ((!entry || !entry->state) && !c.birth)
        resolve_sport(ctx, &c);   /* port_slot_unseen reads it */
    if (entry && !entry->state) {
        entry->family = c.fam;
        entry->port_slot = c.birth ? port_slot_at_birth(&c) : port_slot_unseen(&c);
    }

    u32 port, fam;
    if (entry && entry->state) {
        port = entry->port_slot % NPORT_SLOTS;
        fam = entry->family & 1;
    } else if (entry) {
        port = entry->port_slot % NPORT_SLOTS;
        fam = c.fam;
    } else {
        port = c.birth ? port_slot_at_birth(&c) : port_slot_unseen(&c);
        fam = c.fam;
    }
    u32 index = TRANSITION_INDEX(port, fam, c.old, c.new);
#ifdef CLOSE_REASONS
    /* A close is counted once, by reason: user space sums the reasons
     * into its transition (tracer/serve_maps.py), so a close costs one
     * more copy from the socket, not one more count. */
    if (c.new == TCP_CLOSE)
        count_close(cpu, CLOSE_INDEX(port, fam, c.old, close_reason_code(ctx, &c)));
    else
#endif
        count_transition(cpu, index);

    if (entry && entry->state) {
        observe_state(cpu, index, now - entry->entered_ns);
        live_add(cpu, live_index_of(entry), -1);
    } else if (!c.birth) {
        count(cpu, C_DURATION_UNKNOWN);
        if (!entry && !untracked_drain(cpu, LIVE_INDEX(port, fam, c.old)))
            count(cpu, C_UNSEEN_SOCKETS);
    }

    if (c.new == TCP_CLOSE) {
        if (entry) {
            if (entry->state && entry->born_ns && entry->side)
                observe_connection(cpu, CONN_INDEX(port, fam, entry->side % NSIDES),
                                   now - entry->born_ns);
            release_way(row, way);
        }
        return 0;
    }

    if (!entry) {
        way = claim_way(cpu, row, c.sk);
        if (way >= TABLE_WAYS) {
            untracked_add(LIVE_INDEX(port, fam, c.new));
            return 0;
        }
        entry = &row->entry[way];
        entry->born_ns = 0;
        entry->side = 0;
    }
    if (c.birth) {
        entry->born_ns = now;
        entry->side = c.old == TCP_LISTEN ? SIDE_SERVER :
                      c.new == TCP_SYN_SENT ? SIDE_CLIENT : 0;
    }
    entry->family = fam;
    entry->port_slot = port;
    entry->tuple_hash = tuple_hash_of(ctx, &c);
    entry->entered_ns = now;
    entry->state = c.new;   /* last: the entry is whole from here on */
    live_add(cpu, LIVE_INDEX(port, fam, c.new), 1);
    return 0;
}
