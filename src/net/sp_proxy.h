/* sp_proxy: the handshake that opens a tunnel through a proxy, sans-IO.
 *
 * SOCKS5 (RFC 1928, with RFC 1929 user/password) or HTTP CONNECT (RFC 9110
 * 9.3.6, with Basic credentials). The target is always sent as a name: the
 * proxy resolves it (socks5h semantics). The driver writes sp_proxy_out,
 * feeds what it reads, and once sp_proxy_feed says done the socket is a
 * plain stream to the target (bytes fed past the proxy's reply belong to
 * the target: *used says where they start). */
#ifndef SP_PROXY_H
#define SP_PROXY_H

#include <stddef.h>

#include "sp_error.h"
#include "sp_session.h"

typedef enum sp_proxy_kind { SP_PROXY_NONE = 0, SP_PROXY_SOCKS5, SP_PROXY_HTTP } sp_proxy_kind;

typedef struct sp_proxy sp_proxy;

/* NULL when out of memory or a field is too long for the protocol (SOCKS5:
 * 255 bytes a name, user or password), with *err set (kind config). */
sp_proxy *sp_proxy_new(sp_proxy_kind kind, const char *target_host, const char *target_port, const char *user,
                       const char *password, sp_error *err);
void sp_proxy_free(sp_proxy *p);
/* The bytes to write now (*n may be 0: waiting for the proxy). */
const char *sp_proxy_out(const sp_proxy *p, size_t *n);
void sp_proxy_sent(sp_proxy *p, size_t n);
/* Feeds bytes read: 1 when the tunnel is open (*used: bytes of buf that were
 * the proxy's), 0 when more is needed (all used), -1 with *err (a refused
 * tunnel is kind connection, refused credentials kind config). */
int sp_proxy_feed(sp_proxy *p, const char *buf, size_t n, size_t *used, sp_error *err);

/* Moves the handshake on over the non-blocking socket fd: writes what is
 * due, reads what came. 1 when the tunnel is open (bytes past the proxy's
 * reply fed to s; with s NULL, for implicit TLS, such bytes are an error),
 * 0 when it waits (*events: POLLIN or POLLOUT), -1 with *err. */
int sp_proxy_step(sp_proxy *p, int fd, sp_session *s, short *events, sp_error *err);

#endif
