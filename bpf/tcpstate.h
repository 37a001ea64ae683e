// SPDX-License-Identifier: Apache-2.0
/*
 * tcpstate.h — what serve.bpf.c and trace.bpf.c share: how a state change is
 * read, the socket table, port slots and duration slots.
 *
 * Two ways to attach, chosen by tracer/program.py:
 *   RAW_TRACEPOINT  the raw tracepoint inet_sock_set_state(sk, old, new).
 *                   The kernel guards it per program: a map read by system
 *                   call or another BPF program on the CPU never makes it
 *                   skip an event (a classic tracepoint program is skipped
 *                   then). Socket fields are read at offsets taken from the
 *                   running kernel's BTF: SK_* cflags, never from headers.
 *   (otherwise)     the classic tracepoint sock:inet_sock_set_state, whose
 *                   record carries every field: for kernels without BTF.
 *
 * Compile-time constants arrive through cflags from tracer/ (their one home):
 *   NSTATES, NBUCKETS, BUCKET_MIN_LOG2   state and histogram geometry
 *   NPORT_SLOTS      1 + number of service ports (slot 0 is "other")
 *   TABLE_BUCKETS, TABLE_WAYS   socket table rows, and sockets per row
 *   NCPUS            possible CPUs: rows of the per-CPU cells
 *   REENTRANT        the program may interrupt itself on one CPU (a raw
 *                    tracepoint before Linux 6.1): per-CPU cells add atomically
 *   CLOSE_REASONS    classify transitions into CLOSE (raw tracepoint only):
 *                    NREASONS, NERRNO_SLOTS, REASON_OTHER and the offsets
 *                    SK_CLOSE, SK_CLOSE_LEN, SK_ERR, SK_OWNED come with it
 *                    (and SK_CLOSE_SPLIT where the two lie too far apart)
 */
#include <uapi/linux/in.h>
#include <linux/socket.h>
#include <net/tcp_states.h>

#if !defined(TABLE_WAYS) || TABLE_WAYS < 1 || TABLE_WAYS > 16
#error "TABLE_WAYS (sockets per socket-table row) comes from tracer/program.py"
#endif
#ifndef NCPUS
#error "NCPUS (possible CPUs) comes from tracer/program.py"
#endif

#define NFAMILIES 2        /* 0 ipv4, 1 ipv6: the family of the packets */
#define NSIDES 3           /* 0 unknown/listener, 1 client, 2 server */
#define SIDE_CLIENT 1
#define SIDE_SERVER 2
#define TASK_COMM_LEN 16

/* Indexes into the `counters` map; tracer/program.py names them. */
enum counter {
    C_EVICTIONS = 0,        /* sockets whose entry was lost to a full row */
    C_DURATION_UNKNOWN,     /* transitions of a socket with no entry time */
    C_OTHER_PROTOCOL,       /* SCTP, MPTCP: seen and skipped */
    C_RINGBUF_DROPS,        /* trace: events the ring buffer had no room for */
    C_TRACE_MATCHED,        /* trace: events that passed the filters */
    C_STALE_ENTRIES,        /* entries whose state was not the event's old
                             * state: transitions of that socket were missed */
    C_UNSEEN_SOCKETS,       /* sockets first seen mid-life that were counted
                             * nowhere: no program saw their birth */
    C_CONTENDED,            /* shared counts taken from under contention */
    NCOUNTERS,
};

/* Per-CPU cells live in memory-mapped arrays, [cpu][cell]: user space reads
 * them with no system call, so a scrape never opens the window in which the
 * kernel skips tracing programs on its CPU. Each CPU writes its own row. */
#ifdef REENTRANT
#define CELL_ADD(cell, value) __sync_fetch_and_add((cell), (value))
#else
#define CELL_ADD(cell, value) (*(cell) += (value))
#endif
#define MMAPABLE_ARRAY(name, type, entries) \
    BPF_F_TABLE("array", u32, type, name, entries, BPF_F_MMAPABLE)


/* bcc rewrites map operations only in the file it compiles, not in headers:
 * the maps and the functions that touch them are in each program, declared
 * here where the shared code needs them. */
