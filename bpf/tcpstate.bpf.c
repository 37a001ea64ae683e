// SPDX-License-Identifier: Apache-2.0
/*
 * tcpstate.bpf.c — the only kernel code of tcpstate.
 *
 * One handler on the tracepoint sock:inet_sock_set_state (Linux >= 4.16),
 * which fires on every TCP state change of every socket in every network
 * namespace. Everything is aggregated here, in per-CPU arrays, so that user
 * space reads totals at scrape time and does no work per event.
 *
 * Every field comes from the tracepoint's arguments; nothing is read by
 * offset from kernel structs, so nearby kernel headers are good enough.
 *
 * Compile-time constants arrive through cflags from tracer/ (their one home):
 *   NSTATES, NBUCKETS, BUCKET_MIN_LOG2   state and histogram geometry
 *   NPORT_SLOTS      1 + number of service ports (slot 0 is "other")
 *   TABLE_BUCKETS, TABLE_WAYS   socket table rows, and sockets per row
 *   TRACE_EVENTS     defined by `tcpstate trace`: emit filtered events, and
 *                    keep only what a trace needs (the socket table with
 *                    birth, entry time and owner; no counters, histograms
 *                    or gauges, which only `tcpstate serve` exports)
 *   RINGBUF_PAGES    with TRACE_EVENTS: ring buffer size in pages
 *   NO_SOCKET_TABLE, NO_HISTOGRAMS   bench/ only: leave a feature out to
 *                    measure its cost (figure 1 of BENCHMARKS.md)
 */
#include <uapi/linux/in.h>
#include <linux/socket.h>
#include <net/tcp_states.h>

#define NFAMILIES 2
#define NSIDES 3           /* 0 unknown/listener, 1 client, 2 server */
#if !defined(TABLE_WAYS) || TABLE_WAYS < 1 || TABLE_WAYS > 16
#error "TABLE_WAYS (sockets per socket-table row) comes from tracer/probe.py"
#endif
#define TASK_COMM_LEN 16

/* Indexes into the `counters` map; tracer/probe.py names them. */
enum counter {
    C_EVICTIONS = 0,        /* sockets whose entry was lost to a full row */
    C_DURATION_UNKNOWN,     /* transitions of a socket with no entry time */
    C_OTHER_PROTOCOL,       /* SCTP, MPTCP: seen and skipped */
    C_RINGBUF_DROPS,        /* trace: events the ring buffer had no room for */
    C_TRACE_MATCHED,        /* trace: events that passed the filters */
    NCOUNTERS,
};

#define SIDE_CLIENT 1
#define SIDE_SERVER 2

struct sock_entry {
    u64 born_ns;            /* 0: born before we saw it */
    u64 entered_ns;         /* when it entered `state` */
    u8 state;
    u8 side;
    u8 family;
    u8 port_slot;
#ifdef TRACE_EVENTS         /* only a trace shows the owner: serve's entries stay 24 bytes */
    u32 owner_pid;          /* 0: owner not known */
    char owner_comm[TASK_COMM_LEN];
#endif
};

/* A row of the socket table: keys apart from values, so that the probe of
 * all ways reads one cache line (8 ways). A key is the socket's kernel
 * address. */
struct table_row {
    u64 sk[TABLE_WAYS];
    struct sock_entry entry[TABLE_WAYS];
};

#define TRANSITION_INDEX(port, fam, old, new) \
    ((((port) * NFAMILIES + (fam)) * NSTATES + (old)) * NSTATES + (new))
#define NTRANSITIONS (NPORT_SLOTS * NFAMILIES * NSTATES * NSTATES)
#define LIVE_INDEX(port, fam, state) \
    (((port) * NFAMILIES + (fam)) * NSTATES + (state))
#define NLIVE (NPORT_SLOTS * NFAMILIES * NSTATES)
#define CONN_INDEX(port, fam, side) (((port) * NFAMILIES + (fam)) * NSIDES + (side))
#define NCONN (NPORT_SLOTS * NFAMILIES * NSIDES)

