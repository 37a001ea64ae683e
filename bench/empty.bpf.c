// SPDX-License-Identifier: Apache-2.0
/* The floor of figure 1: a program that does nothing. bench/programs.py
 * loads it as a raw tracepoint program (inet_sock_set_state) or as a
 * classic tracepoint program (sock:inet_sock_set_state): it reads nothing
 * from its context, so one function is a valid entry point of both types,
 * and its run time is what the kernel charges any program of that type. */
int on_state_change(void *ctx)
{
    return 0;
}
