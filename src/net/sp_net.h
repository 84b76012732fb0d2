/* sp_net: the native driver. Non-blocking sockets, one poll loop over any
 * number of connections, each carrying one sp_session.
 *
 * The driver reads the clock (CLOCK_MONOTONIC) and arms the timeouts whose
 * rule is the session's (sp_session_deadline, RFC 5321 4.5.3.2), telling it
 * when bytes leave (sp_session_activity). It feeds message bodies from memory through the
 * session's dot-stuffer in bounded chunks. */
#ifndef SP_NET_H
#define SP_NET_H

#include <stddef.h>

#include "sp_body.h"
#include "sp_pump.h"
#include "sp_error.h"
#include "sp_session.h"
#include "sp_proxy.h"
#include "sp_tls.h"

typedef struct sp_conn_opts {
    const char *host;
    const char *port;
    double connect_timeout;             /* seconds; 0 means 30 */
    double timeouts[SP_PHASE_COUNT];    /* seconds per phase; 0 means the RFC 5321 default */
    sp_session_opts session;
    sp_tls_ctx *tls;         /* needed for implicit TLS and STARTTLS; borrowed, must outlive the conn */
    int implicit_tls;        /* handshake right after connect (port 465) */
    const char *server_name; /* SNI and certificate name; NULL: host */
    const char *dns_servers; /* "ip[:port],..." for the resolver; NULL: /etc/resolv.conf */
    /* a tunnel through a proxy (sp_proxy.h): host and port are then the
     * target the proxy connects to, proxy_host and proxy_port what is resolved
     * and connected to; user and password optional */
    sp_proxy_kind proxy_kind;
    const char *proxy_host, *proxy_port, *proxy_user, *proxy_password;
} sp_conn_opts;

typedef struct sp_conn sp_conn;

/* Monotonic seconds. */
double sp_now(void);

/* Starts a connection: a numeric host, or a name found in /etc/hosts, is
 * connected to at once (non-blocking); any other name is resolved with
 * c-ares (IPv4 and IPv6), its sockets polled by sp_conn_wait beside the
 * connections', and connect_timeout covers the lookup and the connect. A
 * name that does not resolve fails the session in phase connect. NULL
 * with *err set when nothing can be tried. */
sp_conn *sp_conn_new(const sp_conn_opts *o, sp_error *err);
/* Closes the socket at once (no QUIT) and frees everything. */
void sp_conn_free(sp_conn *c);
/* Closes the socket at once; the session is failed with err if still alive. */
void sp_conn_abort(sp_conn *c, const sp_error *err);

sp_session *sp_conn_session(sp_conn *c);
int sp_conn_is_open(const sp_conn *c);

/* The body of the transaction just started, as a source (segments in
 * memory, which must stay valid until SP_EV_TX_DONE, and files streamed);
 * the connection owns and frees it. */
void sp_conn_set_body_src(sp_conn *c, sp_body_src *src);

/* The dot hook (sp_pump.h) for the transaction just started. */
void sp_conn_set_dot_hook(sp_conn *c, sp_dot_hook fn, void *ud);

/* Called before each write of the connection's output (and so before a
 * final dot that the dot hook let pass is sent): a campaign's journal
 * commits there the L records its dot hooks wrote, one commit for every
 * connection's dots of a loop turn. -1 with *err set ends the connection
 * before anything more leaves. */
void sp_conn_set_sync_hook(sp_conn *c, sp_dot_hook fn, void *ud);

/* Events the driver passes on (SP_EV_BODY is handled inside). */
sp_event sp_conn_next_event(sp_conn *c);
int sp_conn_has_events(const sp_conn *c);

/* Counters for tests and stats. */
typedef struct sp_conn_counters {
    unsigned long writes;      /* successful write calls */
    unsigned long reads;       /* successful read calls */
    unsigned long long bytes_out, bytes_in;
} sp_conn_counters;
const sp_conn_counters *sp_conn_counters_get(const sp_conn *c);

/* Moves bytes on every connection until at least one has an event or
 * timeout seconds pass (timeout < 0: no limit besides the connections' own
 * timeouts). Returns the number of connections with events, 0 on timeout,
 * -1 when poll itself fails (errno). */
int sp_conn_wait(sp_conn *const *conns, size_t n, double timeout);
/* The same, also waking when one of the caller's fds (an eventfd, a
 * socket still connecting) becomes ready: readable, or writable where
 * fd_write[k] is set (fd_write may be NULL: all readable). fd_ready[k] is
 * set to 1 for each ready fd (0 otherwise). */
int sp_conn_wait_fds(sp_conn *const *conns, size_t n, const int *fds, const unsigned char *fd_write, size_t nfds,
                     unsigned char *fd_ready, double timeout);

#endif