BPF_PERCPU_ARRAY(transitions, u64, NTRANSITIONS);
BPF_PERCPU_ARRAY(state_duration_buckets, u64, NTRANSITIONS * NBUCKETS);
BPF_PERCPU_ARRAY(state_duration_sum_ns, u64, NTRANSITIONS);
BPF_PERCPU_ARRAY(connection_duration_buckets, u64, NCONN * NBUCKETS);
BPF_PERCPU_ARRAY(connection_duration_sum_ns, u64, NCONN);
/* Live sockets in the table, per state: +1 on entry, -1 on exit. */
BPF_PERCPU_ARRAY(live_tracked, s64, NLIVE);
/* Live sockets not in the table (born before start, or evicted): seeded by
 * user space from every namespace at start, drained by the transitions of
 * sockets the table does not know, never below zero. Shared, so atomics. */
BPF_ARRAY(live_untracked, s64, NLIVE);
BPF_PERCPU_ARRAY(counters, u64, NCOUNTERS);
BPF_ARRAY(socket_table, struct table_row, TABLE_BUCKETS);
#if NPORT_SLOTS > 1
/* port number -> slot (0 = other), written once by user space. */
BPF_ARRAY(service_port_slot, u8, 65536);
#endif

#ifdef TRACE_EVENTS
struct trace_filter {
    u64 min_duration_ns;
    u32 state_mask;         /* bit s: old or new state s; 0 = any */
    u32 family_mask;        /* bit 0 ipv4, bit 1 ipv6; 0 = any */
    u8 any_port;            /* filter flags: set when the option was given */
    u8 local_port;
    u8 remote_port;
    u8 pid;
    u8 transition;
    u8 ready;               /* set last, once the filter maps are written:
                             * bcc attaches at load, before user space can
                             * write them, and nothing may leak meanwhile */
};
/* Port filter bits in `trace_ports`. */
#define PORT_ANY_END 1
#define PORT_LOCAL 2
#define PORT_REMOTE 4

struct trace_event {
    u64 timestamp_ns;       /* CLOCK_MONOTONIC */
    u64 sk;                 /* hashed in user space before it is shown */
    u64 duration_ns;        /* time in old state; ~0 when not known */
    u64 lifetime_ns;        /* since birth; ~0 when not known */
    u32 owner_pid;
    u16 sport;
    u16 dport;
    u8 family;
    u8 oldstate;
    u8 newstate;
    u8 side;
    u8 saddr[16];
    u8 daddr[16];
    char owner_comm[TASK_COMM_LEN];
};

BPF_ARRAY(trace_config, struct trace_filter, 1);
BPF_ARRAY(trace_ports, u8, 65536);
BPF_HASH(trace_pids, u32, u8, 1024);
BPF_ARRAY(trace_transitions, u32, NSTATES);   /* bit new of row old */
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#endif

static __always_inline void count(int which)
{
    u32 key = which;
    u64 *value = counters.lookup(&key);
    if (value)
        *value += 1;
}

/* The aggregates below exist for `tcpstate serve` only: in the trace build
 * (TRACE_EVENTS) they compile to nothing. */
static __always_inline void count_transition(u32 index)
{
#ifndef TRACE_EVENTS
    u64 *value = transitions.lookup(&index);
    if (value)
        *value += 1;
#endif
}

/* Live sockets in the table, per state; their sum is the table's entries
 * (tracer/probe.py reads it so, no insert or remove counters needed). */
static __always_inline void live_add(u32 index, s64 delta)
{
#ifndef TRACE_EVENTS
    s64 *value = live_tracked.lookup(&index);
    if (value)
        *value += delta;
#endif
}

static __always_inline void untracked_add(u32 index)
{
#ifndef TRACE_EVENTS
    s64 *value = live_untracked.lookup(&index);
    if (value)
        __sync_fetch_and_add(value, 1);
#endif
}

/* Take one socket out of the untracked pool, never below zero: a socket
 * whose state was never counted must not decrement another's. */
