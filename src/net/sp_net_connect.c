#include "sp_net_int.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int sp_net_try_connect(sp_conn *c)
{
    /* Walks the address list until a connect starts or succeeds. */
    while (c->next_addr < c->naddrs) {
        int i = c->next_addr++;
        const struct sockaddr *sa = (const struct sockaddr *)&c->addrs[i];
        int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
        if (fd < 0) {
            sp_error_set(&c->connect_err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "socket: %s", strerror(errno));
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fd, sa, c->addr_lens[i]) == 0 || errno == EINPROGRESS) {
            c->fd = fd;
            c->state = C_CONNECTING;
            c->last_activity = sp_now();
            return 0;
        }
        sp_error_set(&c->connect_err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "connect to %s: %s", c->host,
                     strerror(errno));
        close(fd);
    }
    return -1;
}

static void add_addr(sp_conn *c, const struct sockaddr *sa, socklen_t len)
{
    if (c->naddrs >= MAX_ADDRS || len > (socklen_t)sizeof c->addrs[0])
        return;
    memcpy(&c->addrs[c->naddrs], sa, len);
    c->addr_lens[c->naddrs++] = len;
}

/* The lookup's answer; may run inside ares_getaddrinfo, ares_process_fd or
 * ares_destroy, so it only records what came. */
static void on_resolved(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
    (void)timeouts;
    sp_conn *c = arg;
    c->resolved = 1;
    c->res_status = status;
    if (status == ARES_SUCCESS && res)
        for (struct ares_addrinfo_node *n = res->nodes; n; n = n->ai_next)
            add_addr(c, n->ai_addr, n->ai_addrlen);
    if (res)
        ares_freeaddrinfo(res);
}

/* A failed lookup as an error. A name the DNS says does not exist (or has
 * no address) is the configuration's (kind config: trying again cannot
 * help); a resolver that timed out or failed may answer next time. */
void sp_net_resolve_error(const sp_conn *c, sp_error *err)
{
    int st = c->res_status;
    int unknown = st == ARES_SUCCESS || st == ARES_ENOTFOUND || st == ARES_ENODATA || st == ARES_ENONAME;
    sp_error_set(err, unknown ? SP_KIND_CONFIG : SP_KIND_CONNECTION, SP_PHASE_CONNECT, "cannot resolve %s port %s: %s",
                 c->host, c->port, st == ARES_SUCCESS ? "no address" : ares_strerror(st));
}

/* After the resolver has had its chance: connect, or fail the session. */
void sp_net_resolve_step(sp_conn *c)
{
    if (!c->resolved)
        return;
    ares_destroy(c->resolver);
    c->resolver = NULL;
    if (c->res_status != ARES_SUCCESS || c->naddrs == 0) {
        sp_net_resolve_error(c, &c->connect_err);
    } else if (sp_net_try_connect(c) == 0) {
        return;
    }
    c->state = C_CLOSED;
    sp_session_fail(c->s, &c->connect_err);
    sp_net_pump(c);
}

/* Starts resolving: a numeric address at once, a name through c-ares (its
 * sockets join the loop's poll, so a slow resolver holds no other
 * connection). -1 with *err when the lookup cannot even start. */
int sp_net_start_resolve(sp_conn *c, const char *servers, sp_error *err)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    if (getaddrinfo(c->host, c->port, &hints, &res) == 0) {
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next)
            add_addr(c, ai->ai_addr, ai->ai_addrlen);
        freeaddrinfo(res);
        c->resolved = 1;
        c->res_status = ARES_SUCCESS;
        return 0;
    }
    struct ares_options ao;
    memset(&ao, 0, sizeof ao);
    int rc = ares_init_options(&c->resolver, &ao, 0);
    if (rc == ARES_SUCCESS && servers && *servers)
        rc = ares_set_servers_ports_csv(c->resolver, servers);
    if (rc != ARES_SUCCESS) {
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_CONNECT, "resolver: %s", ares_strerror(rc));
        return -1;
    }
    struct ares_addrinfo_hints ah;
    memset(&ah, 0, sizeof ah);
    ah.ai_family = AF_UNSPEC;
    ah.ai_socktype = SOCK_STREAM;
    ah.ai_protocol = IPPROTO_TCP;
    ah.ai_flags = ARES_AI_NUMERICSERV;
    c->state = C_RESOLVING;
    c->last_activity = sp_now();
    ares_getaddrinfo(c->resolver, c->host, c->port, &ah, on_resolved, c);
    return 0;
}