static __always_inline void count(u32 cpu, int which);

/* ---- one state change, as either attach type sees it ------------------ */

struct state_change {
    u64 sk;                 /* the socket's kernel address: its table key */
    u32 old, new;           /* kernel state codes, < NSTATES */
    u32 fam;                /* 0 ipv4, 1 ipv6: IPv4-mapped IPv6 counts as ipv4 */
    u32 cpu;
    u16 sk_family;          /* AF_INET or AF_INET6: where the addresses are */
    u16 sport, dport;       /* host order */
    bool birth;
    bool sport_pending;     /* LAZY_CLOSE_SPORT: sport not read yet (resolve_sport) */
#ifdef RAW_TRACEPOINT
    u8 head[SK_HEAD_LEN];   /* the copy of sock_common's span */
#endif
};

static __always_inline bool v4_mapped(const u8 *a)
{
    u64 head;
    __builtin_memcpy(&head, a, sizeof(head));
    return head == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff;
}

static __always_inline bool unspecified(const u8 *a)
{
    u64 head, tail;
    __builtin_memcpy(&head, a, sizeof(head));
    __builtin_memcpy(&tail, a + 8, sizeof(tail));
    return head == 0 && tail == 0;
}

/* The family of the packets: an AF_INET6 socket that talks to (or is bound
 * to) an IPv4-mapped address carries IPv4, as the dual-stack sockets of Go,
 * Java and Node do for their IPv4 peers. */
static __always_inline u32 packet_family(const u8 *daddr6, const u8 *saddr6)
{
    return v4_mapped(unspecified(daddr6) ? saddr6 : daddr6) ? 0 : 1;
}

/* Clamp codes to the maps' rows and decide the socket's birth. A child of
 * a listener is born in LISTEN -> SYN_RECV under its own address; every
 * other socket is born leaving CLOSE. */
static __always_inline void finish_change(struct state_change *c)
{
    if (c->old >= NSTATES)
        c->old = 0;
    if (c->new >= NSTATES)
        c->new = 0;
    c->birth = c->old == TCP_CLOSE || (c->old == TCP_LISTEN && c->new == TCP_SYN_RECV);
    c->cpu = bpf_get_smp_processor_id();
}

#ifdef RAW_TRACEPOINT
#if !defined(SK_HEAD) || !defined(SK_HEAD_LEN) || !defined(SK_FAMILY) || \
    !defined(SK_PROTOCOL) || !defined(SK_PROTOCOL_SIZE) || !defined(SK_DPORT) || \
    !defined(SK_NUM) || !defined(SK_PROT) || !defined(SK_SPORT) || !defined(SK_V6_DADDR) || \
    !defined(SK_V6_SADDR) || !defined(SK_DADDR) || !defined(SK_SADDR)
#error "the raw tracepoint needs the SK_* offsets of tracer/program.py (from BTF)"
#endif
#define STATE_CHANGE_HANDLER(name) int name(struct bpf_raw_tracepoint_args *ctx)
#define SK_READ(dst, sk, offset, size) \
    bpf_probe_read_kernel((dst), (size), (const char *)(sk) + (offset))
/* A member of struct sock_common, from the copy of its span (SK_HEAD). */
#define HEAD_AT(c, member) ((c)->head + (member) - SK_HEAD)

/* Each program says whether a socket's struct proto (skc_prot) is one it
 * has seen TCP sockets use, and learns one: a socket whose proto is known
 * to be TCP's needs no read of sk_protocol. */
static __always_inline bool tcp_proto_known(u64 proto);
static __always_inline void tcp_proto_learn(u64 proto);

/* Reads what the tracepoint's own record would carry, from `sk` at BTF
 * offsets, with as few copies as it can: every helper call costs about as
 * much as the rest of the handler. sock_common's addresses, ports, family
 * and proto in one copy; sk_protocol only for a proto not yet known to be
 * TCP's (tcp_prot, tcpv6_prot, MPTCP subflows' own). The local port is skc_num,
 * or, once the kernel has released the port just before the transition to
 * CLOSE (skc_num is then 0), inet_sport, which stays until the socket is
 * freed. Returns 1 for another protocol, -1 for another family, 0 for a
 * TCP change to count. */
