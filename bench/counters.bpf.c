// SPDX-License-Identifier: Apache-2.0
/* Figure 1's "counters only": the transition counters of serve.bpf.c and
 * nothing else (no socket table, so no durations, gauge or port slots), on
 * the shared reading of a state change (bpf/tcpstate.h). bench/ builds it;
 * tcpstate never does. */
#include "tcpstate.h"

MMAPABLE_ARRAY(counters, u64, NCPUS * NCOUNTERS);

#define NTRANSITIONS (NFAMILIES * NSTATES * NSTATES)
MMAPABLE_ARRAY(transitions, u64, NCPUS * NTRANSITIONS);

static __always_inline void count(u32 cpu, int which)
{
    u32 key = cpu * NCOUNTERS + which;
    u64 *value = counters.lookup(&key);
    if (value)
        CELL_ADD(value, 1);
}

/* Declared by tcpstate.h for the socket table, which this program has not. */
#ifdef RAW_TRACEPOINT
/* No learning of TCP's struct proto here: sk_protocol is read every time,
 * a floor for what serve's program saves by learning it. */
static __always_inline bool tcp_proto_known(u64 proto) { return false; }
static __always_inline void tcp_proto_learn(u64 proto) {}
#endif

static __always_inline void table_evicted(u32 cpu, const struct sock_entry *gone)
{
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
    u32 key = c.cpu * NTRANSITIONS + (c.fam * NSTATES + c.old) * NSTATES + c.new;
    u64 *cell = transitions.lookup(&key);
    if (cell)
        CELL_ADD(cell, 1);
    return 0;
}
