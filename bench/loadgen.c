/*
 * loadgen.c - MQTT 3.1.1 load generator for the mqttd benchmark suite.
 *
 * One process, one thread, one epoll loop, non-blocking sockets.  Packets are
 * pre-encoded from a template per publisher; each message is a memcpy plus a
 * 16-byte stamp (8-byte CLOCK_MONOTONIC send time in ns, 4-byte publisher
 * index, 4-byte sequence number) at the start of the payload.  Writes are
 * batched into a per-connection buffer and flushed with one write() per
 * batch.  Received data is only framed: packet type, packet id and, for a
 * PUBLISH, the stamp in the payload.  Subscribers keep a bitmap per
 * publisher, so every scenario reports unique deliveries, duplicates and loss.
 *
 * Every phase has a deadline; only the address given with --host is
 * contacted (the runner passes 127.0.0.1).  The result is one JSON object on
 * stdout.  Build: gcc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stddef.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* options */

static const char *opt_scenario;
static const char *opt_host = "127.0.0.1";
static int opt_port = 1883;
static double opt_duration = 5.0;  /* seconds of publishing */
static long opt_count = 0;         /* messages per publisher (0: until duration / cap) */
static int opt_pubs = -1, opt_subs = -1;
static int opt_payload = 64;
static int opt_window = 100;
static int opt_qos0_window = 500;  /* QoS 0: max messages a publisher runs ahead of delivery (0: open loop) */
static double opt_stall = 2.0;     /* QoS 0 window: write off the outstanding after this long without delivery */
static int opt_rate = 1000;        /* latency scenario: msg/s */
static int opt_conns = 10000;      /* connect storm */
static int opt_conc = 200;         /* connect storm: handshakes in progress */
static int opt_pid = 0;            /* broker pid for RSS */
static double opt_drain = 30.0;    /* max seconds to drain after publishing */
static double opt_idle = 2.0;      /* drain ends after this long without progress */
static double opt_hold = 1.0;      /* connect storm: settle before RSS read */
static long opt_cap = 4000000;     /* max messages per publisher (bitmap size) */
static int opt_warmup = 200;       /* latency: samples discarded */
static const char *opt_client_prefix = "lg";
static const char *opt_username = NULL;   /* CONNECT user name (and password) if set */
static const char *opt_password = NULL;

/* ------------------------------------------------------------------ */
/* time */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
static inline double ns2s(uint64_t ns) { return (double)ns / 1e9; }

/* ------------------------------------------------------------------ */
/* connections */

enum { ST_CONNECTING, ST_WAIT_CONNACK, ST_WAIT_SUBACK, ST_READY, ST_CLOSING, ST_CLOSED };
enum { ROLE_PUB, ROLE_SUB, ROLE_IDLE };

#define RBUF_CAP (256 * 1024)
#define WBUF_CAP (256 * 1024)
#define BATCH_BYTES (64 * 1024)
#define STAMP_BYTES 16

typedef struct conn {
    int fd;
    int idx;             /* index among publishers or subscribers */
    int role;
    int state;
    int qos;
    int clean;
    int want_out;        /* EPOLLOUT currently registered */
    int session_present;
    int paced;           /* latency publisher: only the timer generates */
    char client_id[64];
    const char *sub_topic;
    uint8_t *rbuf; size_t rlen, rcap;
    uint8_t *wbuf; size_t wlen, woff, wcap;
    char own_topic[48];  /* connect_subscribe: this connection's own filter */
    int pingresp;        /* PINGRESPs received (retained scenario's barrier) */
    /* publisher */
    uint8_t tmpl[512]; size_t tmpl_len, stamp_off, pid_off;
    uint32_t seq;        /* next sequence number == messages generated */
    uint32_t limit;      /* stop after this many */
    uint64_t acked;
    int inflight;
    uint16_t next_pid;
    uint64_t last_ack_ns;
    uint64_t written_off;  /* QoS 0 window: outstanding messages presumed lost */
    uint64_t blocked_since;
    long stalls;
    /* subscriber */
    uint64_t received, unique, dups, bad;
    uint64_t last_recv_ns;
} conn;

static int ep;
static long g_errors;          /* unexpected closes / socket errors */
static long g_unexpected;      /* unexpected packets */
static int g_publishing;       /* publishers may generate new messages */
static int g_npubs;
static uint8_t **g_bitmaps;    /* [sub * npubs + pub] */
static uint64_t *g_lat; static size_t g_nlat, g_latcap;
static int g_record_latency;
static struct sockaddr_in g_addr;
static uint64_t *g_pub_delivered; /* unique deliveries per publisher, summed over subscribers */
static int g_nsubs;
static uint64_t g_last_delivery_ns;

static void die(const char *msg) { perror(msg); exit(2); }

static void set_events(conn *c, int out) {
    if (c->state == ST_CLOSED) return;
    if (out == c->want_out) return;
    struct epoll_event ev = { .events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c };
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
    c->want_out = out;
}

static void conn_close(conn *c, int abortive) {
    if (c->state == ST_CLOSED) return;
    if (abortive) {
        struct linger lg = { 1, 0 };
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = ST_CLOSED;
}

static void conn_fail(conn *c) {
    if (c->state != ST_CLOSING && c->state != ST_CLOSED) g_errors++;
    conn_close(c, 1);
}

/* connection storms: tens of thousands of connections that only exchange a few small
   packets get 4 KB buffers instead of 256 KB ones */
static int g_small_bufs;
static int opt_source_addrs = 1;   /* bind connection i to 127.0.0.(1 + i % N): > 28k connections */

static void ensure_bufs(conn *c) {
    size_t cap = g_small_bufs ? 4096 : RBUF_CAP;
    if (!c->rbuf) { c->rbuf = malloc(cap); if (!c->rbuf) die("malloc"); c->rcap = cap; }
    if (!c->wbuf) { c->wbuf = malloc(cap); if (!c->wbuf) die("malloc"); c->wcap = cap; }
}

static int conn_start(conn *c) {
    ensure_bufs(c);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) { g_errors++; c->state = ST_CLOSED; return -1; }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (opt_source_addrs > 1) {
        /* one loopback source address per 28k connections: the ephemeral port range
           (32768-60999) limits connections per (source, destination) pair */
        struct sockaddr_in src;
        memset(&src, 0, sizeof src);
        src.sin_family = AF_INET;
        src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(c->idx % opt_source_addrs));
#ifdef IP_BIND_ADDRESS_NO_PORT
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
#endif
        if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) {
            close(c->fd); c->fd = -1; g_errors++; c->state = ST_CLOSED; return -1;
        }
    }
    c->state = ST_CONNECTING;
    c->rlen = c->wlen = c->woff = 0;
    c->want_out = 1;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.ptr = c };
    int r = connect(c->fd, (struct sockaddr *)&g_addr, sizeof g_addr);
    if (r < 0 && errno != EINPROGRESS) { close(c->fd); c->fd = -1; g_errors++; c->state = ST_CLOSED; return -1; }
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl add");
    return 0;
}

