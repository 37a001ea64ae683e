// SPDX-License-Identifier: Apache-2.0
/*
 * trace.bpf.c — the program of `tcpstate trace`.
 *
 * Applies the trace's filters in the kernel and emits one record per event
 * that passes them to a ring buffer. Keeps only what a trace needs: the
 * socket table with birth, entry time and owner (no counters, histograms
 * or gauges, which only `tcpstate serve` exports).
 *
 *   RINGBUF_PAGES    ring buffer size in pages (cflag)
 */
#define SOCK_ENTRY_OWNER
#include "tcpstate.h"

/* ---- maps the shared code uses (see tcpstate.h) ---------------------------- */

MMAPABLE_ARRAY(counters, u64, NCPUS * NCOUNTERS);
BPF_ARRAY(socket_table, struct table_row, TABLE_BUCKETS);

static __always_inline void count(u32 cpu, int which)
{
    u32 key = cpu * NCOUNTERS + which;
    u64 *value = counters.lookup(&key);
    if (value)
        CELL_ADD(value, 1);
}

struct trace_filter {
    u64 min_duration_ns;
    u32 state_mask;         /* bit s: old or new state s; 0 = any */
    u32 family_mask;        /* bit 0 ipv4, bit 1 ipv6; 0 = any */
    u32 reason_mask;        /* bit r: reason code r (tracer/reasons.py) */
    u8 any_port;            /* filter flags: set when the option was given */
    u8 local_port;
    u8 remote_port;
    u8 pid;
    u8 transition;
    u8 reason;              /* only closes whose reason is in reason_mask */
    u8 ready;               /* cleared when the trace stops: from then on
                             * nothing more is emitted while the ring
                             * buffer is drained */
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
    u8 reason;              /* of a transition into CLOSE; NO_REASON otherwise */
    u8 saddr[16];
    u8 daddr[16];
    char owner_comm[TASK_COMM_LEN];
};

BPF_ARRAY(trace_config, struct trace_filter, 1);
BPF_ARRAY(trace_ports, u8, 65536);
BPF_HASH(trace_pids, u32, u8, 1024);
BPF_ARRAY(trace_transitions, u32, NSTATES);   /* bit new of row old */
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* NO_REASON (cflag): trace_event.reason of an event that is not a close, or
 * of any event when the program does not classify closes */
#ifdef CLOSE_REASONS
/* evidence -> reason code: written once by user space before attach */
BPF_ARRAY(close_reason, u8, CLOSE_EVIDENCE_CELLS);

static __always_inline u32 reason_of(u32 evidence)
{
    u8 *reason = close_reason.lookup(&evidence);
    return reason ? *reason % NREASONS : REASON_OTHER;
}
#endif

#ifdef RAW_TRACEPOINT
/* A trace reads sk_protocol every time: it is ad hoc, and keeps no map for
 * what serve learns. */
static __always_inline bool tcp_proto_known(u64 proto) { return false; }
static __always_inline void tcp_proto_learn(u64 proto) {}
#endif

/* A trace keeps no counts: a pushed-out entry just goes, and a stale one
 * tells nothing about this socket, its owner included. */
static __always_inline void table_evicted(u32 cpu, const struct sock_entry *gone)
{
}

static __always_inline void table_stale(u32 cpu, struct sock_entry *stale, bool birth)
{
    stale->owner_pid = 0;
}

/* Transitions that run in the owning process's context (a system call on
 * the socket), so the current task is the owner. All others may run in
 * softirq, where the current task is whoever was interrupted. LISTEN ->
 * CLOSE is not one: `ss -K` (tcp_abort) closes a listener from the process
 * that destroys it, and the listen() that made it named the owner already. */
static __always_inline bool owner_context(u32 old, u32 new)
{
    return (old == TCP_CLOSE && (new == TCP_SYN_SENT || new == TCP_LISTEN)) ||
           (old == TCP_ESTABLISHED && new == TCP_FIN_WAIT1) ||
           (old == TCP_CLOSE_WAIT && new == TCP_LAST_ACK);
}

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
static __always_inline bool never_wanted(struct trace_filter *filter,
                                         const struct state_change *c, bool *ports_ok)
{
    if (filter->family_mask && !(filter->family_mask & (1u << c->fam)))
        return true;
    *ports_ok = ports_wanted(filter, c->sport, c->dport);
    return !*ports_ok && c->sport != 0;
}

