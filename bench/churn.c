// SPDX-License-Identifier: Apache-2.0
/*
 * churn — the benchmark's workload: TCP connections over loopback, as fast as
 * the machine allows (or at a set rate), or many idle ones held open.
 *
 * Run it inside a network namespace of its own (bench/run.py does), so that
 * the sockets it makes are the only ones there. Every connection's client
 * end is closed with RST (SO_LINGER 0): no TIME-WAIT, so one client address's
 * ~28k ephemeral ports never run out, and every connection causes exactly six
 * state changes (client CLOSE->SYN_SENT->ESTABLISHED->CLOSE, server child
 * LISTEN->SYN_RECV->ESTABLISHED->CLOSE); each listener adds two more.
 *
 * With -q, each connection also carries a request and its response before
 * the client resets it (-k exchanges of -q bytes from the client answered
 * by -Q bytes from the server): the same six state changes, spread over
 * more work per connection, as a service's connections are.
 *
 *   churn [-t clients] [-s servers] [-d seconds] [-n connections] [-r per_second]
 *         [-q request_bytes [-Q response_bytes] [-k exchanges]] [-p port] [-a address]
 *   churn -H connections [-p port] [-P ports] [-a address]
 *         hold that many connections open (both ends), print "ready", wait
 *         for stdin to close, then reset them all.
 *
 * It prints one JSON line: connections made, seconds, failures, listeners,
 * and the transitions the kernel must have reported for them.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TRANSITIONS_PER_CONNECTION 6
#define TRANSITIONS_PER_LISTENER 2
#define MAX_THREADS 64

static struct sockaddr_in server_addr;
static double stop_at;              /* monotonic seconds; 0: no time limit */
static long max_connections;        /* 0: no count limit */
static double per_thread_rate;      /* connections/s per client thread; 0: flat out */
static atomic_long claimed;         /* connections started, against max_connections */
static atomic_int clients_done;
static size_t request_bytes;        /* 0: no request/response */
static size_t response_bytes;
static int exchanges = 1;
#define MAX_MESSAGE (1 << 20)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "churn: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int listener(uint16_t port, int reuseport)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (fd < 0)
        die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in addr = server_addr;
    addr.sin_port = htons(port);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    /* The namespace's somaxconn caps this; a full queue would drop the
     * handshake's last ACK and change the transitions. */
    if (listen(fd, 65535) < 0)
        die("listen");
    return fd;
}

/* Connect and return the socket, or -1 (counted by the caller). */
static int connect_to(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in addr = server_addr;
    addr.sin_port = htons(port);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    struct linger reset = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
    return fd;
}

struct client {
    pthread_t thread;
    uint16_t port;
    long made, failed, exchange_failed;
};

/* Send or receive exactly `size` bytes; 0 on success. */
static int send_all(int fd, const char *buf, size_t size)
{
    while (size) {
        ssize_t sent = send(fd, buf, size, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent <= 0)
            return -1;
        buf += sent;
        size -= (size_t)sent;
    }
    return 0;
}

static int recv_all(int fd, char *buf, size_t size)
{
    while (size) {
        ssize_t got = recv(fd, buf, size, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        buf += got;
        size -= (size_t)got;
    }
    return 0;
}

static void *client_loop(void *arg)
{
    struct client *self = arg;
    char *buf = calloc(1, MAX_MESSAGE);
    if (!buf)
        die("calloc");
    double next = now();
    for (;;) {
        if (max_connections && atomic_fetch_add(&claimed, 1) >= max_connections)
            break;
        if (stop_at && now() >= stop_at)
            break;
        if (per_thread_rate > 0) {
            next += 1.0 / per_thread_rate;
            double wait = next - now();
            if (wait > 0) {
                struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
        int fd = connect_to(self->port);
        if (fd < 0) {
            self->failed++;
            continue;
        }
        int ok = 1;
        for (int i = 0; request_bytes && ok && i < exchanges; i++)
            ok = send_all(fd, buf, request_bytes) == 0 &&
                 recv_all(fd, buf, response_bytes) == 0;
        close(fd);  /* RST */
        self->made++;  /* connected and reset: its six state changes happened */
        if (!ok)
            self->exchange_failed++;
    }
    free(buf);
    atomic_fetch_add(&clients_done, 1);
    return NULL;
}

struct server {
    pthread_t thread;
    int fd;
};

static void *server_loop(void *arg)
{
    struct server *self = arg;
    char *buf = calloc(1, MAX_MESSAGE);
    if (!buf)
        die("calloc");
    for (;;) {
        int fd = accept(self->fd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            break;  /* shut down: the clients are done */
        }
        for (int i = 0; request_bytes && i < exchanges; i++)
            if (recv_all(fd, buf, request_bytes) || send_all(fd, buf, response_bytes))
                break;
        /* Wait for the client's RST before closing: a server that closed
         * first would send a FIN and add FIN-WAIT/CLOSE-WAIT steps. */
        char byte;
        ssize_t got;
        do
            got = recv(fd, &byte, 1, 0);
        while (got > 0 || (got < 0 && errno == EINTR));
        close(fd);
    }
    free(buf);
    return NULL;
}

/* The soft limit up to the hard one (raising that needs CAP_SYS_RESOURCE,
 * which containers often drop: bench/lab.py spreads held connections over
 * several processes instead). */
static void raise_fd_limit(long wanted)
{
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) < 0)
        die("getrlimit(RLIMIT_NOFILE)");
    if (limit.rlim_max != RLIM_INFINITY && (rlim_t)wanted > limit.rlim_max) {
        fprintf(stderr, "churn: needs %ld open files, the hard limit is %lu\n", wanted,
                (unsigned long)limit.rlim_max);
        exit(1);
    }
    limit.rlim_cur = (rlim_t)wanted;
    if (setrlimit(RLIMIT_NOFILE, &limit) < 0)
        die("setrlimit(RLIMIT_NOFILE)");
}

/* Hold `count` connections, spread over `ports` consecutive server ports so
 * that the ephemeral ports of one client address suffice. */
static int hold(long count, uint16_t port, int ports)
{
    raise_fd_limit(2 * count + 64);
    int listeners[64];
    for (int i = 0; i < ports; i++)
        listeners[i] = listener(port + i, 0);
    int *fds = malloc(sizeof(int) * 2 * count);
    if (!fds)
        die("malloc");
    double started = now();
    long failed = 0;
    for (long i = 0; i < count; i++) {
        int p = i % ports;
        int client = connect_to(port + p);
        if (client < 0) {
            failed++;
            i--;
            if (failed > 1000)
                die("connect keeps failing");
            continue;
        }
        int server = accept(listeners[p], NULL, NULL);
        if (server < 0)
            die("accept");
        fds[2 * i] = client;
        fds[2 * i + 1] = server;
    }
    printf("ready %ld %.3f\n", count, now() - started);
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0)
        ;
    for (long i = 0; i < 2 * count; i++)
        close(fds[i]);
    for (int i = 0; i < ports; i++)
        close(listeners[i]);
    printf("{\"held\": %ld, \"failed\": %ld, \"listeners\": %d}\n", count, failed, ports);
    return 0;
}