/* append bytes to the write buffer (caller flushes) */
static inline int wbuf_room(conn *c) { return (int)(c->wcap - c->wlen); }
static void wbuf_put(conn *c, const void *p, size_t n) {
    if (c->wlen + n > c->wcap) {
        /* compact */
        if (c->woff) { memmove(c->wbuf, c->wbuf + c->woff, c->wlen - c->woff); c->wlen -= c->woff; c->woff = 0; }
        if (c->wlen + n > c->wcap) { fprintf(stderr, "wbuf overflow\n"); exit(2); }
    }
    memcpy(c->wbuf + c->wlen, p, n);
    c->wlen += n;
}

static void pub_pump(conn *c);
static long pub_credit(conn *c);

static void conn_flush(conn *c) {
    if (c->state == ST_CLOSED || c->state == ST_CONNECTING) return;
    while (c->woff < c->wlen) {
        ssize_t n = write(c->fd, c->wbuf + c->woff, c->wlen - c->woff);
        if (n > 0) { c->woff += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        conn_fail(c);
        return;
    }
    if (c->woff == c->wlen) { c->woff = c->wlen = 0; }
    int out = c->woff < c->wlen;
    /* an open-loop QoS 0 publisher wants to be told whenever it may write */
    if (c->role == ROLE_PUB && c->qos == 0 && c->state == ST_READY && g_publishing && c->seq < c->limit && !c->paced
        && pub_credit(c) > 0) out = 1;
    set_events(c, out);
}

/* ------------------------------------------------------------------ */
/* encoding */

static size_t put_varint(uint8_t *p, size_t v) {
    size_t n = 0;
    do { uint8_t b = v % 128; v /= 128; if (v) b |= 0x80; p[n++] = b; } while (v);
    return n;
}
static size_t put_str(uint8_t *p, const char *s) {
    size_t l = strlen(s);
    p[0] = (uint8_t)(l >> 8); p[1] = (uint8_t)l; memcpy(p + 2, s, l);
    return l + 2;
}

static void send_connect(conn *c) {
    uint8_t body[512], pkt[600];
    size_t n = 0;
    n += put_str(body + n, "MQTT");
    body[n++] = 4;                          /* protocol level 3.1.1 */
    body[n++] = (c->clean ? 0x02 : 0x00)    /* connect flags */
              | (opt_username ? 0x80 : 0) | (opt_username && opt_password ? 0x40 : 0);
    body[n++] = 0; body[n++] = 0;           /* keepalive 0: no pings */
    n += put_str(body + n, c->client_id);
    if (opt_username) n += put_str(body + n, opt_username);
    if (opt_username && opt_password) n += put_str(body + n, opt_password);
    size_t m = 0;
    pkt[m++] = 0x10;
    m += put_varint(pkt + m, n);
    memcpy(pkt + m, body, n); m += n;
    wbuf_put(c, pkt, m);
}

static void send_subscribe(conn *c) {
    uint8_t body[256], pkt[300];
    size_t n = 0;
    body[n++] = 0; body[n++] = 1;           /* packet id 1 */
    n += put_str(body + n, c->sub_topic);
    body[n++] = (uint8_t)c->qos;
    size_t m = 0;
    pkt[m++] = 0x82;
    m += put_varint(pkt + m, n);
    memcpy(pkt + m, body, n); m += n;
    wbuf_put(c, pkt, m);
}

static void send_disconnect(conn *c) {
    static const uint8_t d[2] = { 0xE0, 0x00 };
    wbuf_put(c, d, 2);
}

static void build_publish_template(conn *c, const char *topic) {
    size_t tl = strlen(topic);
    size_t rl = 2 + tl + (c->qos ? 2 : 0) + (size_t)opt_payload;
    size_t m = 0;
    c->tmpl[m++] = c->qos ? 0x32 : 0x30;
    m += put_varint(c->tmpl + m, rl);
    m += put_str(c->tmpl + m, topic);
    if (c->qos) { c->pid_off = m; c->tmpl[m++] = 0; c->tmpl[m++] = 0; }
    c->stamp_off = m;
    memset(c->tmpl + m, 'x', (size_t)opt_payload);
    m += (size_t)opt_payload;
    c->tmpl_len = m;
}

static inline void put_publish(conn *c, uint64_t ts) {
    if (c->wlen + c->tmpl_len > c->wcap) wbuf_put(c, "", 0); /* compact */
    uint8_t *p = c->wbuf + c->wlen;
    memcpy(p, c->tmpl, c->tmpl_len);
    if (c->qos) {
        uint16_t id = c->next_pid;
        c->next_pid = (uint16_t)(id == 65535 ? 1 : id + 1);
        p[c->pid_off] = (uint8_t)(id >> 8); p[c->pid_off + 1] = (uint8_t)id;
    }
    uint32_t pub = (uint32_t)c->idx, seq = c->seq++;
    memcpy(p + c->stamp_off, &ts, 8);
    memcpy(p + c->stamp_off + 8, &pub, 4);
    memcpy(p + c->stamp_off + 12, &seq, 4);
    c->wlen += c->tmpl_len;
    if (c->qos) c->inflight++;
}

/* QoS 0 closed loop: how many more messages this publisher may generate */
static long pub_credit(conn *c) {
    if (c->qos || opt_qos0_window <= 0) return 1L << 40;
    uint64_t done = (g_nsubs ? g_pub_delivered[c->idx] / (uint64_t)g_nsubs : c->seq) + c->written_off;
    long out = (long)c->seq - (long)(done < c->seq ? done : c->seq);
    long credit = opt_qos0_window - out;
    if (credit > 0) { c->blocked_since = 0; return credit; }
    uint64_t t = now_ns();
    if (!c->blocked_since || g_last_delivery_ns > c->blocked_since) c->blocked_since = t;
    else if (t - c->blocked_since > (uint64_t)(opt_stall * 1e9)) {
        /* nothing delivered for a while: the broker dropped them; move on */
        c->written_off += (uint64_t)out; c->stalls++; c->blocked_since = 0;
        return opt_qos0_window;
    }
    return 0;
}

/* generate as many messages as flow control allows, then flush */
static void pub_pump(conn *c) {
    if (c->role != ROLE_PUB || c->state != ST_READY) return;
    if (g_publishing && !c->paced && c->seq < c->limit) {
        uint64_t ts = now_ns();
        int k = 0;
        if (c->qos == 0) {
            /* open loop: only when the socket took the previous batch */
            long credit = pub_credit(c);
            if (c->woff == c->wlen && credit > 0) {
                c->woff = c->wlen = 0;
                while (c->wlen + c->tmpl_len <= BATCH_BYTES && c->seq < c->limit && credit-- > 0) {
                    put_publish(c, ts);
                    if (++k == 64) { ts = now_ns(); k = 0; }
                }
            }
        } else {
            while (c->inflight < opt_window && c->seq < c->limit && wbuf_room(c) > (int)c->tmpl_len)
                put_publish(c, ts);
        }
    }
    conn_flush(c);
}

/* ------------------------------------------------------------------ */
/* receiving */

static void on_publish(conn *c, const uint8_t *p, size_t len, uint8_t hdr) {
    uint64_t t = now_ns();
    int qos = (hdr >> 1) & 3;
    if (len < 2) { c->bad++; return; }
    size_t tl = ((size_t)p[0] << 8) | p[1];
    size_t off = 2 + tl;
    uint16_t pid = 0;
    if (qos) {
        if (off + 2 > len) { c->bad++; return; }
        pid = (uint16_t)((p[off] << 8) | p[off + 1]);
        off += 2;
        uint8_t ack[4] = { qos == 1 ? 0x40 : 0x50, 0x02, (uint8_t)(pid >> 8), (uint8_t)pid };
        wbuf_put(c, ack, 4);
    }
    c->received++;
    c->last_recv_ns = t;
    if (off + STAMP_BYTES > len) { c->bad++; return; }
    uint64_t ts; uint32_t pub, seq;
    memcpy(&ts, p + off, 8); memcpy(&pub, p + off + 8, 4); memcpy(&seq, p + off + 12, 4);
    if ((int)pub >= g_npubs || seq >= (uint32_t)opt_cap) { c->bad++; return; }
    uint8_t *bm = g_bitmaps[(size_t)c->idx * g_npubs + pub];
    uint8_t bit = (uint8_t)(1u << (seq & 7));
    if (bm[seq >> 3] & bit) { c->dups++; return; }
    bm[seq >> 3] |= bit;
    c->unique++;
    g_pub_delivered[pub]++;
    g_last_delivery_ns = t;
    if (g_record_latency) {
        if (g_nlat == g_latcap) {
            g_latcap = g_latcap ? g_latcap * 2 : 65536;
            g_lat = realloc(g_lat, g_latcap * sizeof *g_lat);
            if (!g_lat) die("realloc");
        }
        g_lat[g_nlat++] = t - ts;
    }
}

static void on_packet(conn *c, uint8_t hdr, const uint8_t *p, size_t len) {
    switch (hdr >> 4) {
    case 2: /* CONNACK */
        if (c->state != ST_WAIT_CONNACK || len < 2 || p[1] != 0) { g_unexpected++; conn_fail(c); return; }
        c->session_present = p[0] & 1;
        if (c->role == ROLE_SUB && c->sub_topic) { send_subscribe(c); c->state = ST_WAIT_SUBACK; }
        else c->state = ST_READY;
        break;
    case 9: /* SUBACK */
        if (c->state != ST_WAIT_SUBACK || len < 3 || p[2] == 0x80) { g_unexpected++; conn_fail(c); return; }
        c->state = ST_READY;
        break;
    case 3: on_publish(c, p, len, hdr); break;
    case 4: /* PUBACK */
        c->acked++; c->inflight--; c->last_ack_ns = now_ns(); break;
    case 13: c->pingresp++; break; /* PINGRESP */
    default: g_unexpected++; break;
    }
}

static void conn_read(conn *c) {
    for (int rounds = 0; rounds < 8 && c->state != ST_CLOSED; rounds++) {
        ssize_t n = read(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen);
        if (n == 0) {
            if (c->state == ST_CLOSING) conn_close(c, 0); else conn_fail(c);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            conn_fail(c);
            return;
        }
        c->rlen += (size_t)n;
        size_t off = 0;
        while (c->rlen - off >= 2 && c->state != ST_CLOSED) {
            uint8_t *p = c->rbuf + off;
            size_t avail = c->rlen - off, rl = 0, i = 1;
            int mul = 1, complete = 0;
            while (i < avail && i <= 4) {
                rl += (size_t)(p[i] & 127) * mul; mul *= 128;
                if (!(p[i++] & 128)) { complete = 1; break; }
            }
            if (!complete) { if (i > 4) { g_unexpected++; conn_fail(c); return; } break; }
            if (avail < i + rl) break;
            on_packet(c, p[0], p + i, rl);
            off += i + rl;
        }
        if (c->state == ST_CLOSED) return;
        if (off) { memmove(c->rbuf, c->rbuf + off, c->rlen - off); c->rlen -= off; }
        if ((size_t)n < c->rcap / 2) break;
    }
    if (c->role == ROLE_PUB) pub_pump(c); else conn_flush(c);
}

static void on_event(conn *c, uint32_t ev) {
    if (c->state == ST_CONNECTING) {
        if (ev & (EPOLLERR | EPOLLHUP)) { conn_fail(c); return; }
        if (ev & EPOLLOUT) {
            int err = 0; socklen_t l = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err) { conn_fail(c); return; }
            c->state = ST_WAIT_CONNACK;
            send_connect(c);
            conn_flush(c);
        }
        return;
    }
    if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) conn_read(c);
    if (c->state == ST_CLOSED) return;
    if (ev & EPOLLOUT) {
        if (c->role == ROLE_PUB) pub_pump(c); else conn_flush(c);
    }
}