static __always_inline int read_change(struct bpf_raw_tracepoint_args *ctx,
                                       struct state_change *c)
{
    const void *sk = (const void *)ctx->args[0];
    u16 protocol = 0, family, num, dport;
    u64 proto;
    if (SK_READ(c->head, sk, SK_HEAD, SK_HEAD_LEN))
        return -1;
    __builtin_memcpy(&proto, HEAD_AT(c, SK_PROT), sizeof(proto));
    if (!tcp_proto_known(proto)) {
        SK_READ(&protocol, sk, SK_PROTOCOL, SK_PROTOCOL_SIZE);
        if (protocol != IPPROTO_TCP)
            return 1;
        tcp_proto_learn(proto);
    }
    __builtin_memcpy(&family, HEAD_AT(c, SK_FAMILY), sizeof(family));
    if (family == AF_INET)
        c->fam = 0;
    else if (family == AF_INET6)
        c->fam = packet_family(HEAD_AT(c, SK_V6_DADDR), HEAD_AT(c, SK_V6_SADDR));
    else
        return -1;
    __builtin_memcpy(&num, HEAD_AT(c, SK_NUM), sizeof(num));
    __builtin_memcpy(&dport, HEAD_AT(c, SK_DPORT), sizeof(dport));
    c->old = (u32)ctx->args[1];
    c->new = (u32)ctx->args[2];
#ifdef LAZY_CLOSE_SPORT
    /* A program that defines this reads inet_sport at a close only where
     * it needs the port (resolve_sport): most closes find it in the
     * socket's table entry, and the copy is a helper call. */
    if (num == 0 && c->new == TCP_CLOSE)
        c->sport_pending = true;
    else
#endif
    if (num == 0) {
        u16 sport = 0;
        SK_READ(&sport, sk, SK_SPORT, sizeof(sport));
        num = bpf_ntohs(sport);
    }
    c->sk = (u64)sk;
    c->sk_family = family;
    c->sport = num;
    c->dport = bpf_ntohs(dport);
    finish_change(c);
    return 0;
}

/* The local port of a close whose read read_change put off. */
static __always_inline void resolve_sport(struct bpf_raw_tracepoint_args *ctx,
                                          struct state_change *c)
{
    if (c->sport_pending) {
        u16 sport = 0;
        SK_READ(&sport, (const void *)ctx->args[0], SK_SPORT, sizeof(sport));
        c->sport = bpf_ntohs(sport);
        c->sport_pending = false;
    }
}

#ifdef CLOSE_REASONS
#if !defined(SK_CLOSE) || !defined(SK_CLOSE_LEN) || !defined(SK_ERR) || !defined(SK_OWNED)
#error "close reasons need the SK_CLOSE* offsets of tracer/program.py (from BTF)"
#endif
/* The number of cells of each program's close_reason map, which user space
 * fills from tracer/reasons.py, the one home of the table. */
#define CLOSE_EVIDENCE_CELLS (NSTATES * NERRNO_SLOTS * 2 * 2)
static __always_inline u32 reason_of(u32 evidence);

/* What tells why a socket enters CLOSE, read only then, in one copy:
 * sk_err, which every kernel error path writes before the transition; and
 * sk_lock.owned, set while a process holds the socket in its system call
 * (lock_sock). Softirq and timers run with it 0 or defer their work to
 * release_sock(), where it is still 1; the program cannot read the
 * preempt count's softirq bits from a raw tracepoint, and "a process holds
 * the socket" is the fact the table needs (the owner's connect() or close()).
 * Plus a local port of 0: the socket never got one. The cell of
 * close_reason (tracer/reasons.py, evidence_key). */
