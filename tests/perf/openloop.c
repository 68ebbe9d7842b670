/*
 * openloop: an open-loop HTTP/1.1 load generator, for tail latency at a fixed rate.
 *
 * wrk is closed-loop: each connection sends its next request when the last answer
 * arrives, so a slower proxy is offered less load, and its latencies measure its
 * throughput as much as its tail. Here requests are due on a fixed schedule
 * (`rate` per second, evenly spaced), whatever the answers do: a request goes out
 * on an idle connection when it is due, or waits for one, and its latency is
 * counted from when it was due, not from when it went out (no coordinated
 * omission: a stall delays every request due during it, and all of them count).
 *
 *   cc -O2 -o openloop openloop.c
 *   openloop -c 32 -r 10000 -d 5 -w 1 127.0.0.1 8080 /
 *
 * Prints one JSON object about the requests due after the first `-w` seconds (the
 * ones before are sent but not counted): how many were due, answered with a 200,
 * and failed (another status, a connection closed, reset or failing under the
 * request, an answer that cannot be framed, no answer within 3 s of the last
 * request due); `answered + errors == due`. `unsolicited`: bytes a server sent on
 * an idle connection (that connection is replaced). `late_sends`: requests that
 * found no idle connection when due. Latency percentiles are in microseconds, from
 * when each request was due, over the answered ones. Answers are framed by
 * Content-Length (a chunked or close-delimited answer is an error, as is one over
 * 64 KiB); a connection the server closes, or says it will close, is replaced.
 * Exit status 0 when it ran, 2 on bad arguments or when it cannot connect at the
 * start. Linux only (epoll, timerfd).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536
#define DRAIN_NS 3000000000LL
#define TIMER_ID UINT32_MAX

typedef struct {
    int fd;      /* -1: could not be replaced, out of use */
    int busy;    /* a request is on it */
    int64_t due; /* when that request was due */
    size_t len;  /* bytes of its answer read so far */
    char buf[BUF];
} conn_t;

static struct sockaddr_in addr;
static char request[4096];
static size_t request_len;
static int ep;
static int64_t start, interval;
static long counted_from;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *alloc(size_t size) {
    void *p = calloc(1, size);
    if (p == NULL) {
        fprintf(stderr, "openloop: out of memory\n");
        exit(2);
    }
    return p;
}

/* A connected non-blocking socket, or -1. The connect is bounded by 1 s (SO_SNDTIMEO
 * bounds a blocking connect on Linux): a server that stops accepting cannot hang us. */
static int open_conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    struct timeval limit = {.tv_sec = 1};
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Close k's socket and open another in its place (fd -1 if that fails). */
static void replace(conn_t *k, uint32_t id) {
    if (k->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, k->fd, NULL);
        close(k->fd);
    }
    k->fd = open_conn();
    k->len = 0;
    if (k->fd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = id};
        epoll_ctl(ep, EPOLL_CTL_ADD, k->fd, &ev);
    }
}

static int counted(int64_t due) { return (due - start) / interval >= counted_from; }

/* Whether a head line `name: value` with this name (case-insensitive) holds `token`. */
static int field_has(const char *head, const char *end, const char *name, const char *token) {
    size_t n = strlen(name), t = strlen(token);
    for (const char *line = memchr(head, '\n', (size_t)(end - head)); line && line + 1 < end;
         line = memchr(line + 1, '\n', (size_t)(end - line - 1))) {
        const char *eol = memchr(line + 1, '\r', (size_t)(end - line - 1));
        if (eol == NULL) eol = end;
        if ((size_t)(eol - line - 1) > n && strncasecmp(line + 1, name, n) == 0 && line[1 + n] == ':')
            for (const char *p = line + 2 + n; p + t <= eol; p++)
                if (strncasecmp(p, token, t) == 0) return 1;
    }
    return 0;
}

/* The length of a complete answer at the start of buf: 0 while incomplete, -1 when it
 * cannot be framed here (no Content-Length where a body may follow). Sets *status and
 * *closing (the server will close after it: `Connection: close`, or HTTP/1.0 without
 * keep-alive). */
