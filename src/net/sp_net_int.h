/* The native driver's insides, shared by its files (sp_net.c: the
 * connection's life and I/O; sp_net_connect.c: resolving and connecting). */
#ifndef SP_NET_INT_H
#define SP_NET_INT_H

#include <netdb.h>
#include <sys/socket.h>

#include <openssl/ssl.h>

#include "sp_net.h"
#include "sp_resolve.h"

#define READ_CHUNK 16384

enum { C_RESOLVING, C_CONNECTING, C_PROXY, C_HANDSHAKE, C_OPEN, C_CLOSED };

struct sp_conn {
    int fd;
    int state;
    /* the host's addresses (while C_RESOLVING, the lookup the loop polls),
     * and the next of them to try */
    sp_resolve *res;
    int next_addr;
    char port[16];
    char host[256];
    double connect_timeout;
    double last_activity; /* when connect_timeout (or the TLS handshake's) started counting */
    sp_session *s;
    sp_body_src *body;
    sp_dot_hook dot_hook; /* for the transaction in flight; cleared when it ends */
    int hold; /* a final dot waits for the caller to pipeline the next transaction behind it */
    void *dot_ud;
    sp_dot_hook sync_hook; /* before any write (see sp_conn_set_sync_hook) */
    void *sync_ud;
    sp_conn_counters counters;
    sp_error connect_err;
    sp_tls_ctx *tls;
    SSL *ssl;
    int implicit;
    short hs_events; /* what the handshake waits for */
    sp_proxy *proxy;     /* the tunnel's handshake, until it is open */
    short proxy_events;  /* what it waits for */
    char server_name[256];
};

/* Connects to the next address that takes it: 0, or -1 with connect_err. */
int sp_net_try_connect(sp_conn *c);
/* After the resolver has had its chance: connect, or fail the session. */
void sp_net_resolve_step(sp_conn *c);
/* Acts on the session's new events: the ones the driver handles itself
 * (SP_EV_BODY, SP_EV_TLS) it takes out of the queue, the rest stay there for
 * sp_conn_next_event. */
void sp_net_pump(sp_conn *c);

#endif