static __always_inline void untracked_drain(u32 index)
{
#ifndef TRACE_EVENTS
    s64 *value = live_untracked.lookup(&index);
    if (!value)
        return;
    for (int attempt = 0; attempt < 4; attempt++) {
        s64 seen = *value;
        if (seen <= 0)
            return;
        if (__sync_val_compare_and_swap(value, seen, seen - 1) == seen)
            return;
    }
#endif
}

/* log2 slot of a duration: the smallest b with ns <= 2^b, offset so that
 * slot 0 holds everything up to 2^BUCKET_MIN_LOG2 ns and the last slot is
 * the +Inf bucket. tracer/metrics.py converts slots to seconds. */
static __always_inline u32 duration_slot(u64 ns)
{
    u32 bits = ns > 1 ? bpf_log2l(ns - 1) : 0;
    if (bits <= BUCKET_MIN_LOG2)
        return 0;
    bits -= BUCKET_MIN_LOG2;
    return bits < NBUCKETS - 1 ? bits : NBUCKETS - 1;
}

/* One function per histogram: bcc binds a map only where it is named. */
static __always_inline void observe_state(u32 index, u64 ns)
{
#if !defined(NO_HISTOGRAMS) && !defined(TRACE_EVENTS)   /* bench/ measures each feature's cost */
    u32 key = index * NBUCKETS + duration_slot(ns);
    u64 *value = state_duration_buckets.lookup(&key);
    if (value)
        *value += 1;
    value = state_duration_sum_ns.lookup(&index);
    if (value)
        *value += ns;
#endif
}

static __always_inline void observe_connection(u32 index, u64 ns)
{
#if !defined(NO_HISTOGRAMS) && !defined(TRACE_EVENTS)
    u32 key = index * NBUCKETS + duration_slot(ns);
    u64 *value = connection_duration_buckets.lookup(&key);
    if (value)
        *value += 1;
    value = connection_duration_sum_ns.lookup(&index);
    if (value)
        *value += ns;
#endif
}

#ifdef TRACE_EVENTS
/* Transitions that run in the owning process's context (a system call on
 * the socket), so the current task is the owner. All others may run in
 * softirq, where the current task is whoever was interrupted. */
static __always_inline bool owner_context(u32 old, u32 new)
{
    return (old == TCP_CLOSE && (new == TCP_SYN_SENT || new == TCP_LISTEN)) ||
           (old == TCP_ESTABLISHED && new == TCP_FIN_WAIT1) ||
           (old == TCP_CLOSE_WAIT && new == TCP_LAST_ACK) ||
           (old == TCP_LISTEN && new == TCP_CLOSE);
}
#endif

static __always_inline u32 row_of(u64 sk)
{
    /* Fibonacci hashing: slab addresses share their low bits. */
    return (u32)((sk * 0x9E3779B97F4A7C15ULL) >> 40) % TABLE_BUCKETS;
}

/* Claim a way for `sk`: a free one, else the least recently changed one,
 * whose count moves to the untracked pool. Returns TABLE_WAYS when a racing
 * CPU took the way: the caller then counts `sk` as untracked. */
static __always_inline u32 claim_way(struct table_row *row, u64 sk)
{
    u64 oldest = ~0ULL;
    u32 victim = 0;
#pragma unroll
    for (u32 i = 0; i < TABLE_WAYS; i++) {
        if (row->sk[i] == 0 &&
            __sync_val_compare_and_swap(&row->sk[i], 0, sk) == 0)
            return i;
        if (row->entry[i].entered_ns < oldest) {
            oldest = row->entry[i].entered_ns;
            victim = i;
        }
    }
    count(C_EVICTIONS);
    if (victim >= TABLE_WAYS)
        return TABLE_WAYS;
    u64 victim_sk = row->sk[victim];
    struct sock_entry *gone = &row->entry[victim];
    u32 gone_index = LIVE_INDEX(gone->port_slot % NPORT_SLOTS,
                                gone->family & 1, gone->state % NSTATES);
    if (victim_sk == 0 ||
        __sync_val_compare_and_swap(&row->sk[victim], victim_sk, sk) != victim_sk)
        return TABLE_WAYS;
    live_add(gone_index, -1);
    untracked_add(gone_index);
    return victim;
}

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