static long answer_length(const char *buf, size_t len, int *status, int *closing) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (end == NULL) return 0;
    size_t head = (size_t)(end - buf) + 4;
    if (head < 13 || memcmp(buf, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(buf + 9);
    *closing = field_has(buf, end + 2, "connection", "close") ||
               (buf[7] == '0' && !field_has(buf, end + 2, "connection", "keep-alive"));
    if (*status < 200 || *status == 204 || *status == 304) return (long)head; /* no body */
    long body = -1;
    for (const char *line = memchr(buf, '\n', head); line && line + 1 < end;
         line = memchr(line + 1, '\n', (size_t)(end - line - 1))) {
        if (strncasecmp(line + 1, "content-length:", 15) == 0) body = strtol(line + 16, NULL, 10);
        if (strncasecmp(line + 1, "transfer-encoding:", 18) == 0) return -1;
    }
    if (body < 0) return -1;
    return (size_t)body + head <= len ? (long)(head + (size_t)body) : 0;
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct(const int64_t *v, long n, double p) {
    if (n == 0) return 0.0;
    long i = (long)(p * (double)n + 0.999999) - 1;
    if (i < 0) i = 0;
    if (i >= n) i = n - 1;
    return (double)v[i] / 1000.0;
}

static void usage(void) {
    fprintf(stderr, "usage: openloop -c CONNECTIONS -r RATE -d SECONDS [-w WARMUP_SECONDS] HOST PORT PATH\n"
                    "  (1 <= CONNECTIONS <= 10000, 0 < RATE <= 1000000)\n");
    exit(2);
}

int main(int argc, char **argv) {
    int conns = 32, opt;
    double rate = 0, duration = 0, warmup = 0;
    while ((opt = getopt(argc, argv, "c:r:d:w:")) != -1) {
        switch (opt) {
        case 'c': conns = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        default: usage();
        }
    }
    if (argc - optind != 3 || conns < 1 || conns > 10000 || !(rate > 0 && rate <= 1e6) ||
        !(duration > 0 && duration <= 3600) || !(warmup >= 0 && warmup <= 3600))
        usage();
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[optind + 1]));
    if (inet_pton(AF_INET, argv[optind], &addr.sin_addr) != 1) usage();
    int written = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %s:%s\r\n\r\n",
                           argv[optind + 2], argv[optind], argv[optind + 1]);
    if (written < 0 || (size_t)written >= sizeof request) usage();
    request_len = (size_t)written;
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1UL); /* timers to the microsecond, not 50 us late */

    ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    conn_t *c = alloc(sizeof *c * (size_t)conns);
    int *idle = alloc(sizeof(int) * (size_t)conns);
    int nidle = 0;
    for (int i = 0; i < conns; i++) {
        c[i].fd = -1;
        replace(&c[i], (uint32_t)i);
        if (c[i].fd < 0) {
            fprintf(stderr, "openloop: cannot connect to %s:%s: %s\n", argv[optind], argv[optind + 1], strerror(errno));
            return 2;
        }
        idle[nidle++] = i;
    }
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = TIMER_ID};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

    interval = (int64_t)(1e9 / rate);
    long total = (long)((warmup + duration) * rate);
    counted_from = (long)(warmup * rate);
    int64_t *lat = alloc(sizeof(int64_t) * (size_t)(total - counted_from + 1));
    long nlat = 0, errors = 0, late = 0, unsolicited = 0;
    /* Requests due and not yet sent: their due times, oldest first (at most `total`). */
    int64_t *waiting = alloc(sizeof(int64_t) * (size_t)(total + 1));
    long wait_head = 0, wait_tail = 0;
    long next = 0; /* the next request to fall due */
    long in_flight = 0;
    start = now_ns() + 1000000; /* 1 ms from now */
    int64_t give_up = start + (total - 1) * interval + DRAIN_NS;
    struct itimerspec its = {0};
    its.it_value.tv_sec = start / 1000000000LL;
    its.it_value.tv_nsec = start % 1000000000LL;
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);

    struct epoll_event events[64];
    while (next < total || in_flight > 0 || wait_tail > wait_head) {
        int64_t t = now_ns();
        if (t > give_up) break;
        int n = epoll_wait(ep, events, 64, (int)((give_up - t) / 1000000) + 1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("openloop: epoll_wait");
            return 2;
        }
        t = now_ns();
        for (int e = 0; e < n; e++) {
            uint32_t id = events[e].data.u32;
            if (id == TIMER_ID) {
                uint64_t fired;
                if (read(tfd, &fired, sizeof fired) < 0 && errno != EAGAIN) perror("openloop: timerfd");
                while (next < total && start + next * interval <= t) {
                    waiting[wait_tail++] = start + next * interval;
                    if (wait_tail - wait_head > nidle && next >= counted_from) late++;
                    next++;
                }
                if (next < total) {
                    int64_t due = start + next * interval;
                    its.it_value.tv_sec = due / 1000000000LL;
                    its.it_value.tv_nsec = due % 1000000000LL;
                    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
                }
                continue;
            }
            conn_t *k = &c[id];
            if (k->fd < 0) continue;
            ssize_t got = read(k->fd, k->buf + k->len, BUF - k->len);
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (!k->busy) {
                /* Idle (already in idle[]): a close is no failure; bytes nobody asked
                 * for put the connection out of step. Either way, a new one. */
                if (got > 0) unsolicited++;
                replace(k, id);
                continue;
            }
            int status = 0, closing = 0;
            long whole = -1;
            if (got > 0) {
                k->len += (size_t)got;
                whole = answer_length(k->buf, k->len, &status, &closing);
                if (whole == 0 && k->len < BUF) continue; /* more to come */
            }
            in_flight--;
            k->busy = 0;
            int ok = whole > 0 && (size_t)whole == k->len && status == 200;
            if (counted(k->due)) {
                if (ok) lat[nlat++] = t - k->due;
                else errors++;
            }
            /* Closed, reset, unframeable, more than one answer, or closing: a new one. */
            if (!ok || closing) replace(k, id);
            k->len = 0;
            idle[nidle++] = (int)id;
        }
        /* Send what is due, oldest first, on idle connections. */
        while (wait_head < wait_tail && nidle > 0) {
            int id = idle[--nidle];
            conn_t *k = &c[id];
            if (k->fd < 0) {
                replace(k, (uint32_t)id); /* once more; out of use if it fails again */
                if (k->fd < 0) continue;
            }
            int64_t due = waiting[wait_head++];
            if (send(k->fd, request, request_len, MSG_NOSIGNAL) == (ssize_t)request_len) {
                k->due = due;
                k->busy = 1;
                k->len = 0;
                in_flight++;
            } else {
                if (counted(due)) errors++; /* the request failed with its connection */
                replace(k, (uint32_t)id);
                idle[nidle++] = id;
            }
        }
    }
    /* Requests still unanswered, unsent or never due by the end: failures. */
    for (int i = 0; i < conns; i++)
        if (c[i].busy && counted(c[i].due)) errors++;
    for (long i = wait_head; i < wait_tail; i++)
        if (counted(waiting[i])) errors++;
    for (long i = next; i < total; i++)
        if (i >= counted_from) errors++;
    qsort(lat, (size_t)nlat, sizeof *lat, cmp64);
    printf("{\"rate\": %.1f, \"connections\": %d, \"due\": %ld, \"answered\": %ld, \"errors\": %ld, "
           "\"unsolicited\": %ld, \"late_sends\": %ld, \"p50_us\": %.1f, \"p90_us\": %.1f, "
           "\"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f}\n",
           rate, conns, total - counted_from, nlat, errors, unsolicited, late, pct(lat, nlat, 0.5),
           pct(lat, nlat, 0.9), pct(lat, nlat, 0.99), pct(lat, nlat, 0.999),
           nlat ? (double)lat[nlat - 1] / 1000.0 : 0.0);
    return 0;
}
