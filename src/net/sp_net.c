#include "sp_net_int.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

double sp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void close_fd(sp_conn *c)
{
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = C_CLOSED;
}

sp_conn *sp_conn_new(const sp_conn_opts *o, sp_error *err)
{
    sp_error_clear(err);
    sp_conn *c = calloc(1, sizeof *c);
    if (!c) {
        sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "out of memory");
        return NULL;
    }
    c->fd = -1;
    if (o->proxy_kind != SP_PROXY_NONE) {
        /* resolve and connect to the proxy; the target goes in its handshake */
        c->proxy = sp_proxy_new(o->proxy_kind, o->host, o->port, o->proxy_user, o->proxy_password, err);
        if (!c->proxy) {
            free(c);
            return NULL;
        }
        snprintf(c->host, sizeof c->host, "%s", o->proxy_host);
        snprintf(c->port, sizeof c->port, "%s", o->proxy_port);
    } else {
        snprintf(c->host, sizeof c->host, "%s", o->host);
        snprintf(c->port, sizeof c->port, "%s", o->port);
    }
    c->connect_timeout = o->connect_timeout > 0 ? o->connect_timeout : sp_default_timeout(SP_PHASE_CONNECT);
    c->tls = o->tls;
    c->implicit = o->implicit_tls;
    snprintf(c->server_name, sizeof c->server_name, "%s", o->server_name ? o->server_name : o->host);
    if ((c->implicit || o->session.starttls) && !c->tls) {
        sp_conn_free(c);
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_CONNECT, "TLS wanted but no TLS context given");
        return NULL;
    }
    sp_session_opts so = o->session;
    for (int i = 0; i < SP_PHASE_COUNT; i++) /* the session keeps the reply clock */
        if (o->timeouts[i] > 0)
            so.timeouts[i] = o->timeouts[i];
    so.tls_active = c->implicit;
    if (sp_session_opts_check(&so, err) < 0) {
        sp_conn_free(c);
        return NULL;
    }
    c->s = sp_session_new(&so);
    if (!c->s) {
        sp_conn_free(c);
        sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "out of memory");
        return NULL;
    }
    c->res = sp_resolve_new(c->host, c->port, o->dns_servers, err);
    if (!c->res) {
        sp_conn_free(c);
        return NULL;
    }
    c->last_activity = sp_now();
    if (!sp_resolve_done(c->res)) {
        c->state = C_RESOLVING; /* the loop polls the resolver's sockets */
        return c;
    }
    /* A name in /etc/hosts (or a numeric address) is known at once. */
    if (sp_resolve_result(c->res, err) < 0) {
        sp_conn_free(c);
        return NULL;
    }
    if (sp_net_try_connect(c) < 0) {
        *err = c->connect_err;
        sp_conn_free(c);
        return NULL;
    }
    return c;
}

void sp_conn_free(sp_conn *c)
{
    if (!c)
        return;
    close_fd(c);
    sp_proxy_free(c->proxy);
    c->proxy = NULL;
    sp_resolve_free(c->res); /* a lookup under way is cancelled */
    sp_body_src_free(c->body);
    sp_session_free(c->s);
    free(c);
}

sp_session *sp_conn_session(sp_conn *c) { return c->s; }
int sp_conn_is_open(const sp_conn *c) { return c->state != C_CLOSED; }
const sp_conn_counters *sp_conn_counters_get(const sp_conn *c) { return &c->counters; }

void sp_conn_set_dot_hook(sp_conn *c, sp_dot_hook fn, void *ud)
{
    c->dot_hook = fn;
    c->dot_ud = ud;
}

void sp_conn_set_sync_hook(sp_conn *c, sp_dot_hook fn, void *ud)
{
    c->sync_hook = fn;
    c->sync_ud = ud;
}

void sp_conn_set_body_src(sp_conn *c, sp_body_src *src)
{
    sp_body_src_free(c->body);
    c->body = src;
}