/* ------------------------------------------------------------------ */
/* the loop */

static conn *g_pubs, *g_subs;
static int g_timerfd = -1;
static uint64_t g_timer_ticks;
static void (*g_on_tick)(uint64_t);

static void loop_once(int timeout_ms) {
    struct epoll_event evs[512];
    int n = epoll_wait(ep, evs, 512, timeout_ms);
    if (n < 0) { if (errno == EINTR) return; die("epoll_wait"); }
    for (int i = 0; i < n; i++) {
        if (evs[i].data.ptr == NULL) {
            uint64_t t;
            if (read(g_timerfd, &t, 8) == 8) { g_timer_ticks += t; if (g_on_tick) g_on_tick(t); }
            continue;
        }
        on_event((conn *)evs[i].data.ptr, evs[i].events);
    }
    if (g_publishing && opt_qos0_window > 0)
        for (int i = 0; i < g_npubs; i++) {
            conn *c = &g_pubs[i];
            if (c->qos == 0 && c->state == ST_READY && !c->want_out && c->seq < c->limit) pub_pump(c);
        }
}

typedef int (*pred_fn)(void);

/* run the loop until pred() or the deadline; returns 1 if pred() became true */
static int run_until(pred_fn pred, uint64_t deadline_ns) {
    for (;;) {
        if (pred && pred()) return 1;
        uint64_t t = now_ns();
        if (t >= deadline_ns) return 0;
        uint64_t left_ms = (deadline_ns - t) / 1000000ull + 1;
        loop_once(left_ms > 50 ? 50 : (int)left_ms);
    }
}

static int count_state(conn *cs, int n, int st) {
    int k = 0;
    for (int i = 0; i < n; i++) k += cs[i].state == st;
    return k;
}
static int count_closed(conn *cs, int n) { return count_state(cs, n, ST_CLOSED); }