/* The filters that depend on the event (states, duration, owner). */
static __always_inline bool trace_wanted(struct trace_filter *filter, bool ports_ok,
                                         u32 old, u32 new, u64 duration_ns, u32 owner_pid,
                                         u32 reason)
{
    if (!ports_ok)
        return false;
    if (filter->reason && (reason >= 32 || !(filter->reason_mask & (1u << reason))))
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

/* The side a socket gets at its birth. */
static __always_inline u8 side_at_birth(u32 old, u32 new)
{
    return old == TCP_LISTEN ? SIDE_SERVER : new == TCP_SYN_SENT ? SIDE_CLIENT : 0;
}

/* A kernel thread is never a socket's owner: MPTCP closes its TCP subflows
 * from a workqueue worker, and a file released by a kernel thread is closed
 * in one. With BTF the task's PF_KTHREAD flag tells (TASK_FLAGS: the offset
 * of task_struct.flags); without it, the name of the commonest ones. */
#define PF_KTHREAD 0x00200000
static __always_inline bool kernel_thread(const char *comm)
{
#ifdef TASK_FLAGS
    unsigned int flags = 0;
    bpf_probe_read_kernel(&flags, sizeof(flags),
                          (const char *)bpf_get_current_task() + TASK_FLAGS);
    return flags & PF_KTHREAD;
#else
    u64 head;
    __builtin_memcpy(&head, comm, sizeof(head));
    return head == 0x2f72656b726f776bULL;   /* "kworker/", little-endian */
#endif
}

/* A filled record of an event that passed the filters, still to be given
 * its addresses and submitted; NULL when filtered out or the buffer is
 * full (counted). */
static __always_inline struct trace_event *trace_emit(struct trace_filter *filter,
                                                      bool ports_ok,
                                                      const struct state_change *c,
                                                      u64 now, u64 duration_ns,
                                                      struct sock_entry *entry, u32 reason)
{
    u32 owner_pid = entry ? entry->owner_pid : 0;
    if (!trace_wanted(filter, ports_ok, c->old, c->new, duration_ns, owner_pid, reason))
        return 0;
    count(c->cpu, C_TRACE_MATCHED);
    struct trace_event *event = events.ringbuf_reserve(sizeof(struct trace_event));
    if (!event) {
        count(c->cpu, C_RINGBUF_DROPS);
        return 0;
    }
    event->timestamp_ns = now;
    event->sk = c->sk;
    event->duration_ns = duration_ns;
    if (c->birth) {
        event->lifetime_ns = 0;
        event->side = side_at_birth(c->old, c->new);
    } else {
        event->lifetime_ns = (entry && entry->born_ns) ? now - entry->born_ns : ~0ULL;
        event->side = entry ? entry->side : 0;
    }
    event->owner_pid = owner_pid;
    event->sport = c->sport;
    event->dport = c->dport;
    event->family = c->fam;
    event->oldstate = c->old;
    event->newstate = c->new;
    event->reason = reason;
    if (entry && owner_pid)
        __builtin_memcpy(event->owner_comm, entry->owner_comm, TASK_COMM_LEN);
    else
        __builtin_memset(event->owner_comm, 0, TASK_COMM_LEN);
    return event;
}

STATE_CHANGE_HANDLER(on_state_change)
{
    struct state_change c = {};
    if (read_change(ctx, &c))
        return 0;
    u32 zero = 0;
    struct trace_filter *filter = trace_config.lookup(&zero);
    if (!filter || !filter->ready)
        return 0;
    bool ports_ok = true;
    u32 row_index = row_of(c.sk);
    struct table_row *row;
    if (never_wanted(filter, &c, &ports_ok)) {
        /* Only a socket that left CLOSE (or LISTEN's) unbound can have an
         * entry here, from its birth, and this is its first event since
         * its port was bound: let the entry go. */
        if (!c.birth && (c.old == TCP_SYN_SENT || c.old == TCP_LISTEN)) {
            row = socket_table.lookup(&row_index);
            if (row) {
                u32 i = find_way(row, c.sk);
                if (i < TABLE_WAYS)
                    release_way(row, i);
            }
        }
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    row = socket_table.lookup(&row_index);
    if (!row)
        return 0;
    u32 way;
    struct sock_entry *entry = entry_of(c.cpu, row, &c, &way);

    u64 duration_ns = ~0ULL;
    if (entry && entry->state)
        duration_ns = now - entry->entered_ns;
    if (!entry && c.new != TCP_CLOSE) {
        way = claim_way(c.cpu, row, c.sk);
        if (way < TABLE_WAYS) {
            entry = &row->entry[way];
            entry->born_ns = 0;
            entry->side = 0;
            entry->owner_pid = 0;
        }
    }

    /* The owner of a socket is known once it acts in process context, as
     * a process: a kernel worker acts for some other owner. */
    if (entry && owner_context(c.old, c.new)) {
        char comm[TASK_COMM_LEN];
        bpf_get_current_comm(&comm, sizeof(comm));
        if (!kernel_thread(comm)) {
            entry->owner_pid = bpf_get_current_pid_tgid() >> 32;
            __builtin_memcpy(entry->owner_comm, comm, TASK_COMM_LEN);
        }
    }
    u32 reason = NO_REASON;
#ifdef CLOSE_REASONS
    if (c.new == TCP_CLOSE)
        reason = close_reason_code(ctx, &c);
#endif
    struct trace_event *event = trace_emit(filter, ports_ok, &c, now, duration_ns, entry,
                                           reason);
    if (event) {
        read_addresses(ctx, &c, event->saddr, event->daddr);
        /* No wake-up per event: user space drains on a short timer. */
        events.ringbuf_submit(event, BPF_RB_NO_WAKEUP);
    }

    if (c.new == TCP_CLOSE) {
        if (entry)
            release_way(row, way);
        return 0;
    }
    if (!entry)
        return 0;
    if (c.birth) {
        entry->born_ns = now;
        entry->side = side_at_birth(c.old, c.new);
    }
    entry->family = c.fam;
    entry->entered_ns = now;
    entry->state = c.new;
    return 0;
}