int main(int argc, char **argv)
{
    int nclients = 2, nservers = 2, ports = 1;
    double seconds = 0, rate = 0;
    long hold_count = 0;
    uint16_t port = 48000;
    const char *address = "127.0.0.1";
    int opt;
    while ((opt = getopt(argc, argv, "t:s:d:n:r:p:P:a:H:q:Q:k:")) != -1) {
        switch (opt) {
        case 't': nclients = atoi(optarg); break;
        case 's': nservers = atoi(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'n': max_connections = atol(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'p': port = (uint16_t)atoi(optarg); break;
        case 'P': ports = atoi(optarg); break;
        case 'a': address = optarg; break;
        case 'H': hold_count = atol(optarg); break;
        case 'q': request_bytes = (size_t)atol(optarg); break;
        case 'Q': response_bytes = (size_t)atol(optarg); break;
        case 'k': exchanges = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: see the comment at the top of churn.c\n");
            return 2;
        }
    }
    if (nclients < 1 || nclients > MAX_THREADS || nservers < 1 || nservers > MAX_THREADS ||
        ports < 1 || ports > 64 || (!seconds && !max_connections && !hold_count) ||
        request_bytes > MAX_MESSAGE || response_bytes > MAX_MESSAGE || exchanges < 1) {
        fprintf(stderr, "churn: bad arguments (need -d or -n or -H; 1-64 threads, ports; "
                        "-q/-Q at most %d bytes, -k at least 1)\n", MAX_MESSAGE);
        return 2;
    }
    server_addr.sin_family = AF_INET;
    if (inet_pton(AF_INET, address, &server_addr.sin_addr) != 1) {
        fprintf(stderr, "churn: bad address %s\n", address);
        return 2;
    }
    if (hold_count)
        return hold(hold_count, port, ports);
    if (request_bytes && !response_bytes)
        response_bytes = request_bytes;

    raise_fd_limit(1024);
    struct server servers[MAX_THREADS];
    for (int i = 0; i < nservers; i++) {
        servers[i].fd = listener(port, 1);
        pthread_create(&servers[i].thread, NULL, server_loop, &servers[i]);
    }
    struct client clients[MAX_THREADS];
    per_thread_rate = rate / nclients;
    double started = now();
    stop_at = seconds ? started + seconds : 0;
    for (int i = 0; i < nclients; i++) {
        clients[i] = (struct client){.port = port};
        pthread_create(&clients[i].thread, NULL, client_loop, &clients[i]);
    }
    long made = 0, failed = 0, exchange_failed = 0;
    for (int i = 0; i < nclients; i++) {
        pthread_join(clients[i].thread, NULL);
        made += clients[i].made;
        failed += clients[i].failed;
        exchange_failed += clients[i].exchange_failed;
    }
    double elapsed = now() - started;
    /* Let the servers drain the accept queues: the resets are processed by
     * then (loopback delivers in order), the children closed. */
    usleep(100 * 1000);
    for (int i = 0; i < nservers; i++) {
        shutdown(servers[i].fd, SHUT_RDWR);
        pthread_join(servers[i].thread, NULL);
        close(servers[i].fd);
    }
    /* CPU time of the workload itself: on loopback the kernel's packet
     * processing (and any BPF program on the way) mostly runs in the
     * sending thread's context and is charged to it. Unlike the rate, it
     * does not move when other processes compete for the CPUs. */
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 +
                 usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
    printf("{\"connections\": %ld, \"failed\": %ld, \"seconds\": %.4f, \"rate\": %.1f, "
           "\"cpu_seconds\": %.4f, \"listeners\": %d, \"transitions\": %ld, "
           "\"request_bytes\": %zu, \"response_bytes\": %zu, \"exchanges\": %d, "
           "\"exchange_failed\": %ld}\n",
           made, failed, elapsed, made / elapsed, cpu, nservers,
           TRANSITIONS_PER_CONNECTION * made + TRANSITIONS_PER_LISTENER * nservers,
           request_bytes, response_bytes, request_bytes ? exchanges : 0, exchange_failed);
    return failed || exchange_failed ? 3 : 0;
}