static __always_inline u32 close_evidence(struct bpf_raw_tracepoint_args *ctx,
                                          const struct state_change *c)
{
    int err = 0, owned = 0;
#ifdef SK_CLOSE_SPLIT
    /* too far apart for one copy (older layouts of struct sock, e.g.
     * Debian 12's 6.1): two reads */
    SK_READ(&err, (const void *)ctx->args[0], SK_ERR, sizeof(err));
    SK_READ(&owned, (const void *)ctx->args[0], SK_OWNED, sizeof(owned));
#else
    u8 span[SK_CLOSE_LEN];
    if (SK_READ(span, (const void *)ctx->args[0], SK_CLOSE, SK_CLOSE_LEN) == 0) {
        __builtin_memcpy(&err, span + (SK_ERR - SK_CLOSE), sizeof(err));
        __builtin_memcpy(&owned, span + (SK_OWNED - SK_CLOSE), sizeof(owned));
    }
#endif
    u32 slot = err >= 0 && err < NERRNO_SLOTS - 1 ? (u32)err : NERRNO_SLOTS - 1;
    return ((c->old * NERRNO_SLOTS + slot) * 2 + (owned != 0)) * 2 + (c->sport == 0);
}

/* The reason code of a transition into CLOSE. */
static __always_inline u32 close_reason_code(struct bpf_raw_tracepoint_args *ctx,
                                             struct state_change *c)
{
    /* the table asks whether the port is 0 of SYN_SENT closes only */
    if (c->old == TCP_SYN_SENT)
        resolve_sport(ctx, c);
    return reason_of(close_evidence(ctx, c));
}
#endif

/* The addresses as IPv6 (IPv4 as ::ffff:a.b.c.d), for trace's records,
 * from the copy read_change made. */
static __always_inline void read_addresses(struct bpf_raw_tracepoint_args *ctx,
                                           const struct state_change *c,
                                           u8 *saddr, u8 *daddr)
{
    if (c->sk_family == AF_INET) {
        __builtin_memset(saddr, 0, 10);
        __builtin_memset(daddr, 0, 10);
        saddr[10] = saddr[11] = daddr[10] = daddr[11] = 0xff;
        __builtin_memcpy(saddr + 12, HEAD_AT(c, SK_SADDR), 4);
        __builtin_memcpy(daddr + 12, HEAD_AT(c, SK_DADDR), 4);
    } else {
        __builtin_memcpy(saddr, HEAD_AT(c, SK_V6_SADDR), 16);
        __builtin_memcpy(daddr, HEAD_AT(c, SK_V6_DADDR), 16);
    }
}
#else
/* bcc defines the record's struct for a function that takes it; the name
 * is not bcc's tracepoint__* one, so bcc does not attach it at load: the
 * probe attaches it once the maps are written. */
#define STATE_CHANGE_HANDLER(name) \
    int name(struct tracepoint__sock__inet_sock_set_state *ctx)

static __always_inline bool tcp_proto_known(u64 proto) { return false; }
static __always_inline void tcp_proto_learn(u64 proto) {}
/* The record carries the port: nothing is put off. */
#define resolve_sport(ctx, c) do {} while (0)

/* A macro: the record's struct exists only from the handler on. Every field
 * is read once, here: clang must not keep pointers into the context, which
 * the verifier refuses. */
#define read_change(ctx, c) ({                                              \
    int result = 0;                                                         \
    if ((ctx)->protocol != IPPROTO_TCP) {                                   \
        result = 1;                                                         \
    } else if ((ctx)->family == AF_INET) {                                  \
        (c)->fam = 0;                                                       \
    } else if ((ctx)->family == AF_INET6) {                                 \
        u8 daddr6[16], saddr6[16];                                          \
        bpf_probe_read_kernel(daddr6, 16, (ctx)->daddr_v6);                 \
        bpf_probe_read_kernel(saddr6, 16, (ctx)->saddr_v6);                 \
        (c)->fam = packet_family(daddr6, saddr6);                           \
    } else {                                                                \
        result = -1;                                                        \
    }                                                                       \
    if (result == 0) {                                                      \
        (c)->sk = (u64)(ctx)->skaddr;                                       \
        (c)->old = (ctx)->oldstate;                                         \
        (c)->new = (ctx)->newstate;                                         \
        (c)->sk_family = (ctx)->family;                                     \
        (c)->sport = (ctx)->sport;                                          \
        (c)->dport = (ctx)->dport;                                          \
        finish_change(c);                                                   \
    }                                                                       \
    result;                                                                 \
})