static int subs_ready(void) { return count_state(g_subs, g_nsubs, ST_READY) + count_closed(g_subs, g_nsubs) == g_nsubs; }
static int pubs_ready(void) { return count_state(g_pubs, g_npubs, ST_READY) + count_closed(g_pubs, g_npubs) == g_npubs; }

static int pubs_done(void) {
    for (int i = 0; i < g_npubs; i++) {
        conn *c = &g_pubs[i];
        if (c->state != ST_READY) continue;
        if (c->seq < c->limit) return 0;
    }
    return 1;
}
static int pubs_flushed(void) {
    for (int i = 0; i < g_npubs; i++) {
        conn *c = &g_pubs[i];
        if (c->state != ST_READY) continue;
        if (c->woff < c->wlen) return 0;
        if (c->qos && c->inflight > 0) return 0;
    }
    return 1;
}

static uint64_t total_sent(void) { uint64_t s = 0; for (int i = 0; i < g_npubs; i++) s += g_pubs[i].seq; return s; }
static uint64_t total_acked(void) { uint64_t s = 0; for (int i = 0; i < g_npubs; i++) s += g_pubs[i].acked; return s; }
static uint64_t total_unique(void) { uint64_t s = 0; for (int i = 0; i < g_nsubs; i++) s += g_subs[i].unique; return s; }
static uint64_t total_field(size_t off) {
    uint64_t s = 0;
    for (int i = 0; i < g_nsubs; i++) s += *(uint64_t *)((char *)&g_subs[i] + off);
    return s;
}
static uint64_t last_recv(void) { uint64_t m = 0; for (int i = 0; i < g_nsubs; i++) if (g_subs[i].last_recv_ns > m) m = g_subs[i].last_recv_ns; return m; }

static uint64_t g_expected;
static int all_delivered(void) { return total_unique() >= g_expected; }

/* drain: until all expected deliveries arrived, no progress for opt_idle, or opt_drain */
static void drain(void) {
    uint64_t hard = now_ns() + (uint64_t)(opt_drain * 1e9);
    uint64_t last = total_unique(), last_t = now_ns();
    for (;;) {
        g_expected = total_sent() * (uint64_t)g_nsubs;
        if (g_nsubs && all_delivered() && pubs_flushed()) return;
        if (!g_nsubs && pubs_flushed()) return;
        uint64_t t = now_ns();
        if (t >= hard) return;
        uint64_t u = total_unique() + total_acked();
        if (u != last) { last = u; last_t = t; }
        else if (t - last_t > (uint64_t)(opt_idle * 1e9)) return;
        loop_once(20);
    }
}

/* ------------------------------------------------------------------ */
/* setup helpers */

static void init_conn(conn *c, int role, int idx, int qos, int clean, const char *id_fmt) {
    memset(c, 0, sizeof *c);
    c->fd = -1; c->role = role; c->idx = idx; c->qos = qos; c->clean = clean;
    c->state = ST_CLOSED; c->next_pid = 1;
    snprintf(c->client_id, sizeof c->client_id, id_fmt, opt_client_prefix, (int)getpid(), idx);
}

static void alloc_bitmaps(void) {
    g_pub_delivered = calloc((size_t)g_npubs, sizeof *g_pub_delivered);
    size_t nb = (size_t)g_nsubs * g_npubs;
    g_bitmaps = calloc(nb, sizeof *g_bitmaps);
    for (size_t i = 0; i < nb; i++) {
        g_bitmaps[i] = calloc((size_t)opt_cap / 8 + 1, 1); /* untouched pages stay unmapped */
        if (!g_bitmaps[i]) die("calloc bitmap");
    }
}

static void start_all(conn *cs, int n) { for (int i = 0; i < n; i++) conn_start(&cs[i]); }

static uint32_t per_pub_limit(void) {
    long lim = opt_count > 0 ? opt_count : opt_cap;
    if (lim > opt_cap) lim = opt_cap;
    return (uint32_t)lim;
}

static void close_all(conn *cs, int n) { for (int i = 0; i < n; i++) conn_close(&cs[i], 1); }

/* ------------------------------------------------------------------ */
/* JSON output */

static int json_first = 1;
static void jstart(void) { printf("{"); json_first = 1; }
static void jkey(const char *k) { printf("%s\"%s\": ", json_first ? "" : ", ", k); json_first = 0; }
static void jstr(const char *k, const char *v) { jkey(k); printf("\"%s\"", v); }
static void jint(const char *k, long long v) { jkey(k); printf("%lld", v); }
static void jnum(const char *k, double v) { jkey(k); printf("%.3f", v); }
static void jend(void) { printf("}\n"); fflush(stdout); }

static void report_common(uint64_t t0, uint64_t t_stop) {
    uint64_t sent = total_sent(), uniq = total_unique();
    uint64_t expected = sent * (uint64_t)g_nsubs;
    uint64_t lr = last_recv();
    double elapsed = lr > t0 ? ns2s(lr - t0) : 0.0;
    jint("publishers", g_npubs); jint("subscribers", g_nsubs);
    jint("payload_bytes", opt_payload);
    jnum("publish_seconds", ns2s(t_stop - t0));
    jint("sent", (long long)sent);
    jint("acked", (long long)total_acked());
    jint("expected", (long long)expected);
    jint("delivered", (long long)uniq);
    jint("received", (long long)total_field(offsetof(conn, received)));
    jint("duplicates", (long long)total_field(offsetof(conn, dups)));
    jint("malformed", (long long)total_field(offsetof(conn, bad)));
    jint("lost", (long long)(expected > uniq ? expected - uniq : 0));
    jnum("loss_pct", expected ? 100.0 * (double)(expected - (uniq < expected ? uniq : expected)) / (double)expected : 0.0);
    jnum("elapsed_s", elapsed);
    jnum("rate", elapsed > 0 ? (double)uniq / elapsed : 0.0);
    jnum("send_rate", t_stop > t0 ? (double)sent / ns2s(t_stop - t0) : 0.0);
    long stalls = 0; for (int i = 0; i < g_npubs; i++) stalls += g_pubs[i].stalls;
    if (g_pubs[0].qos == 0) { jint("qos0_window", opt_qos0_window); jint("window_stalls", stalls); }
    jint("errors", g_errors);
    jint("unexpected_packets", g_unexpected);
}

/* ------------------------------------------------------------------ */
/* scenarios */