/* The session's queue is the only one; the caller gets the events the
 * driver has acted on (at its last read or write), in order. */
int sp_conn_has_events(const sp_conn *c) { return sp_session_looked_events(c->s) > 0; }

sp_event sp_conn_next_event(sp_conn *c)
{
    return sp_session_looked_events(c->s) ? sp_session_next_event(c->s) : SP_EV_NONE;
}

static void fill_body(sp_conn *c) { sp_body_pump(c->s, &c->body, &c->dot_hook, c->dot_ud); }

/* Acts on the session's new events; takes out the ones that are the
 * driver's alone. */
static void start_handshake(sp_conn *c, double now);

void sp_net_pump(sp_conn *c)
{
    sp_event e;
    while ((e = sp_session_look_event(c->s)) != SP_EV_NONE) {
        if (e == SP_EV_BODY) {
            sp_session_take_looked(c->s);
            fill_body(c);
            continue;
        }
        if (e == SP_EV_TLS) {
            sp_session_take_looked(c->s);
            start_handshake(c, sp_now());
            continue;
        }
        if (e == SP_EV_TX_DONE && !sp_session_tx_open(c->s)) {
            /* no transaction in progress (a pipelined next one keeps its own) */
            sp_body_src_free(c->body);
            c->body = NULL;
            c->dot_hook = NULL; /* the transaction is over: its hook must not fire for the next */
        }
        if (e == SP_EV_CLOSED && c->ssl) {
            /* A clean end: close_notify keeps the session resumable (OpenSSL
             * marks sessions of unclean closes unusable). Non-blocking, one try. */
            ERR_clear_error();
            SSL_shutdown(c->ssl);
            ERR_clear_error();
        }
        if (e == SP_EV_ERROR && c->ssl && sp_session_error(c->s)->kind != SP_KIND_TLS &&
            SSL_is_init_finished(c->ssl)) {
            /* The server ended the session (a 421, an EOF), not TLS: its
             * session stays resumable. OpenSSL marks the session of a
             * connection freed without a shutdown unusable. The pool now
             * keeps copies of the tickets (sp_tls.c), which that mark does
             * not reach; this stays for the connection's own session.
             * Nothing is sent: the peer is gone. */
            SSL_set_shutdown(c->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
        }
        if (e == SP_EV_ERROR || e == SP_EV_CLOSED)
            close_fd(c);
        if (e == SP_EV_NEXT)
            c->hold = 1;
    }
}

static void transport_error(sp_conn *c, int err_no, const char *what)
{
    sp_error e;
    sp_error_set(&e, SP_KIND_CONNECTION, sp_session_phase(c->s), "%s: %s", what, strerror(err_no));
    sp_conn_abort(c, &e);
}

/* A TLS record layer failure after the handshake: the connection is gone,
 * like a reset (kind connection, so the message is retried). */
static void tls_io_error(sp_conn *c, const char *what, int ret)
{
    sp_error e;
    int se = SSL_get_error(c->ssl, ret);
    if (se == SSL_ERROR_SYSCALL && errno) {
        transport_error(c, errno, what);
        return;
    }
    sp_tls_error(&e, sp_session_phase(c->s), what, c->ssl, ret);
    e.kind = SP_KIND_CONNECTION;
    sp_conn_abort(c, &e);
}

static void handshake_step(sp_conn *c, double now)
{
    ERR_clear_error();
    int r = SSL_connect(c->ssl);
    if (r == 1) {
        sp_tls_note_handshake(c->tls, c->ssl);
        c->state = C_OPEN;
        c->last_activity = now;
        sp_session_activity(c->s, now);
        if (sp_session_state(c->s) == SP_ST_TLS) {
            sp_session_tls_done(c->s);
            sp_net_pump(c);
        }
        return;
    }
    int se = SSL_get_error(c->ssl, r);
    if (se == SSL_ERROR_WANT_READ) {
        c->hs_events = POLLIN;
        return;
    }
    if (se == SSL_ERROR_WANT_WRITE) {
        c->hs_events = POLLOUT;
        return;
    }
    sp_error e;
    /* A record OpenSSL cannot read at implicit TLS is most often an SMTP
     * server greeting in plaintext ("220 ...") on a STARTTLS port. */
    unsigned long first = ERR_peek_error();
    int plain = c->implicit && ERR_GET_LIB(first) == ERR_LIB_SSL &&
                (ERR_GET_REASON(first) == SSL_R_WRONG_VERSION_NUMBER ||
                 ERR_GET_REASON(first) == SSL_R_UNKNOWN_PROTOCOL ||
                 ERR_GET_REASON(first) == SSL_R_PACKET_LENGTH_TOO_LONG);
    sp_tls_error(&e, c->implicit ? SP_PHASE_CONNECT : SP_PHASE_STARTTLS, "TLS handshake", c->ssl, r);
    if (plain) {
        size_t n = strlen(e.text);
        snprintf(e.text + n, sizeof e.text - n, " (the server answered in plaintext, not TLS: a server that "
                 "greets first and offers STARTTLS, as on ports 25 and 587, wants tls = \"starttls\")");
    }
    sp_conn_abort(c, &e);
}

static void start_handshake(sp_conn *c, double now)
{
    sp_error e;
    c->ssl = sp_tls_new_ssl(c->tls, c->server_name, &e);
    if (!c->ssl || sp_tls_set_fd(c->tls, c->ssl, c->fd) != 0) {
        if (c->ssl)
            sp_error_set(&e, SP_KIND_TLS, SP_PHASE_STARTTLS, "out of memory attaching the socket");
        sp_conn_abort(c, &e);
        return;
    }
    c->state = C_HANDSHAKE;
    c->last_activity = now;
    handshake_step(c, now);
}

/* A write refused by a peer that closed (EPIPE, ECONNRESET) may follow
 * replies it sent before closing, still in the socket's receive queue: the
 * 421 that ended the session, the 250s of messages before it. Read them
 * into the session before the write error ends it, so a pipelined message
 * the server refused is a refusal, not "ambiguous", and one it accepted is
 * sent. (Plain sockets only: after a failed SSL_write OpenSSL allows no
 * further I/O on the connection.) */
static void drain_replies(sp_conn *c)
{
    char buf[READ_CHUNK];
    for (int i = 0; i < 64 && c->state == C_OPEN; i++) {
        ssize_t r = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return;
        c->counters.reads++;
        c->counters.bytes_in += (unsigned long long)r;
        sp_session_feed(c->s, buf, (size_t)r);
        sp_net_pump(c);
    }
}

/* Writes what the session has queued; returns -1 when the connection died. */
static int flush_out(sp_conn *c, double now)
{
    for (;;) {
        fill_body(c);
        /* A final dot just queued (SP_EV_NEXT) waits for the caller, who
         * may start the next transaction: dot, MAIL, RCPT and DATA then
         * leave in one write. The next sp_conn_wait sends it either way. */
        sp_net_pump(c);
        if (c->hold || sp_session_gated(c->s))
            return 0;
        const sp_buf *o = sp_session_output(c->s);
        size_t n = sp_buf_pending(o);
        if (n == 0 || c->state != C_OPEN)
            return 0;
        if (c->sync_hook) {
            sp_error e;
            if (c->sync_hook(c->sync_ud, &e) < 0) { /* what it guards has not left: no ambiguity */
                sp_conn_abort(c, &e);
                return -1;
            }
        }
        ssize_t w;
        if (c->ssl) {
            ERR_clear_error();
            int r = SSL_write(c->ssl, sp_buf_head(o), (int)(n > 1 << 20 ? 1 << 20 : n));
            if (r <= 0) {
                int se = SSL_get_error(c->ssl, r);
                if (se == SSL_ERROR_WANT_WRITE || se == SSL_ERROR_WANT_READ)
                    return 0;
                tls_io_error(c, "TLS write", r);
                return -1;
            }
            w = r;
        } else {
            w = send(c->fd, sp_buf_head(o), n, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    return 0;
                int saved = errno;
                if (saved == EPIPE || saved == ECONNRESET)
                    drain_replies(c);
                transport_error(c, saved, "write");
                return -1;
            }
        }
        c->counters.writes++;
        c->counters.bytes_out += (unsigned long long)w;
        sp_session_activity(c->s, now);
        sp_session_consume(c->s, (size_t)w);
        sp_net_pump(c);
    }
}

static void do_read(sp_conn *c)
{
    char buf[READ_CHUNK];
    /* A few reads per wake-up keep one chatty peer from starving the rest. */
    for (int i = 0; i < 4 && c->state == C_OPEN; i++) {
        ssize_t r;
        if (c->ssl) {
            ERR_clear_error();
            int n = SSL_read(c->ssl, buf, sizeof buf);
            if (n <= 0) {
                int se = SSL_get_error(c->ssl, n);
                if (se == SSL_ERROR_WANT_READ || se == SSL_ERROR_WANT_WRITE)
                    return;
                if (se == SSL_ERROR_ZERO_RETURN || (se == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 && errno == 0)) {
                    r = 0; /* close_notify or a plain EOF */
                } else {
                    tls_io_error(c, "TLS read", n);
                    return;
                }
            } else {
                r = n;
            }
        } else {
            r = recv(c->fd, buf, sizeof buf, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    return;
                transport_error(c, errno, "read");
                return;
            }
        }
        if (r == 0) {
            sp_session_eof(c->s);
            sp_net_pump(c);
            close_fd(c);
            return;
        }
        c->counters.reads++;
        c->counters.bytes_in += (unsigned long long)r;
        /* Bytes read do not restart the clock: a reply is timed whole, so a
         * server dripping a byte a second cannot hold the connection. */
        sp_session_feed(c->s, buf, (size_t)r);
        sp_net_pump(c);
        if ((size_t)r < sizeof buf && !(c->ssl && SSL_pending(c->ssl) > 0))
            return;
    }
}

static void connect_done(sp_conn *c, double now)
{
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
        soerr = errno;
    if (soerr == 0 && c->proxy) { /* connect_timeout covers the tunnel too */
        c->state = C_PROXY;
        c->proxy_events = POLLOUT;
        return;
    }
    if (soerr == 0) {
        c->state = C_OPEN;
        c->last_activity = now;
        sp_session_activity(c->s, now);
        if (c->implicit)
            start_handshake(c, now);
        return;
    }
    sp_error_set(&c->connect_err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "connect to %s: %s", c->host,
                 strerror(soerr));
    close_fd(c);
    if (sp_net_try_connect(c) < 0) {
        sp_session_fail(c->s, &c->connect_err);
        sp_net_pump(c);
    }
}

/* The proxy's handshake moved on; once the tunnel is open the session
 * starts as on a direct connection. */
static void proxy_step(sp_conn *c, double now)
{
    sp_error e;
    int r = sp_proxy_step(c->proxy, c->fd, c->implicit ? NULL : c->s, &c->proxy_events, &e);
    if (r == 0)
        return;
    sp_proxy_free(c->proxy);
    c->proxy = NULL;
    if (r < 0) {
        sp_conn_abort(c, &e);
        return;
    }
    c->state = C_OPEN;
    c->last_activity = now;
    sp_session_activity(c->s, now);
    if (c->implicit)
        start_handshake(c, now);
    else
        sp_net_pump(c); /* the greeting may have come with the proxy's reply */
}

/* When the connection's current wait times out (0: no deadline). RFC 5321
 * 4.5.3.2 times each reply: the clock restarts when a command or data
 * block is written, when a reply completes and when the phase changes,
 * never on a partial read. */
static double deadline_of(sp_conn *c, double now)
{
    if (c->state == C_RESOLVING) { /* connect_timeout covers resolving and connecting */
        double d = c->last_activity + c->connect_timeout;
        double rt = sp_resolve_timeout(c->res); /* the resolver's own retransmit */
        if (rt >= 0 && now + rt < d)
            d = now + rt;
        return d;
    }
    if (c->state == C_CONNECTING || c->state == C_PROXY)
        return c->last_activity + c->connect_timeout;
    if (c->state == C_HANDSHAKE)
        return c->last_activity + sp_session_phase_timeout(c->s, SP_PHASE_STARTTLS);
    if (c->state != C_OPEN)
        return 0;
    return sp_session_deadline(c->s, now);
}

static void on_deadline(sp_conn *c, double now)
{
    if (c->state == C_RESOLVING) {
        if (now < c->last_activity + c->connect_timeout) { /* only the resolver's retransmit is due */
            sp_resolve_process(c->res, -1, 0);
            sp_net_resolve_step(c);
            return;
        }
        sp_error_set(&c->connect_err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "resolving %s timed out", c->host);
        c->state = C_CLOSED;
        sp_session_fail(c->s, &c->connect_err);
        sp_net_pump(c);
        return;
    }
    if (c->state == C_PROXY) {
        sp_error e;
        sp_error_set(&e, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "proxy %s: no tunnel within %gs", c->host,
                     c->connect_timeout);
        sp_conn_abort(c, &e);
        return;
    }
    if (c->state == C_CONNECTING) {
        sp_error_set(&c->connect_err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "connect to %s timed out", c->host);
        close_fd(c);
        if (sp_net_try_connect(c) < 0) {
            sp_session_fail(c->s, &c->connect_err);
            sp_net_pump(c);
        }
        return;
    }
    sp_session_timeout(c->s);
    sp_net_pump(c);
    close_fd(c);
}

void sp_conn_abort(sp_conn *c, const sp_error *err)
{
    if (err)
        sp_session_fail(c->s, err);
    sp_net_pump(c);
    close_fd(c);
}

int sp_conn_wait(sp_conn *const *conns, size_t n, double timeout)
{
    return sp_conn_wait_fds(conns, n, NULL, NULL, 0, NULL, timeout);
}

int sp_conn_wait_fds(sp_conn *const *conns, size_t n, const int *fds, const unsigned char *fd_write, size_t nfds,
                     unsigned char *fd_ready, double timeout)
{
    double start = sp_now();
    struct pollfd stackfds[64];
    /* a connection polls its socket, or while its name resolves, the
     * resolver's sockets (up to SP_RESOLVE_MAX_FDS) */
    size_t slots = n;
    for (size_t i = 0; i < n; i++)
        if (conns[i]->state == C_RESOLVING)
            slots += SP_RESOLVE_MAX_FDS - 1;
    size_t total = slots + nfds;
    struct pollfd *pfd = total <= 64 ? stackfds : malloc(total * sizeof *pfd);
    size_t *map = NULL;
    int result = -1;
    if (!pfd)
        return -1;
    for (size_t k = 0; k < nfds; k++)
        fd_ready[k] = 0;
    map = malloc((slots ? slots : 1) * sizeof *map);
    if (!map)
        goto out;
    for (size_t i = 0; i < n; i++)
        conns[i]->hold = 0; /* the caller has had its chance to pipeline behind a dot */
    for (;;) {
        double now = sp_now();
        int ready = 0;
        for (size_t i = 0; i < n; i++) {
            /* decrypted bytes OpenSSL holds do not wake poll: take them now */
            if (conns[i]->state == C_OPEN && conns[i]->ssl && SSL_pending(conns[i]->ssl) > 0)
                do_read(conns[i]);
            if (conns[i]->state == C_OPEN)
                flush_out(conns[i], now);
            if (sp_conn_has_events(conns[i]))
                ready++;
        }
        if (ready) {
            result = ready;
            goto out;
        }
        double wake = timeout >= 0 ? start + timeout : 0;
        nfds_t nf = 0;
        for (size_t i = 0; i < n; i++) {
            sp_conn *c = conns[i];
            if (c->state == C_CLOSED)
                continue;
            if (c->state == C_RESOLVING) {
                int got = sp_resolve_pollfds(c->res, &pfd[nf], SP_RESOLVE_MAX_FDS);
                for (int k = 0; k < got; k++)
                    map[nf++] = i;
            } else {
                short ev = POLLIN;
                if (c->state == C_HANDSHAKE)
                    ev = c->hs_events;
                else if (c->state == C_PROXY)
                    ev = c->proxy_events;
                else if (c->state == C_CONNECTING ||
                         (sp_buf_pending(sp_session_output(c->s)) && !sp_session_gated(c->s)))
                    ev = c->state == C_CONNECTING ? POLLOUT : (POLLIN | POLLOUT);
                pfd[nf].fd = c->fd;
                pfd[nf].events = ev;
                pfd[nf].revents = 0;
                map[nf++] = i;
            }
            double d = deadline_of(c, now);
            if (d > 0 && (wake == 0 || d < wake))
                wake = d;
        }
        nfds_t nconn = nf;
        for (size_t k = 0; k < nfds; k++) { /* the caller's own fds: ready wakes the wait */
            pfd[nf].fd = fds[k];
            pfd[nf].events = fd_write && fd_write[k] ? POLLOUT : POLLIN;
            pfd[nf].revents = 0;
            nf++;
        }
        if (nf == 0 && wake == 0) {
            result = 0; /* nothing can happen */
            goto out;
        }
        int ms = -1;
        if (wake > 0) {
            double left = wake - now;
            ms = left <= 0 ? 0 : (int)(left * 1000.0) + 1;
        }
        int pr = poll(pfd, nf, ms);
        if (pr < 0) {
            if (errno == EINTR) { /* a signal: let the caller look at it (SIGINT stops a campaign) */
                result = 0;
                goto out;
            }
            goto out;
        }
        now = sp_now();
        int extra = 0;
        for (size_t k = 0; k < nfds; k++)
            if (pfd[nconn + k].revents) {
                fd_ready[k] = 1;
                extra = 1;
            }
        for (nfds_t k = 0; k < nconn; k++) {
            sp_conn *c = conns[map[k]];
            short re = pfd[k].revents;
            if (re && c->state == C_RESOLVING) {
                sp_resolve_process(c->res, pfd[k].fd, re);
                sp_net_resolve_step(c); /* the answer came: connect (polled from the next turn) */
                continue;
            }
            if (!re || c->fd != pfd[k].fd)
                continue;
            if (c->state == C_CONNECTING) {
                connect_done(c, now);
                continue;
            }
            if (c->state == C_HANDSHAKE) {
                handshake_step(c, now);
                continue;
            }
            if (c->state == C_PROXY) {
                proxy_step(c, now);
                continue;
            }
            if (re & (POLLIN | POLLHUP | POLLERR))
                do_read(c);
            if (c->state == C_OPEN && (re & POLLOUT))
                flush_out(c, now);
        }
        for (size_t i = 0; i < n; i++) {
            double d = deadline_of(conns[i], now);
            if (d > 0 && now >= d)
                on_deadline(conns[i], now);
        }
        if (extra || (timeout >= 0 && now - start >= timeout)) {
            result = 0;
            for (size_t i = 0; i < n; i++)
                if (sp_conn_has_events(conns[i]))
                    result++;
            goto out;
        }
    }
out:
    free(map);
    if (pfd != stackfds)
        free(pfd);
    return result;
}
