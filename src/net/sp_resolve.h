/* Resolving a host name without blocking: a numeric address (or a name in
 * /etc/hosts) is known at once, any other name is asked of the DNS through
 * c-ares, whose sockets the caller polls in its own loop (the SMTP
 * connections' poll, or a Lua loop waiting for a Redis connection). */
#ifndef SP_RESOLVE_H
#define SP_RESOLVE_H

#include <poll.h>
#include <sys/socket.h>

#include "sp_error.h"

/* Addresses kept from one answer (IPv4 and IPv6, in the resolver's order). */
#define SP_RESOLVE_MAX_ADDRS 16

/* The most sockets a lookup polls at once (c-ares's ARES_GETSOCK_MAXNUM). */
#define SP_RESOLVE_MAX_FDS 16

typedef struct sp_resolve sp_resolve;

/* Starts resolving host and port (TCP). servers: "ip[:port],..." to ask
 * instead of /etc/resolv.conf's, or NULL. NULL with *err (kind config)
 * when the lookup cannot even start. Free with sp_resolve_free (a lookup
 * under way is cancelled). */
sp_resolve *sp_resolve_new(const char *host, const char *port, const char *servers, sp_error *err);
void sp_resolve_free(sp_resolve *r);

/* 1 once the answer (or its failure) is in. */
int sp_resolve_done(const sp_resolve *r);

/* While not done: the resolver's sockets to poll, at most max of them
 * written to out (fd and events); returns how many. */
int sp_resolve_pollfds(const sp_resolve *r, struct pollfd *out, int max);

/* Seconds until the resolver must be called without I/O (its retransmit),
 * or -1 when it waits on nothing. */
double sp_resolve_timeout(const sp_resolve *r);

/* After a poll: fd had revents (fd -1: only time passed). */
void sp_resolve_process(sp_resolve *r, int fd, short revents);

/* When done: 0 with at least one address, or -1 with *err (kind config for
 * a name the DNS says does not exist or has no address: trying again cannot
 * help; kind connection for a resolver that failed or timed out). */
int sp_resolve_result(const sp_resolve *r, sp_error *err);

/* The answer's addresses: how many, and the i-th (its length in *len). */
int sp_resolve_count(const sp_resolve *r);
const struct sockaddr *sp_resolve_addr(const sp_resolve *r, int i, socklen_t *len);

#endif