/* generic pub/sub throughput: npubs publishers (qos) -> nsubs subscribers (qos) */
static int scenario_throughput(int npubs, int nsubs, int qos, const char *sub_topic, int fanout) {
    g_npubs = npubs; g_nsubs = nsubs;
    g_pubs = calloc((size_t)npubs, sizeof(conn));
    g_subs = calloc((size_t)nsubs, sizeof(conn));
    alloc_bitmaps();
    for (int i = 0; i < nsubs; i++) {
        init_conn(&g_subs[i], ROLE_SUB, i, qos, 1, "%s-%d-s%d");
        g_subs[i].sub_topic = sub_topic;
    }
    for (int i = 0; i < npubs; i++) {
        init_conn(&g_pubs[i], ROLE_PUB, i, qos, 1, "%s-%d-p%d");
        char topic[64];
        if (fanout) snprintf(topic, sizeof topic, "bench/fanout");
        else snprintf(topic, sizeof topic, "bench/p/%d", i);
        build_publish_template(&g_pubs[i], topic);
        g_pubs[i].limit = per_pub_limit();
    }
    start_all(g_subs, nsubs);
    if (!run_until(subs_ready, now_ns() + 15000000000ull) || count_closed(g_subs, nsubs)) {
        fprintf(stderr, "subscribers failed to connect/subscribe (%d closed)\n", count_closed(g_subs, nsubs));
        return 1;
    }
    start_all(g_pubs, npubs);
    if (!run_until(pubs_ready, now_ns() + 15000000000ull) || count_closed(g_pubs, npubs)) {
        fprintf(stderr, "publishers failed to connect\n");
        return 1;
    }
    uint64_t t0 = now_ns();
    g_publishing = 1;
    for (int i = 0; i < npubs; i++) pub_pump(&g_pubs[i]);
    uint64_t stop = t0 + (uint64_t)(opt_duration * 1e9);
    run_until(pubs_done, stop);
    uint64_t t_stop = now_ns();
    g_publishing = 0;
    drain();
    jstart();
    jstr("scenario", opt_scenario);
    jint("qos", qos);
    if (qos) jint("window", opt_window);
    report_common(t0, t_stop);
    jend();
    close_all(g_pubs, npubs); close_all(g_subs, nsubs);
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t g_lat_due;  /* messages due by the timer */
static void lat_tick(uint64_t n) {
    if (!g_publishing) return;
    conn *c = &g_pubs[0];
    if (c->state != ST_READY) return;
    g_lat_due += n;
    while (g_lat_due > 0 && c->seq < c->limit) {
        if (c->inflight >= opt_window) break;   /* broker not acking: fall behind */
        put_publish(c, now_ns());
        g_lat_due--;
    }
    conn_flush(c);
}

static int scenario_latency(void) {
    g_npubs = 1; g_nsubs = 1;
    g_pubs = calloc(1, sizeof(conn)); g_subs = calloc(1, sizeof(conn));
    alloc_bitmaps();
    init_conn(&g_subs[0], ROLE_SUB, 0, 1, 1, "%s-%d-s%d");
    g_subs[0].sub_topic = "bench/lat";
    init_conn(&g_pubs[0], ROLE_PUB, 0, 1, 1, "%s-%d-p%d");
    build_publish_template(&g_pubs[0], "bench/lat");
    long total = (long)(opt_rate * opt_duration) + opt_warmup;
    if (opt_count > 0) total = opt_count;
    g_pubs[0].limit = (uint32_t)(total < opt_cap ? total : opt_cap);
    start_all(g_subs, 1);
    if (!run_until(subs_ready, now_ns() + 15000000000ull) || count_closed(g_subs, 1)) { fprintf(stderr, "subscriber failed\n"); return 1; }
    start_all(g_pubs, 1);
    if (!run_until(pubs_ready, now_ns() + 15000000000ull) || count_closed(g_pubs, 1)) { fprintf(stderr, "publisher failed\n"); return 1; }
    g_record_latency = 1;
    g_timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    long period_ns = 1000000000L / opt_rate;
    struct itimerspec its = { { period_ns / 1000000000L, period_ns % 1000000000L }, { 0, period_ns } };
    timerfd_settime(g_timerfd, 0, &its, NULL);
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
    epoll_ctl(ep, EPOLL_CTL_ADD, g_timerfd, &ev);
    g_on_tick = lat_tick;
    g_pubs[0].paced = 1; /* pub_pump must not blast: the timer drives it */
    uint64_t t0 = now_ns();
    g_publishing = 1;
    uint64_t stop = t0 + (uint64_t)((double)g_pubs[0].limit / opt_rate * 1e9) + 2000000000ull;
    run_until(pubs_done, stop);
    uint64_t t_stop = now_ns();
    g_publishing = 0;
    drain();
    jstart();
    jstr("scenario", opt_scenario);
    jint("qos", 1);
    jint("target_rate", opt_rate);
    report_common(t0, t_stop);
    size_t skip = g_nlat > (size_t)opt_warmup * 2 ? (size_t)opt_warmup : 0;
    size_t n = g_nlat - skip;
    if (skip > 0) {
        /* the warm-up's own figures, so a cold start stays visible in the report */
        qsort(g_lat, skip, sizeof *g_lat, cmp_u64);
        jint("warmup_samples", (long long)skip);
        jnum("warmup_p50_us", (double)g_lat[skip / 2] / 1e3);
        jnum("warmup_p99_us", (double)g_lat[(size_t)(skip * 0.99)] / 1e3);
        jnum("warmup_max_us", (double)g_lat[skip - 1] / 1e3);
    }
    if (n > 0) {
        uint64_t *l = g_lat + skip;
        qsort(l, n, sizeof *l, cmp_u64);
        double sum = 0; for (size_t i = 0; i < n; i++) sum += (double)l[i];
        jint("samples", (long long)n);
        jnum("p50_us", (double)l[n / 2] / 1e3);
        jnum("p90_us", (double)l[(size_t)(n * 0.90)] / 1e3);
        jnum("p99_us", (double)l[(size_t)(n * 0.99)] / 1e3);
        jnum("p999_us", (double)l[(size_t)(n * 0.999)] / 1e3);
        jnum("max_us", (double)l[n - 1] / 1e3);
        jnum("mean_us", sum / (double)n / 1e3);
    } else {
        jint("samples", 0);
    }
    jend();
    close_all(g_pubs, 1); close_all(g_subs, 1);
    return 0;
}

static long read_rss_kb(int pid) {
    if (pid <= 0) return -1;
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) { kb = strtol(line + 6, NULL, 10); break; }
    fclose(f);
    return kb;
}

static conn *g_storm; static int g_storm_n;

/* connect_storm: CONNECT -> CONNACK; connect_subscribe: CONNECT -> CONNACK, SUBSCRIBE to the
   connection's own topic bench/c/<i> (QoS 0) -> SUBACK.  Either way every connection is then
   held open, idle, and the broker's RSS read. */
