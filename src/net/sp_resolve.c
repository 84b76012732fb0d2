#include "sp_resolve.h"

#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ares.h>

_Static_assert(SP_RESOLVE_MAX_FDS == ARES_GETSOCK_MAXNUM, "SP_RESOLVE_MAX_FDS is c-ares's socket count");

struct sp_resolve {
    ares_channel ch; /* NULL once done (or for an address known at once) */
    int done;        /* the lookup's callback has run */
    int status;      /* its status */
    struct sockaddr_storage addrs[SP_RESOLVE_MAX_ADDRS];
    socklen_t lens[SP_RESOLVE_MAX_ADDRS];
    int n;
    char host[256];
    char port[16];
};

static void add_addr(sp_resolve *r, const struct sockaddr *sa, socklen_t len)
{
    if (r->n >= SP_RESOLVE_MAX_ADDRS || len > (socklen_t)sizeof r->addrs[0])
        return;
    memcpy(&r->addrs[r->n], sa, len);
    r->lens[r->n++] = len;
}

/* The lookup's answer; may run inside ares_getaddrinfo, ares_process_fd or
 * ares_destroy, so it only records what came. */
static void on_resolved(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
    (void)timeouts;
    sp_resolve *r = arg;
    r->done = 1;
    r->status = status;
    if (status == ARES_SUCCESS && res)
        for (struct ares_addrinfo_node *nd = res->nodes; nd; nd = nd->ai_next)
            add_addr(r, nd->ai_addr, nd->ai_addrlen);
    if (res)
        ares_freeaddrinfo(res);
}

/* The channel is of no more use once the answer is in. */
static void settle(sp_resolve *r)
{
    if (r->done && r->ch) {
        ares_destroy(r->ch);
        r->ch = NULL;
    }
}

sp_resolve *sp_resolve_new(const char *host, const char *port, const char *servers, sp_error *err)
{
    sp_resolve *r = calloc(1, sizeof *r);
    if (!r) {
        sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "out of memory");
        return NULL;
    }
    snprintf(r->host, sizeof r->host, "%s", host);
    snprintf(r->port, sizeof r->port, "%s", port);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    if (getaddrinfo(host, port, &hints, &res) == 0) {
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next)
            add_addr(r, ai->ai_addr, ai->ai_addrlen);
        freeaddrinfo(res);
        r->done = 1;
        r->status = ARES_SUCCESS;
        return r;
    }
    struct ares_options ao;
    memset(&ao, 0, sizeof ao);
    int rc = ares_init_options(&r->ch, &ao, 0);
    if (rc == ARES_SUCCESS && servers && *servers)
        rc = ares_set_servers_ports_csv(r->ch, servers);
    if (rc != ARES_SUCCESS) {
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_CONNECT, "resolver: %s", ares_strerror(rc));
        sp_resolve_free(r);
        return NULL;
    }
    struct ares_addrinfo_hints ah;
    memset(&ah, 0, sizeof ah);
    ah.ai_family = AF_UNSPEC;
    ah.ai_socktype = SOCK_STREAM;
    ah.ai_protocol = IPPROTO_TCP;
    ah.ai_flags = ARES_AI_NUMERICSERV;
    ares_getaddrinfo(r->ch, r->host, r->port, &ah, on_resolved, r);
    settle(r); /* a name in /etc/hosts is answered within the call */
    return r;
}

void sp_resolve_free(sp_resolve *r)
{
    if (!r)
        return;
    if (r->ch)
        ares_destroy(r->ch); /* the callback runs, recording a cancelled lookup */
    free(r);
}

int sp_resolve_done(const sp_resolve *r) { return r->done; }

int sp_resolve_pollfds(const sp_resolve *r, struct pollfd *out, int max)
{
    if (!r->ch)
        return 0;
    ares_socket_t socks[ARES_GETSOCK_MAXNUM];
    /* the bit masks by hand: c-ares's ARES_GETSOCK_WRITABLE shifts a signed
     * 1 into the sign bit for the 16th socket */
    unsigned bits = (unsigned)ares_getsock(r->ch, socks, ARES_GETSOCK_MAXNUM);
    int n = 0;
    for (unsigned k = 0; k < ARES_GETSOCK_MAXNUM && n < max; k++) {
        short ev = (short)(((bits & (1u << k)) ? POLLIN : 0) | ((bits & (1u << (k + ARES_GETSOCK_MAXNUM))) ? POLLOUT : 0));
        if (!ev)
            continue;
        out[n].fd = socks[k];
        out[n].events = ev;
        out[n].revents = 0;
        n++;
    }
    return n;
}

double sp_resolve_timeout(const sp_resolve *r)
{
    if (!r->ch)
        return -1;
    struct timeval tv, *tp = ares_timeout(r->ch, NULL, &tv);
    if (!tp)
        return -1;
    return (double)tp->tv_sec + (double)tp->tv_usec / 1e6;
}

void sp_resolve_process(sp_resolve *r, int fd, short revents)
{
    if (!r->ch)
        return;
    if (fd < 0 || !revents)
        ares_process_fd(r->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    else
        ares_process_fd(r->ch, (revents & (POLLIN | POLLHUP | POLLERR)) ? fd : ARES_SOCKET_BAD,
                        (revents & POLLOUT) ? fd : ARES_SOCKET_BAD);
    settle(r);
}

int sp_resolve_result(const sp_resolve *r, sp_error *err)
{
    if (r->done && r->status == ARES_SUCCESS && r->n > 0)
        return 0;
    int st = r->status;
    int unknown = st == ARES_SUCCESS || st == ARES_ENOTFOUND || st == ARES_ENODATA || st == ARES_ENONAME;
    sp_error_set(err, unknown ? SP_KIND_CONFIG : SP_KIND_CONNECTION, SP_PHASE_CONNECT, "cannot resolve %s port %s: %s",
                 r->host, r->port, st == ARES_SUCCESS ? "no address" : ares_strerror(st));
    return -1;
}

int sp_resolve_count(const sp_resolve *r) { return r->n; }

const struct sockaddr *sp_resolve_addr(const sp_resolve *r, int i, socklen_t *len)
{
    if (i < 0 || i >= r->n)
        return NULL;
    *len = r->lens[i];
    return (const struct sockaddr *)&r->addrs[i];
}