/* A socket's service port: the local port of listeners and accepted
 * sockets, the remote port of outgoing connections (whose ephemeral local
 * port may well be a service port's number). Fixed at birth; a socket seen
 * first later gets the local port if listed, else the remote one. */
static __always_inline u32 port_slot_of(u16 sport, u16 dport, u32 new,
                                        struct sock_entry *entry, bool birth)
{
#if NPORT_SLOTS > 1
    if (birth)
        return service_slot(new == TCP_SYN_SENT ? dport : sport);
    if (entry)
        return entry->port_slot % NPORT_SLOTS;
    u32 slot = service_slot(sport);
    return slot ? slot : service_slot(dport);
#else
    return 0;
#endif
}

#ifdef TRACE_EVENTS
/* The port filters (different flags AND, the ports of one flag OR). */
static __always_inline bool ports_wanted(struct trace_filter *filter, u16 sport, u16 dport)
{
    u32 key;
    u8 *flags;
    if (filter->any_port) {
        key = sport;
        flags = trace_ports.lookup(&key);
        bool hit = flags && (*flags & PORT_ANY_END);
        key = dport;
        flags = trace_ports.lookup(&key);
        hit = hit || (flags && (*flags & PORT_ANY_END));
        if (!hit)
            return false;
    }
    if (filter->local_port) {
        key = sport;
        flags = trace_ports.lookup(&key);
        if (!flags || !(*flags & PORT_LOCAL))
            return false;
    }
    if (filter->remote_port) {
        key = dport;
        flags = trace_ports.lookup(&key);
        if (!flags || !(*flags & PORT_REMOTE))
            return false;
    }
    return true;
}

/* The filters a socket's events all pass or all fail, decided before any
 * table work: the family never changes, and once the local port is set
 * (it is 0 only while a connect or listen has not bound one yet, and that
 * first event then goes the whole way) neither port changes until CLOSE.
 * A socket that fails them can match no event of this life, so it needs
 * no entry: its birth, entry time and owner matter to no line. */
static __always_inline bool never_wanted(struct trace_filter *filter, u32 fam,
                                         u16 sport, u16 dport, bool *ports_ok)
{
    if (filter->family_mask && !(filter->family_mask & (1u << fam)))
        return true;
    *ports_ok = ports_wanted(filter, sport, dport);
    return !*ports_ok && sport != 0;
}

/* The filters that depend on the event (states, duration, owner). */
static __always_inline bool trace_wanted(struct trace_filter *filter, bool ports_ok,
                                         u32 old, u32 new, u64 duration_ns, u32 owner_pid)
{
    if (!ports_ok)
        return false;
    if (filter->state_mask &&
        !(filter->state_mask & ((1u << old) | (1u << new))))
        return false;
    if (filter->transition) {
        u32 *row = trace_transitions.lookup(&old);
        if (!row || !(*row & (1u << new)))
            return false;
    }
    if (filter->min_duration_ns &&
        (duration_ns == ~0ULL || duration_ns < filter->min_duration_ns))
        return false;
    if (filter->pid && (owner_pid == 0 || !trace_pids.lookup(&owner_pid)))
        return false;
    return true;
}

/* The side the handler gives a socket at its birth, after the event has
 * gone out: until then the entry holds a previous socket's values. */
static __always_inline u8 side_at_birth(u32 old, u32 new)
{
    return old == TCP_LISTEN ? SIDE_SERVER : new == TCP_SYN_SENT ? SIDE_CLIENT : 0;
}

/* A workqueue worker ("kworker/..."): MPTCP closes its TCP subflows from
 * one, and a file released by a kernel thread is closed in one. Its pid is
 * never the socket's owner. (Kernel threads are told apart by task flags,
 * which a bcc program could read only by offsets from nearby headers.) */
static __always_inline bool kernel_worker(const char *comm)
{
    u64 head;
    __builtin_memcpy(&head, comm, sizeof(head));
    return head == 0x2f72656b726f776bULL;   /* "kworker/", little-endian */
}

/* A filled record of an event that passed the filters, still to be given
 * its addresses and submitted; NULL when filtered out or the buffer is
 * full (counted). bcc defines the tracepoint's argument struct only at the
 * handler, so the addresses are read there, straight into the record. */