static int scenario_connect_storm(int subscribe) {
    int n = opt_conns;
    g_small_bufs = 1;
    g_storm = calloc((size_t)n, sizeof(conn)); g_storm_n = n;
    if (!g_storm) die("calloc");
    for (int i = 0; i < n; i++) {
        init_conn(&g_storm[i], subscribe ? ROLE_SUB : ROLE_IDLE, i, 0, 1, "%s-%d-c%d");
        if (subscribe) {
            snprintf(g_storm[i].own_topic, sizeof g_storm[i].own_topic, "bench/c/%d", i);
            g_storm[i].sub_topic = g_storm[i].own_topic;
        }
    }
    long rss0 = read_rss_kb(opt_pid);
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)((opt_duration > 30 ? opt_duration : 30) * 1e9);
    int started = 0, ready = 0, failed = 0;
    uint64_t t_last = t0;
    /* keep at most opt_conc handshakes in progress */
    int pending = 0;
    for (;;) {
        while (started < n && pending < opt_conc) {
            conn_start(&g_storm[started]);
            started++; pending++;
        }
        loop_once(10);
        int r = 0, f = 0;
        for (int i = 0; i < started; i++) { r += g_storm[i].state == ST_READY; f += g_storm[i].state == ST_CLOSED; }
        if (r > ready) t_last = now_ns();
        ready = r; failed = f;
        pending = started - ready - failed;
        /* free buffers of idle connections: we will only read EOFs from now on */
        if (started == n && pending == 0) break;
        if (now_ns() > deadline) break;
    }
    double elapsed = ns2s(t_last - t0);
    /* hold: keep the loop running so the broker sees live peers, then read RSS */
    run_until(NULL, now_ns() + (uint64_t)(opt_hold * 1e9));
    long rss1 = read_rss_kb(opt_pid);
    int alive = count_state(g_storm, n, ST_READY);
    jstart();
    jstr("scenario", opt_scenario);
    jint("subscribe", subscribe);
    jint("source_addrs", opt_source_addrs);
    jint("connections", n);
    jint("connected", ready);
    jint("alive_at_rss", alive);
    jint("failed", failed);
    jnum("elapsed_s", elapsed);
    jnum("rate", elapsed > 0 ? (double)ready / elapsed : 0.0);
    jint("rss_before_kb", rss0);
    jint("rss_after_kb", rss1);
    jnum("rss_per_conn_bytes", (rss0 >= 0 && rss1 >= 0 && alive > 0) ? (double)(rss1 - rss0) * 1024.0 / alive : -1.0);
    jint("delivered", ready);
    jint("lost", n - ready);
    jint("errors", g_errors);
    jint("unexpected_packets", g_unexpected);
    jend();
    close_all(g_storm, n);
    return 0;
}

static int sub_closed(void) { return g_subs[0].state == ST_CLOSED; }

/* ------------------------------------------------------------------ */
/* retained_subscribe: does a SUBSCRIBE cost O(matching retained messages) or a scan of all? */

static long opt_retained = 1000000;      /* retained topics in the large phase */
static long opt_retained_small = 10000;  /* ... in the small phase */
static int opt_rounds = 20;              /* SUBSCRIBEs timed per phase */
static long g_ret_next, g_ret_target;

/* retained topic i: bench/r/A/B/C, A = i / 10000, B = i / 100 % 100, C = i % 100, so the
   filter bench/r/A/B/+ matches exactly 100 of them */
static void retained_fill(conn *c) {
    char topic[64];
    uint8_t pkt[160];
    while (g_ret_next < g_ret_target && wbuf_room(c) > (int)sizeof pkt) {
        long i = g_ret_next++;
        snprintf(topic, sizeof topic, "bench/r/%ld/%ld/%ld", i / 10000, i / 100 % 100, i % 100);
        size_t tl = strlen(topic), m = 0;
        pkt[m++] = 0x31;                               /* PUBLISH, QoS 0, retain */
        m += put_varint(pkt + m, 2 + tl + STAMP_BYTES);
        m += put_str(pkt + m, topic);
        uint64_t ts = now_ns(); uint32_t pub = 0, seq = (uint32_t)i;
        memcpy(pkt + m, &ts, 8); memcpy(pkt + m + 8, &pub, 4); memcpy(pkt + m + 12, &seq, 4);
        m += STAMP_BYTES;
        wbuf_put(c, pkt, m);
    }
    conn_flush(c);
}

static conn *g_wait_conn; static int g_wait_pings;
static int ping_answered(void) { return g_wait_conn->pingresp >= g_wait_pings || g_wait_conn->state == ST_CLOSED; }

/* publish retained topics [g_ret_next, upto) as QoS 0, then PINGREQ as a barrier: the broker
   handles one connection's packets in order, so the PINGRESP means all are stored */
static int retained_load(conn *p, long upto, double *rate) {
    uint64_t t0 = now_ns(), deadline = t0 + 600000000000ull;
    long first = g_ret_next;
    g_ret_target = upto;
    for (;;) {
        retained_fill(p);
        if (p->state == ST_CLOSED) return -1;
        if (g_ret_next >= upto && p->woff == p->wlen) break;
        if (p->woff < p->wlen) loop_once(50);
        if (now_ns() > deadline) return -1;
    }
    static const uint8_t ping[2] = { 0xC0, 0x00 };
    wbuf_put(p, ping, 2);
    conn_flush(p);
    g_wait_conn = p; g_wait_pings = p->pingresp + 1;
    if (!run_until(ping_answered, now_ns() + 300000000000ull) || p->state == ST_CLOSED) return -1;
    double el = ns2s(now_ns() - t0);
    *rate = el > 0 ? (double)(upto - first) / el : 0.0;
    return 0;
}

static uint64_t g_sub_want;
static int subscribe_done(void) {
    conn *s = &g_subs[0];
    return s->state == ST_CLOSED || (s->state == ST_READY && s->received >= g_sub_want);
}

/* time opt_rounds SUBSCRIBEs of bench/r/A/B/+ (100 matches each) from b0 on: from the
   SUBSCRIBE's write to the SUBACK and the last of its retained messages; median in ms */
static double time_subscribes(int b0, uint64_t *matched, int *failures) {
    conn *s = &g_subs[0];
    double *ms = calloc((size_t)opt_rounds, sizeof *ms);
    int n = 0;
    for (int r = 0; r < opt_rounds; r++) {
        char filter[48];
        snprintf(filter, sizeof filter, "bench/r/0/%d/+", (b0 + r) % 100);
        uint64_t before = s->received;
        g_sub_want = before + 100;
        s->sub_topic = filter;
        s->state = ST_WAIT_SUBACK;
        uint64_t t = now_ns();
        send_subscribe(s);
        conn_flush(s);
        int ok = run_until(subscribe_done, t + 30000000000ull) && s->state == ST_READY;
        s->sub_topic = NULL;
        *matched += s->received - before;
        if (!ok) { (*failures)++; if (s->state == ST_CLOSED) break; continue; }
        uint64_t end = s->last_recv_ns > t ? s->last_recv_ns : now_ns();
        ms[n++] = ns2s(end - t) * 1e3;
    }
    double med = 0;
    if (n) { qsort(ms, (size_t)n, sizeof *ms, cmp_double); med = ms[n / 2]; }
    free(ms);
    return med;
}

