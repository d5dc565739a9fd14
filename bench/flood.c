/*
 * flood.c - short abusive connections against one loopback port, as fast as one
 * epoll loop can open them (used by bench/flood.py --c-flood).
 *
 *   flood PORT COUNT CONCURRENCY SECONDS
 *
 * Keeps CONCURRENCY non-blocking connections in flight; each, once connected,
 * sends one of: a reserved packet type, a partial CONNECT, a CONNECT, a CONNECT
 * and DISCONNECT, nothing, a CONNECT declaring 256 MiB - and closes with an RST
 * (SO_LINGER 0) so no TIME_WAIT piles up.  Stops after COUNT connections or
 * SECONDS.  Only 127.0.0.1 is contacted.  Prints one JSON object.
 * Build: gcc -O2 -o flood flood.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const unsigned char connect_pkt[] = {
    0x10, 0x0c, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, 0x02, 0x00, 0x00, 0x00, 0x00};
static const unsigned char connect_disc[] = {
    0x10, 0x0c, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, 0x02, 0x00, 0x00, 0x00, 0x00,
    0xe0, 0x00};
static const unsigned char reserved[] = {0xf0, 0x00};
static const unsigned char huge[] = {0x10, 0xff, 0xff, 0xff, 0x7f};

struct payload { const unsigned char *data; size_t len; };
static const struct payload payloads[] = {
    {reserved, sizeof reserved}, {connect_pkt, 7}, {connect_pkt, sizeof connect_pkt},
    {connect_disc, sizeof connect_disc}, {NULL, 0}, {huge, sizeof huge},
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int open_one(int ep, struct sockaddr_in *addr) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    if (connect(fd, (struct sockaddr *)addr, sizeof *addr) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: flood PORT COUNT CONCURRENCY SECONDS\n");
        return 2;
    }
    int port = atoi(argv[1]);
    long count = atol(argv[2]);
    int conc = atoi(argv[3]);
    double seconds = atof(argv[4]);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    int ep = epoll_create1(0);
    long started = 0, done = 0, errors = 0;
    int inflight = 0;
    unsigned seed = 12345;
    double t0 = now(), deadline = t0 + seconds;
    struct epoll_event events[256];
    while (done < count && now() < deadline) {
        while (inflight < conc && started < count) {
            started++;
            if (open_one(ep, &addr) < 0) { errors++; done++; continue; }
            inflight++;
        }
        int n = epoll_wait(ep, events, 256, 50);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) errors++;
            else {
                seed = seed * 1103515245u + 12345u;
                const struct payload *p = &payloads[(seed >> 16) % 6];
                if (p->len && send(fd, p->data, p->len, MSG_NOSIGNAL) < 0) errors++;
            }
            epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            close(fd);
            inflight--;
            done++;
        }
    }
    double elapsed = now() - t0;
    printf("{\"connections\": %ld, \"errors\": %ld, \"seconds\": %.2f, \"per_second\": %.0f}\n",
           done, errors, elapsed, done / elapsed);
    return 0;
}