static __always_inline struct trace_event *trace_emit(struct trace_filter *filter,
                                                      bool ports_ok, u64 sk, u16 sport,
                                                      u16 dport, u64 now, u32 fam, u32 old,
                                                      u32 new, u64 duration_ns, bool birth,
                                                      struct sock_entry *entry)
{
    u32 owner_pid = entry ? entry->owner_pid : 0;
    if (!trace_wanted(filter, ports_ok, old, new, duration_ns, owner_pid))
        return 0;
    count(C_TRACE_MATCHED);
    struct trace_event *event = events.ringbuf_reserve(sizeof(struct trace_event));
    if (!event) {
        count(C_RINGBUF_DROPS);
        return 0;
    }
    event->timestamp_ns = now;
    event->sk = sk;
    event->duration_ns = duration_ns;
    if (birth) {
        event->lifetime_ns = 0;
        event->side = side_at_birth(old, new);
    } else {
        event->lifetime_ns = (entry && entry->born_ns) ? now - entry->born_ns : ~0ULL;
        event->side = entry ? entry->side : 0;
    }
    event->owner_pid = owner_pid;
    event->sport = sport;
    event->dport = dport;
    event->family = fam;
    event->oldstate = old;
    event->newstate = new;
    if (entry && owner_pid)
        __builtin_memcpy(event->owner_comm, entry->owner_comm, TASK_COMM_LEN);
    else
        __builtin_memset(event->owner_comm, 0, TASK_COMM_LEN);
    return event;
}
#endif

/* The way of `sk` in its row, or TABLE_WAYS. */
static __always_inline u32 find_way(struct table_row *row, u64 sk)
{
#pragma unroll
    for (u32 i = 0; i < TABLE_WAYS; i++) {
        if (row->sk[i] == sk)
            return i;
    }
    return TABLE_WAYS;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IPPROTO_TCP) {
        count(C_OTHER_PROTOCOL);
        return 0;
    }
    u32 fam;
    if (args->family == AF_INET)
        fam = 0;
    else if (args->family == AF_INET6)
        fam = 1;
    else
        return 0;
    /* Every field read once, here: clang must not keep pointers into the
     * context for later, which the verifier refuses. */
    u32 old = args->oldstate, new = args->newstate;
    u16 sport = args->sport, dport = args->dport;
    u64 sk = (u64)args->skaddr;
    if (old >= NSTATES)
        old = 0;
    if (new >= NSTATES)
        new = 0;
    /* A child of a listener is born in LISTEN -> SYN_RECV under its own
     * address; every other socket is born leaving CLOSE. */
    bool birth = old == TCP_CLOSE || (old == TCP_LISTEN && new == TCP_SYN_RECV);
#ifdef NO_SOCKET_TABLE
    /* bench/: the transition counters alone (no table: no durations,
     * gauge or owner). Never built by tcpstate itself. */
    count_transition(TRANSITION_INDEX(port_slot_of(sport, dport, new, 0, birth), fam, old, new));
    return 0;
#endif
#ifdef TRACE_EVENTS
    /* Nothing happens before user space has written the filters: a socket
     * born meanwhile is shown as one that predates the trace. */
    u32 zero = 0;
    struct trace_filter *filter = trace_config.lookup(&zero);
    if (!filter || !filter->ready)
        return 0;
    bool ports_ok = true;
    if (never_wanted(filter, fam, sport, dport, &ports_ok)) {
        /* Only a socket that left CLOSE (or LISTEN's) unbound can have an
         * entry here, from its birth, and this is its first event since
         * its port was bound: let the entry go. */
        if (!birth && (old == TCP_SYN_SENT || old == TCP_LISTEN)) {
            u32 at = row_of(sk);
            struct table_row *own = socket_table.lookup(&at);
            if (own) {
                u32 i = find_way(own, sk);
                if (i < TABLE_WAYS)
                    own->sk[i] = 0;
            }
        }
        return 0;
    }