static int scenario_retained(void) {
    g_npubs = 1; g_nsubs = 1;
    g_pubs = calloc(1, sizeof(conn)); g_subs = calloc(1, sizeof(conn));
    if (opt_cap < opt_retained + 1) opt_cap = opt_retained + 1;
    alloc_bitmaps();
    conn *p = &g_pubs[0], *s = &g_subs[0];
    init_conn(p, ROLE_PUB, 0, 0, 1, "%s-%d-rp%d");
    p->paced = 1;   /* no template publishing: retained_fill writes */
    init_conn(s, ROLE_SUB, 0, 0, 1, "%s-%d-rs%d");
    conn_start(p);
    if (!run_until(pubs_ready, now_ns() + 15000000000ull) || p->state != ST_READY) { fprintf(stderr, "publisher failed\n"); return 1; }
    conn_start(s);
    if (!run_until(subs_ready, now_ns() + 15000000000ull) || s->state != ST_READY) { fprintf(stderr, "subscriber failed\n"); return 1; }
    long rss0 = read_rss_kb(opt_pid);
    long small = opt_retained_small < opt_retained ? opt_retained_small : opt_retained;
    double rate_small = 0, rate_large = 0;
    if (retained_load(p, small, &rate_small) < 0) { fprintf(stderr, "loading %ld retained failed\n", small); return 1; }
    long rss_small = read_rss_kb(opt_pid);
    uint64_t matched_small = 0, matched_large = 0;
    int fail_small = 0, fail_large = 0;
    int rounds = opt_rounds > 50 ? 50 : opt_rounds;
    opt_rounds = rounds;
    double ms_small = time_subscribes(0, &matched_small, &fail_small);
    uint64_t t_load = now_ns();
    if (retained_load(p, opt_retained, &rate_large) < 0) { fprintf(stderr, "loading %ld retained failed\n", opt_retained); return 1; }
    double load_s = ns2s(now_ns() - t_load);
    long rss_large = read_rss_kb(opt_pid);
    double ms_large = time_subscribes(50, &matched_large, &fail_large);
    uint64_t expected = (uint64_t)rounds * 200;
    jstart();
    jstr("scenario", opt_scenario);
    jint("retained_small", small);
    jint("retained", opt_retained);
    jint("rounds", rounds);
    jint("matches_per_subscribe", 100);
    jnum("load_rate", rate_large);
    jnum("load_seconds", load_s);
    jnum("subscribe_ms_small", ms_small);
    jnum("subscribe_ms", ms_large);
    jnum("subscribe_ratio", ms_small > 0 ? ms_large / ms_small : 0.0);
    jint("rss_before_kb", rss0);
    jint("rss_small_kb", rss_small);
    jint("rss_after_kb", rss_large);
    jnum("rss_per_retained_bytes", (rss0 >= 0 && rss_large >= 0) ? (double)(rss_large - rss0) * 1024.0 / (double)opt_retained : -1.0);
    jint("expected", (long long)expected);
    jint("delivered", (long long)(matched_small + matched_large));
    jint("lost", (long long)(expected > matched_small + matched_large ? expected - matched_small - matched_large : 0));
    jint("subscribe_failures", fail_small + fail_large);
    jint("errors", g_errors);
    jint("unexpected_packets", g_unexpected);
    jend();
    close_all(g_pubs, 1); close_all(g_subs, 1);
    return 0;
}

static int scenario_persistent(void) {
    g_npubs = 1; g_nsubs = 1;
    g_pubs = calloc(1, sizeof(conn)); g_subs = calloc(1, sizeof(conn));
    alloc_bitmaps();
    conn *s = &g_subs[0], *p = &g_pubs[0];
    init_conn(s, ROLE_SUB, 0, 1, 0, "%s-%d-persist%d");
    s->sub_topic = "bench/persist";
    init_conn(p, ROLE_PUB, 0, 1, 1, "%s-%d-p%d");
    build_publish_template(p, "bench/persist");
    long count = opt_count > 0 ? opt_count : 10000;
    p->limit = (uint32_t)(count < opt_cap ? count : opt_cap);
    /* 1. subscribe with a persistent session, then go offline */
    conn_start(s);
    if (!run_until(subs_ready, now_ns() + 15000000000ull) || s->state != ST_READY) { fprintf(stderr, "subscriber failed\n"); return 1; }
    send_disconnect(s);
    s->state = ST_CLOSING;
    conn_flush(s);
    shutdown(s->fd, SHUT_WR);
    run_until(sub_closed, now_ns() + 3000000000ull);
    conn_close(s, 1);
    /* 2. publish while the subscriber is offline */
    conn_start(p);
    if (!run_until(pubs_ready, now_ns() + 15000000000ull) || p->state != ST_READY) { fprintf(stderr, "publisher failed\n"); return 1; }
    uint64_t t0 = now_ns();
    g_publishing = 1;
    pub_pump(p);
    uint64_t stop = t0 + (uint64_t)(opt_duration * 1e9);
    run_until(pubs_done, stop);
    uint64_t t_stop_gen = now_ns();
    g_publishing = 0;
    run_until(pubs_flushed, now_ns() + (uint64_t)(opt_drain * 1e9));
    uint64_t t_acked = p->last_ack_ns ? p->last_ack_ns : now_ns();
    uint64_t sent = p->seq, acked = p->acked;
    conn_close(p, 1);
    /* 3. the subscriber comes back and drains its queue */
    s->sub_topic = NULL;  /* no SUBSCRIBE: the session has it */
    s->role = ROLE_SUB;
    uint64_t t1 = now_ns();
    conn_start(s);
    if (!run_until(subs_ready, now_ns() + 15000000000ull) || s->state != ST_READY) { fprintf(stderr, "subscriber reconnect failed\n"); return 1; }
    int session_present = s->session_present;
    g_expected = acked;
    uint64_t hard = now_ns() + (uint64_t)(opt_drain * 1e9);
    uint64_t last = 0, last_t = now_ns();
    while (s->unique < acked && s->state != ST_CLOSED) {
        uint64_t t = now_ns();
        if (t >= hard) break;
        if (s->unique != last) { last = s->unique; last_t = t; }
        else if (t - last_t > (uint64_t)(opt_idle * 1e9)) break;
        loop_once(20);
    }
    uint64_t lr = s->last_recv_ns;
    double drain_s = lr > t1 ? ns2s(lr - t1) : 0.0;
    double pub_s = ns2s(t_acked - t0);
    jstart();
    jstr("scenario", opt_scenario);
    jint("qos", 1);
    jint("window", opt_window);
    jint("sent", (long long)sent);
    jint("acked", (long long)acked);
    jnum("publish_seconds", ns2s(t_stop_gen - t0));
    jnum("publish_elapsed_s", pub_s);
    jnum("publish_rate", pub_s > 0 ? (double)acked / pub_s : 0.0);
    jint("session_present", session_present);
    jint("expected", (long long)acked);
    jint("delivered", (long long)s->unique);
    jint("received", (long long)s->received);
    jint("duplicates", (long long)s->dups);
    jint("malformed", (long long)s->bad);
    jint("lost", (long long)(acked > s->unique ? acked - s->unique : 0));
    jnum("loss_pct", acked ? 100.0 * (double)(acked > s->unique ? acked - s->unique : 0) / (double)acked : 0.0);
    jnum("drain_elapsed_s", drain_s);
    jnum("drain_rate", drain_s > 0 ? (double)s->unique / drain_s : 0.0);
    jnum("rate", drain_s > 0 ? (double)s->unique / drain_s : 0.0);
    jint("errors", g_errors);
    jint("unexpected_packets", g_unexpected);
    jend();
    conn_close(s, 1);
    return 0;
}

