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
 * Prints one JSON object: the requests due, answered and failed (an answer other
 * than 200, a connection closed or reset with a request on it, an answer nobody
 * asked for, no answer within 3 s of the last request due), the
 * latency percentiles in microseconds (from when each request was due), and
 * `late_sends`: requests that found no idle connection when due. Requests due in the
 * first `-w` seconds are sent but not counted. Exit status 0 when it ran (failures
 * are in the JSON), 2 on bad arguments or when it cannot connect. Linux only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536
#define DRAIN_NS 3000000000LL

typedef struct {
    int fd;
    int busy;
    int64_t due; /* when the request in flight was due */
    size_t len;  /* bytes of its answer read so far */
    char buf[BUF];
} conn_t;

static struct sockaddr_in addr;
static char request[1024];
static size_t request_len;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int open_conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The length of a complete answer at the start of buf, 0 while incomplete, -1 when it
 * cannot be framed (no Content-Length: this tool reads only such answers). */
static long answer_length(const char *buf, size_t len, int *status) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (end == NULL) return 0;
    size_t head = (size_t)(end - buf) + 4;
    if (len < 12 || memcmp(buf, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(buf + 9);
    long body = -1;
    for (const char *line = memchr(buf, '\n', head); line && line + 1 < end; line = memchr(line + 1, '\n', (size_t)(end - line))) {
        if (strncasecmp(line + 1, "content-length:", 15) == 0) body = strtol(line + 16, NULL, 10);
    }
    if (body < 0) return (*status == 204 || *status == 304) ? (long)head : -1;
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
    fprintf(stderr, "usage: openloop -c CONNECTIONS -r RATE -d SECONDS [-w WARMUP_SECONDS] HOST PORT PATH\n");
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
    if (argc - optind != 3 || conns < 1 || rate <= 0 || duration <= 0 || warmup < 0) usage();
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[optind + 1]));
    if (inet_pton(AF_INET, argv[optind], &addr.sin_addr) != 1) usage();
    request_len = (size_t)snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %s:%s\r\n\r\n",
                                   argv[optind + 2], argv[optind], argv[optind + 1]);
    prctl(PR_SET_TIMERSLACK, 1UL); /* timers to the microsecond, not 50 us late */

    int ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    conn_t *c = calloc((size_t)conns, sizeof *c);
    int *idle = malloc(sizeof(int) * (size_t)conns);
    int nidle = 0;
    for (int i = 0; i < conns; i++) {
        if ((c[i].fd = open_conn()) < 0) {
            fprintf(stderr, "openloop: cannot connect to %s:%s: %s\n", argv[optind], argv[optind + 1], strerror(errno));
            return 2;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
        idle[nidle++] = i;
    }
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

    int64_t interval = (int64_t)(1e9 / rate);
    long total = (long)((warmup + duration) * rate);
    long counted_from = (long)(warmup * rate);
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)(total - counted_from + 1));
    long nlat = 0, errors = 0, late = 0, answered = 0;
    /* Requests due and not yet sent: a ring of due times (at most `total`). */
    int64_t *waiting = malloc(sizeof(int64_t) * (size_t)(total + 1));
    long wait_head = 0, wait_tail = 0;
    long next = 0;          /* the next request to fall due */
    long in_flight = 0;
    int64_t start = now_ns() + 1000000; /* 1 ms from now */
    int64_t last_due = start + (total - 1) * interval;
    int64_t give_up = last_due + DRAIN_NS;
    struct itimerspec its = {0};
    its.it_value.tv_sec = start / 1000000000LL;
    its.it_value.tv_nsec = start % 1000000000LL;
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);

    struct epoll_event events[64];
    while (next < total || in_flight > 0 || wait_tail > wait_head) {
        int64_t t = now_ns();
        if (t > give_up) break;
        int timeout_ms = (int)((give_up - t) / 1000000) + 1;
        int n = epoll_wait(ep, events, 64, next < total ? -1 : timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("openloop: epoll_wait");
            return 2;
        }
        t = now_ns();
        for (int e = 0; e < n; e++) {
            uint32_t id = events[e].data.u32;
            if (id == UINT32_MAX) {
                uint64_t fired;
                if (read(tfd, &fired, sizeof fired) < 0 && errno != EAGAIN) perror("openloop: timerfd");
                while (next < total && start + next * interval <= t) {
                    waiting[wait_tail++] = start + next * interval;
                    if (wait_tail - wait_head > nidle) late++; /* no connection free for it */
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
            ssize_t got = read(k->fd, k->buf + k->len, BUF - k->len);
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            int status = 0;
            long whole = got > 0 ? answer_length(k->buf, k->len + (size_t)got, &status) : -1;
            if (got > 0) k->len += (size_t)got;
            if (whole == 0 && k->len < BUF) continue; /* more to come */
            if (k->busy) {
                in_flight--;
                k->busy = 0;
                if (whole > 0 && (size_t)whole == k->len && status == 200) {
                    answered++;
                    long index = (k->due - start) / interval;
                    if (index >= counted_from) lat[nlat++] = t - k->due;
                } else {
                    errors++;
                }
            } else if (got > 0) {
                errors++; /* bytes nobody asked for; a close while idle is no failure */
            }
            if (whole <= 0 || (size_t)whole != k->len) {
                /* closed, reset, unframeable or more than one answer: a new connection */
                epoll_ctl(ep, EPOLL_CTL_DEL, k->fd, NULL);
                close(k->fd);
                if ((k->fd = open_conn()) < 0) {
                    fprintf(stderr, "openloop: cannot reconnect: %s\n", strerror(errno));
                    return 2;
                }
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = id};
                epoll_ctl(ep, EPOLL_CTL_ADD, k->fd, &ev);
            }
            k->len = 0;
            idle[nidle++] = (int)id;
        }
        /* Send what is due, oldest first, on idle connections. */
        while (wait_head < wait_tail && nidle > 0) {
            int id = idle[--nidle];
            conn_t *k = &c[id];
            k->due = waiting[wait_head++];
            k->busy = 1;
            k->len = 0;
            in_flight++;
            if (write(k->fd, request, request_len) != (ssize_t)request_len) {
                /* A failed request: the read side sees the close, counts it and replaces
                 * the connection. */
                k->busy = 0;
                in_flight--;
            }
        }
    }
    errors += in_flight + (wait_tail - wait_head) + (total - next);
    qsort(lat, (size_t)nlat, sizeof *lat, cmp64);
    printf("{\"rate\": %.1f, \"connections\": %d, \"due\": %ld, \"answered\": %ld, \"errors\": %ld, "
           "\"late_sends\": %ld, \"counted\": %ld, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, "
           "\"p999_us\": %.1f, \"max_us\": %.1f}\n",
           rate, conns, total, answered, errors, late, nlat, pct(lat, nlat, 0.5), pct(lat, nlat, 0.9),
           pct(lat, nlat, 0.99), pct(lat, nlat, 0.999), nlat ? (double)lat[nlat - 1] / 1000.0 : 0.0);
    return 0;
}