/* Not `saddr`, `daddr`: parameters of those names would rewrite (ctx)->saddr. */
#define read_addresses(ctx, c, s_out, d_out) do {                           \
    if ((c)->sk_family == AF_INET) {                                        \
        __builtin_memset((s_out), 0, 10);                                   \
        __builtin_memset((d_out), 0, 10);                                   \
        (s_out)[10] = (s_out)[11] = (d_out)[10] = (d_out)[11] = 0xff;       \
        bpf_probe_read_kernel((s_out) + 12, 4, (ctx)->saddr);               \
        bpf_probe_read_kernel((d_out) + 12, 4, (ctx)->daddr);               \
    } else {                                                                \
        bpf_probe_read_kernel((s_out), 16, (ctx)->saddr_v6);                \
        bpf_probe_read_kernel((d_out), 16, (ctx)->daddr_v6);                \
    }                                                                       \
} while (0)
#endif

/* ---- the 4-tuple's hash -------------------------------------------------- */

/* A 32-bit hash of a socket's ports and addresses, mirrored by
 * tracer/sockets.py over /proc/net/tcp{,6}: the ports in host order, then
 * each 32-bit word of the local and the remote address as read from memory
 * in network order, which is how /proc prints them (1 word for AF_INET,
 * 4 for AF_INET6, v4-mapped ones too). No helper call on the raw path. */
static __always_inline u32 tuple_mix(u32 hash, u32 word)
{
    hash = (hash ^ word) * 0x9E3779B1u;
    return hash ^ (hash >> 16);
}

static __always_inline u32 tuple_hash_words(u32 ports, const u8 *saddr, const u8 *daddr,
                                            int words)
{
    u32 hash = ports, word;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (i < words) {
            __builtin_memcpy(&word, saddr + 4 * i, 4);
            hash = tuple_mix(hash, word);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (i < words) {
            __builtin_memcpy(&word, daddr + 4 * i, 4);
            hash = tuple_mix(hash, word);
        }
    }
    return hash;
}

#define TUPLE_PORTS(c) (((u32)(c)->sport << 16) | (c)->dport)

#ifdef RAW_TRACEPOINT
static __always_inline u32 tuple_hash_of(struct bpf_raw_tracepoint_args *ctx,
                                         const struct state_change *c)
{
    if (c->sk_family == AF_INET)
        return tuple_hash_words(TUPLE_PORTS(c), HEAD_AT(c, SK_SADDR), HEAD_AT(c, SK_DADDR), 1);
    return tuple_hash_words(TUPLE_PORTS(c), HEAD_AT(c, SK_V6_SADDR),
                            HEAD_AT(c, SK_V6_DADDR), 4);
}
#else
/* The classic path (no BTF) reads the record's addresses: a copy each. */
#define tuple_hash_of(ctx, c) ({                                            \
    u8 s_tuple[16] = {}, d_tuple[16] = {};                                  \
    u32 tuple = 0;                                                          \
    if ((c)->sk_family == AF_INET) {                                        \
        bpf_probe_read_kernel(s_tuple, 4, (ctx)->saddr);                    \
        bpf_probe_read_kernel(d_tuple, 4, (ctx)->daddr);                    \
        tuple = tuple_hash_words(TUPLE_PORTS(c), s_tuple, d_tuple, 1);      \
    } else {                                                                \
        bpf_probe_read_kernel(s_tuple, 16, (ctx)->saddr_v6);                \
        bpf_probe_read_kernel(d_tuple, 16, (ctx)->daddr_v6);                \
        tuple = tuple_hash_words(TUPLE_PORTS(c), s_tuple, d_tuple, 4);      \
    }                                                                       \
    tuple;                                                                  \
})
#endif

/* ---- durations ---------------------------------------------------------- */

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