/* ------------------------------------------------------------------ */

static void usage(void) {
    fprintf(stderr,
        "usage: loadgen SCENARIO [options]\n"
        "scenarios: fanin_qos0 fanin_qos1 fanout_qos0 latency_qos1 connect_storm connect_subscribe\n"
        "           persistent_qos1 retained_subscribe\n"
        "  --host H --port P --duration S --count N --pubs N --subs N --payload B\n"
        "  --window N --rate N --conns N --conc N --pid PID --drain S --idle S --hold S\n"
        "  --cap N --warmup N --client-prefix STR --qos0-window N --stall S\n"
        "  --username U --password P   (CONNECT credentials, each at most 100 bytes)\n"
        "  --source-addrs N   bind connection i to 127.0.0.(1 + i %% N) (more than 28k connections)\n"
        "  --retained N --retained-small N --rounds N   (retained_subscribe)\n");
    exit(2);
}

int main(int argc, char **argv) {
    static struct option lo[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"duration", 1, 0, 'd'}, {"count", 1, 0, 'n'},
        {"pubs", 1, 0, 'P'}, {"subs", 1, 0, 'S'}, {"payload", 1, 0, 'b'}, {"window", 1, 0, 'w'},
        {"rate", 1, 0, 'r'}, {"conns", 1, 0, 'c'}, {"conc", 1, 0, 'C'}, {"pid", 1, 0, 'i'},
        {"drain", 1, 0, 'D'}, {"idle", 1, 0, 'I'}, {"hold", 1, 0, 'H'}, {"cap", 1, 0, 'K'},
        {"warmup", 1, 0, 'W'}, {"qos0-window", 1, 0, 'q'}, {"stall", 1, 0, 's'}, {"client-prefix", 1, 0, 'x'},
        {"username", 1, 0, 'u'}, {"password", 1, 0, 'a'}, {"source-addrs", 1, 0, 'A'},
        {"retained", 1, 0, 'R'}, {"retained-small", 1, 0, 'm'}, {"rounds", 1, 0, 'o'}, {0, 0, 0, 0}};
    if (argc < 2) usage();
    opt_scenario = argv[1];
    optind = 2;
    int o;
    while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (o) {
        case 'h': opt_host = optarg; break;
        case 'p': opt_port = atoi(optarg); break;
        case 'd': opt_duration = atof(optarg); break;
        case 'n': opt_count = atol(optarg); break;
        case 'P': opt_pubs = atoi(optarg); break;
        case 'S': opt_subs = atoi(optarg); break;
        case 'b': opt_payload = atoi(optarg); break;
        case 'w': opt_window = atoi(optarg); break;
        case 'r': opt_rate = atoi(optarg); break;
        case 'c': opt_conns = atoi(optarg); break;
        case 'C': opt_conc = atoi(optarg); break;
        case 'i': opt_pid = atoi(optarg); break;
        case 'D': opt_drain = atof(optarg); break;
        case 'I': opt_idle = atof(optarg); break;
        case 'H': opt_hold = atof(optarg); break;
        case 'K': opt_cap = atol(optarg); break;
        case 'W': opt_warmup = atoi(optarg); break;
        case 'q': opt_qos0_window = atoi(optarg); break;
        case 's': opt_stall = atof(optarg); break;
        case 'x': opt_client_prefix = optarg; break;
        case 'u': opt_username = optarg; break;
        case 'a': opt_password = optarg; break;
        case 'A': opt_source_addrs = atoi(optarg); break;
        case 'R': opt_retained = atol(optarg); break;
        case 'm': opt_retained_small = atol(optarg); break;
        case 'o': opt_rounds = atoi(optarg); break;
        default: usage();
        }
    }
    if ((opt_username && strlen(opt_username) > 100) || (opt_password && strlen(opt_password) > 100))
        usage();
    if (opt_payload < STAMP_BYTES) opt_payload = STAMP_BYTES;
    if (opt_payload > 400) opt_payload = 400;
    if (opt_window < 1) opt_window = 1;
    if (opt_window > 60000) opt_window = 60000;
    if (opt_rate < 1) opt_rate = 1;
    if (opt_source_addrs < 1) opt_source_addrs = 1;
    if (opt_source_addrs > 250) opt_source_addrs = 250;
    if (opt_retained < 1) opt_retained = 1;
    if (opt_retained > 4000000) opt_retained = 4000000;
    if (opt_rounds < 1) opt_rounds = 1;
    if (opt_duration <= 0 || opt_duration > 600) opt_duration = 5;
    if (opt_drain <= 0 || opt_drain > 600) opt_drain = 30;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    memset(&g_addr, 0, sizeof g_addr);
    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)opt_port);
    if (inet_pton(AF_INET, opt_host, &g_addr.sin_addr) != 1) { fprintf(stderr, "bad host %s\n", opt_host); return 2; }
    if (opt_source_addrs > 1 && strcmp(opt_host, "127.0.0.1") != 0) {
        fprintf(stderr, "--source-addrs needs --host 127.0.0.1 (the sources are 127.0.0.x)\n");
        return 2;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    const char *s = opt_scenario;
    if (!strcmp(s, "fanin_qos0")) return scenario_throughput(opt_pubs > 0 ? opt_pubs : 10, opt_subs > 0 ? opt_subs : 1, 0, "bench/#", 0);
    if (!strcmp(s, "fanin_qos1")) return scenario_throughput(opt_pubs > 0 ? opt_pubs : 10, opt_subs > 0 ? opt_subs : 1, 1, "bench/#", 0);
    if (!strcmp(s, "fanout_qos0")) return scenario_throughput(opt_pubs > 0 ? opt_pubs : 1, opt_subs > 0 ? opt_subs : 100, 0, "bench/fanout", 1);
    if (!strcmp(s, "latency_qos1")) return scenario_latency();
    if (!strcmp(s, "connect_storm")) return scenario_connect_storm(0);
    if (!strcmp(s, "connect_subscribe")) return scenario_connect_storm(1);
    if (!strcmp(s, "retained_subscribe")) return scenario_retained();
    if (!strcmp(s, "persistent_qos1")) return scenario_persistent();
    usage();
    return 2;
}
