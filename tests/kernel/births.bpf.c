// SPDX-License-Identifier: Apache-2.0
/* For test_missing_births.py: the births (LISTEN -> SYN_RECV: a passive-open
 * child socket) on one listening port, counted by a raw tracepoint handler
 * and by a classic one, each in its own slot. Nothing else: whatever they
 * miss, they miss before any line of this file runs.
 *
 * Constants come through cflags: PORT, the listening port; TCP_LISTEN and
 * TCP_SYN_RECV, from tracer/states.py; SKC_NUM_OFFSET, the offset of
 * sock_common's skc_num (local port, host order) in the running kernel, read
 * from its BTF. A child socket is a clone of its listener, so it has the
 * listener's port when its birth is reported. */

BPF_ARRAY(births, u64, 2);

enum { RAW, CLASSIC };

static __always_inline void count(u32 slot)
{
    u64 *value = births.lookup(&slot);
    if (value)
        __sync_fetch_and_add(value, 1);
}

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    if (ctx->args[1] != TCP_LISTEN || ctx->args[2] != TCP_SYN_RECV)
        return 0;
    u16 port = 0;
    bpf_probe_read_kernel(&port, sizeof(port), (void *)ctx->args[0] + SKC_NUM_OFFSET);
    if (port == PORT)
        count(RAW);
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->oldstate == TCP_LISTEN && args->newstate == TCP_SYN_RECV && args->sport == PORT)
        count(CLASSIC);
    return 0;
}