#endif
    u64 now = bpf_ktime_get_ns();
    u32 row_index = row_of(sk);
    struct table_row *row = socket_table.lookup(&row_index);
    if (!row)
        return 0;
    u32 way = find_way(row, sk);
    struct sock_entry *entry = 0;
    if (way < TABLE_WAYS)
        entry = &row->entry[way];

    u64 duration_ns = ~0ULL;
    u32 port = port_slot_of(sport, dport, new, entry, birth);
    u32 index = TRANSITION_INDEX(port, fam, old, new);
    count_transition(index);

    if (birth) {
        if (entry) {
            /* A stale entry: we missed this address's last close. */
            live_add(LIVE_INDEX(entry->port_slot % NPORT_SLOTS, entry->family & 1,
                                entry->state % NSTATES), -1);
        } else {
            way = claim_way(row, sk);
            if (way < TABLE_WAYS)
                entry = &row->entry[way];
        }
    } else if (entry) {
        duration_ns = now - entry->entered_ns;
        observe_state(index, duration_ns);
        live_add(LIVE_INDEX(port, fam, old), -1);
    } else {
#ifndef TRACE_EVENTS
        count(C_DURATION_UNKNOWN);
#endif
        untracked_drain(LIVE_INDEX(port, fam, old));
        if (new != TCP_CLOSE) {
            way = claim_way(row, sk);
            if (way < TABLE_WAYS) {
                entry = &row->entry[way];
                entry->born_ns = 0;
                entry->side = 0;
#ifdef TRACE_EVENTS
                entry->owner_pid = 0;
#endif
            }
        }
    }

#ifdef TRACE_EVENTS
    /* The owner of a socket is known once it acts in process context, as
     * a process: a kernel worker acts for some other owner. */
    if (entry && birth)
        entry->owner_pid = 0;
    if (entry && owner_context(old, new)) {
        char comm[TASK_COMM_LEN];
        bpf_get_current_comm(&comm, sizeof(comm));
        if (!kernel_worker(comm)) {
            entry->owner_pid = bpf_get_current_pid_tgid() >> 32;
            __builtin_memcpy(entry->owner_comm, comm, TASK_COMM_LEN);
        }
    }
    struct trace_event *event = trace_emit(filter, ports_ok, sk, sport, dport, now, fam,
                                           old, new, duration_ns, birth, entry);
    if (event) {
        /* IPv4 addresses go out as IPv4-mapped IPv6 ones (::ffff:a.b.c.d).
         * Copied, not dereferenced: the verifier allows only fixed ctx loads. */
        if (fam == 0) {
            __builtin_memset(event->saddr, 0, 10);
            __builtin_memset(event->daddr, 0, 10);
            event->saddr[10] = event->saddr[11] = 0xff;
            event->daddr[10] = event->daddr[11] = 0xff;
            bpf_probe_read_kernel(&event->saddr[12], 4, args->saddr);
            bpf_probe_read_kernel(&event->daddr[12], 4, args->daddr);
        } else {
            bpf_probe_read_kernel(event->saddr, 16, args->saddr_v6);
            bpf_probe_read_kernel(event->daddr, 16, args->daddr_v6);
        }
        /* No wake-up per event: user space drains on a short timer. */
        events.ringbuf_submit(event, BPF_RB_NO_WAKEUP);
    }
#endif

    if (new == TCP_CLOSE) {
        if (entry) {
            if (entry->born_ns && entry->side)
                observe_connection(CONN_INDEX(port, fam, entry->side % NSIDES),
                                   now - entry->born_ns);
            row->sk[way % TABLE_WAYS] = 0;
        }
        return 0;
    }

    u32 live_index = LIVE_INDEX(port, fam, new);
    if (!entry) {
        untracked_add(live_index);
        return 0;
    }
    if (birth) {
        entry->born_ns = now;
        entry->side = old == TCP_LISTEN ? SIDE_SERVER :
                      new == TCP_SYN_SENT ? SIDE_CLIENT : 0;
    }
    entry->family = fam;
    entry->port_slot = port;
    entry->state = new;
    entry->entered_ns = now;
    live_add(live_index, 1);
    return 0;
}
