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
    socklen_t len;
    const struct sockaddr *sa;
    while ((sa = sp_resolve_addr(c->res, c->next_addr, &len)) != NULL) {
        c->next_addr++;
        int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
        if (fd < 0) {
            sp_error_set(&c->connect_err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "socket: %s", strerror(errno));
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fd, sa, len) == 0 || errno == EINPROGRESS) {
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

/* After the resolver has had its chance: connect, or fail the session. */
void sp_net_resolve_step(sp_conn *c)
{
    if (!sp_resolve_done(c->res))
        return;
    if (sp_resolve_result(c->res, &c->connect_err) == 0 && sp_net_try_connect(c) == 0)
        return;
    c->state = C_CLOSED;
    sp_session_fail(c->s, &c->connect_err);
    sp_net_pump(c);
}