/* ---- the socket table ------------------------------------------------------ */

struct sock_entry {
    u64 born_ns;            /* 0: born before we saw it */
    u64 entered_ns;         /* when it entered `state` */
    u8 state;               /* 0: a way being claimed, not written yet */
    u8 side;
    u8 family;              /* the cell it is counted in: family, */
    u8 port_slot;           /* port slot and state */
#ifdef SOCK_ENTRY_OWNER     /* only a trace shows the owner: serve's entries stay 24 bytes */
    u32 owner_pid;          /* 0: owner not known */
    char owner_comm[TASK_COMM_LEN];
#else
    u32 tuple_hash;         /* serve: the 4-tuple's tuple_hash_of(), in what
                             * was padding: `tcpstate sockets` matches the
                             * entry to /proc/net/tcp{,6} by it */
#endif
};

/* A row of the socket table: keys apart from values, so that the probe of
 * all ways reads one cache line (8 ways). A key is the socket's kernel
 * address. */
struct table_row {
    u64 sk[TABLE_WAYS];
    struct sock_entry entry[TABLE_WAYS];
};

/* Defined by the program that includes this file: what it does with the
 * entry of a socket that a full row pushed out, and with a stale one. */
static __always_inline void table_evicted(u32 cpu, const struct sock_entry *gone);
static __always_inline void table_stale(u32 cpu, struct sock_entry *stale, bool birth);

static __always_inline u32 row_of(u64 sk)
{
    /* Fibonacci hashing: slab addresses share their low bits. */
    return (u32)((sk * 0x9E3779B97F4A7C15ULL) >> 40) % TABLE_BUCKETS;
}

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

/* Claim a way for `sk`: a free one, else the least recently changed written
 * one (a way another CPU has claimed but not written yet has state 0 and is
 * never a victim). Returns TABLE_WAYS when no way could be had: the caller
 * then counts `sk` as untracked. */
static __always_inline u32 claim_way(u32 cpu, struct table_row *row, u64 sk)
{
    u64 oldest = ~0ULL;
    u32 victim = TABLE_WAYS;
#pragma unroll
    for (u32 i = 0; i < TABLE_WAYS; i++) {
        if (row->sk[i] == 0 &&
            __sync_val_compare_and_swap(&row->sk[i], 0, sk) == 0) {
            row->entry[i].state = 0;
            return i;
        }
        if (row->entry[i].state && row->entry[i].entered_ns < oldest) {
            oldest = row->entry[i].entered_ns;
            victim = i;
        }
    }
    if (victim >= TABLE_WAYS)
        return TABLE_WAYS;
    u64 victim_sk = row->sk[victim];
    if (victim_sk == 0 ||
        __sync_val_compare_and_swap(&row->sk[victim], victim_sk, sk) != victim_sk)
        return TABLE_WAYS;
    count(cpu, C_EVICTIONS);
    table_evicted(cpu, &row->entry[victim]);
    row->entry[victim].state = 0;
    return victim;
}

/* The socket's entry in `row` (its way in *way), or NULL. An entry that does
 * not hold the state this socket leaves is stale: a transition of it was
 * missed (or, at a birth, the address's last close). The program lets it
 * go (table_stale), and the socket goes on in the same way as one first
 * seen now: a blank entry, state 0. */
static __always_inline struct sock_entry *entry_of(u32 cpu, struct table_row *row,
                                                   const struct state_change *c, u32 *way)
{
    *way = find_way(row, c->sk);
    if (*way >= TABLE_WAYS)
        return 0;
    struct sock_entry *entry = &row->entry[*way];
    if (c->birth || entry->state != c->old) {
        if (entry->state)
            table_stale(cpu, entry, c->birth);
        entry->born_ns = 0;
        entry->side = 0;
        entry->state = 0;
    }
    return entry;
}

/* Let a way go: its state first, so no CPU takes a half-freed way for a
 * victim. */
static __always_inline void release_way(struct table_row *row, u32 way)
{
    way %= TABLE_WAYS;
    row->entry[way].state = 0;
    row->sk[way] = 0;
}
