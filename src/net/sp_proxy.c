#include "sp_proxy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>

#include "sp_codec.h"

enum { S_GREET, S_AUTH, S_CONNECT, S_HTTP, S_DONE };

#define IN_MAX 8192 /* an HTTP reply's header, or SOCKS5's longest reply */

struct sp_proxy {
    sp_proxy_kind kind;
    int state;
    char host[256], port[16], user[256], pass[256];
    int has_auth;
    char out[1024];
    size_t out_len, out_off;
    char in[IN_MAX];
    size_t in_len;
};

static void set_out(sp_proxy *p, const char *b, size_t n)
{
    memcpy(p->out, b, n);
    p->out_len = n;
    p->out_off = 0;
}

static void socks_connect_request(sp_proxy *p)
{
    char b[300];
    size_t hl = strlen(p->host), k = 0;
    unsigned port = (unsigned)atoi(p->port);
    b[k++] = 5;
    b[k++] = 1; /* CONNECT */
    b[k++] = 0;
    b[k++] = 3; /* a domain name (an address literal is one too: the proxy parses it) */
    b[k++] = (char)hl;
    memcpy(b + k, p->host, hl);
    k += hl;
    b[k++] = (char)(port >> 8);
    b[k++] = (char)(port & 0xff);
    set_out(p, b, k);
    p->state = S_CONNECT;
}

sp_proxy *sp_proxy_new(sp_proxy_kind kind, const char *host, const char *port, const char *user,
                       const char *password, sp_error *err)
{
    sp_error_clear(err);
    size_t hl = strlen(host), ul = user ? strlen(user) : 0, pl = password ? strlen(password) : 0;
    if (hl == 0 || hl > 255 || strlen(port) >= 16 || ul > 255 || pl > 255) {
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_CONNECT, "proxy: a name, user or password too long (255 at most)");
        return NULL;
    }
    sp_proxy *p = calloc(1, sizeof *p);
    if (!p) {
        sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "out of memory");
        return NULL;
    }
    p->kind = kind;
    memcpy(p->host, host, hl + 1);
    snprintf(p->port, sizeof p->port, "%s", port);
    p->has_auth = user != NULL;
    if (user)
        memcpy(p->user, user, ul + 1);
    if (password)
        memcpy(p->pass, password, pl + 1);
    if (kind == SP_PROXY_SOCKS5) {
        /* methods: no authentication, or user/password (only when given) */
        const char greet_plain[] = {5, 1, 0}, greet_auth[] = {5, 2, 0, 2};
        if (p->has_auth)
            set_out(p, greet_auth, sizeof greet_auth);
        else
            set_out(p, greet_plain, sizeof greet_plain);
        p->state = S_GREET;
    } else {
        char cred[520], b64[700] = "";
        if (p->has_auth) {
            int n = snprintf(cred, sizeof cred, "%s:%s", p->user, p->pass);
            sp_base64_encode((const unsigned char *)cred, (size_t)n, b64);
            b64[sp_base64_encoded_len((size_t)n)] = 0;
            memset(cred, 0, sizeof cred);
        }
        int n = snprintf(p->out, sizeof p->out, "CONNECT %s:%s HTTP/1.1\r\nHost: %s:%s\r\n%s%s%s\r\n", host, p->port,
                         host, p->port, b64[0] ? "Proxy-Authorization: Basic " : "", b64, b64[0] ? "\r\n" : "");
        memset(b64, 0, sizeof b64);
        p->out_len = (size_t)n;
        p->state = S_HTTP;
    }
    return p;
}

void sp_proxy_free(sp_proxy *p)
{
    if (!p)
        return;
    /* the credentials (and the request that may carry them) wiped */
    memset(p, 0, sizeof *p);
    free(p);
}

const char *sp_proxy_out(const sp_proxy *p, size_t *n)
{
    *n = p->out_len - p->out_off;
    return p->out + p->out_off;
}

void sp_proxy_sent(sp_proxy *p, size_t n)
{
    p->out_off += n;
    if (p->out_off > p->out_len)
        p->out_off = p->out_len;
}

static const char *socks_reply_text(int rep)
{
    switch (rep) {
    case 1: return "general failure";
    case 2: return "not allowed by the proxy's rules";
    case 3: return "network unreachable";
    case 4: return "host unreachable";
    case 5: return "connection refused";
    case 6: return "TTL expired";
    case 7: return "command not supported";
    case 8: return "address type not supported";
    default: return "unknown reply";
    }
}

/* SOCKS5: how many bytes the reply awaited in this state takes, given the
 * bytes in so far (0: not known yet). */
static size_t socks_need(const sp_proxy *p)
{
    if (p->state != S_CONNECT)
        return 2;
    if (p->in_len < 5)
        return 5;
    switch ((unsigned char)p->in[3]) {
    case 1: return 4 + 4 + 2;
    case 4: return 4 + 16 + 2;
    case 3: return 4 + 1 + (unsigned char)p->in[4] + 2;
    default: return 0;
    }
}

static int socks_step(sp_proxy *p, sp_error *err)
{
    const unsigned char *in = (const unsigned char *)p->in;
    if (p->state == S_GREET) {
        if (in[0] != 5) {
            sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "proxy: not a SOCKS5 proxy");
            return -1;
        }
        if (in[1] == 2 && p->has_auth) {
            char b[520];
            size_t ul = strlen(p->user), pl = strlen(p->pass), k = 0;
            b[k++] = 1;
            b[k++] = (char)ul;
            memcpy(b + k, p->user, ul);
            k += ul;
            b[k++] = (char)pl;
            memcpy(b + k, p->pass, pl);
            k += pl;
            set_out(p, b, k);
            memset(b, 0, sizeof b);
            p->state = S_AUTH;
            return 0;
        }
        if (in[1] == 0) {
            socks_connect_request(p);
            return 0;
        }
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_CONNECT, "proxy: the SOCKS5 proxy accepts none of our methods (%s)",
                     p->has_auth ? "user/password" : "no credentials: does it want a user and password?");
        return -1;
    }
    if (p->state == S_AUTH) {
        if (in[1] != 0) {
            sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_CONNECT, "proxy: the SOCKS5 proxy refused the user and password");
            return -1;
        }
        socks_connect_request(p);
        return 0;
    }
    if (in[0] != 5 || in[1] != 0) {
        sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "proxy: the SOCKS5 proxy could not reach %s port %s: %s",
                     p->host, p->port, in[0] != 5 ? "not a SOCKS5 reply" : socks_reply_text(in[1]));
        return -1;
    }
    p->state = S_DONE;
    return 1;
}

static int http_step(sp_proxy *p, sp_error *err)
{
    int major, minor, code;
    if (sscanf(p->in, "HTTP/%d.%d %d", &major, &minor, &code) != 3) {
        sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "proxy: not an HTTP reply to CONNECT");
        return -1;
    }
    if (code / 100 == 2) {
        p->state = S_DONE;
        return 1;
    }
    const char *eol = strstr(p->in, "\r\n");
    int len = eol ? (int)(eol - p->in) : 0;
    sp_error_set(err, code == 407 ? SP_KIND_CONFIG : SP_KIND_CONNECTION, SP_PHASE_CONNECT,
                 "proxy: CONNECT %s:%s refused: %.*s%s", p->host, p->port, len > 200 ? 200 : len, p->in,
                 code == 407 ? (p->has_auth ? " (the credentials were refused)" : " (give user:password in the URL)")
                             : "");
    return -1;
}

int sp_proxy_feed(sp_proxy *p, const char *buf, size_t n, size_t *used, sp_error *err)
{
    *used = 0;
    while (*used < n && p->state != S_DONE) {
        if (p->out_off < p->out_len) { /* the proxy answered before our request left */
            sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "proxy: a reply before the request");
            return -1;
        }
        if (p->kind == SP_PROXY_SOCKS5) {
            size_t need = socks_need(p);
            if (need == 0) {
                sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "proxy: a malformed SOCKS5 reply");
                return -1;
            }
            while (p->in_len < need && *used < n) /* exactly the reply: what follows is the target's */
                p->in[p->in_len++] = buf[(*used)++];
            if (p->state == S_CONNECT && p->in_len >= 2 && (p->in[0] != 5 || p->in[1] != 0))
                return socks_step(p, err); /* refused: the address that follows does not matter */
            if (p->in_len < need || (p->state == S_CONNECT && p->in_len == 5 && socks_need(p) > 5))
                continue;
            int r = socks_step(p, err);
            p->in_len = 0;
            if (r != 0)
                return r;
        } else {
            /* byte by byte up to the blank line: what follows is the target's */
            if (p->in_len >= IN_MAX - 1) {
                sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "proxy: the CONNECT reply is too long");
                return -1;
            }
            p->in[p->in_len++] = buf[(*used)++];
            p->in[p->in_len] = 0;
            if (p->in_len >= 4 && !memcmp(p->in + p->in_len - 4, "\r\n\r\n", 4))
                return http_step(p, err);
        }
    }
    return p->state == S_DONE ? 1 : 0;
}

int sp_proxy_step(sp_proxy *p, int fd, sp_session *s, short *events, sp_error *err)
{
    size_t n;
    const char *out = sp_proxy_out(p, &n);
    while (n > 0) {
        ssize_t w = send(fd, out, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            *events = POLLOUT;
            return 0;
        }
        if (w < 0) {
            sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "proxy: write: %s", strerror(errno));
            return -1;
        }
        sp_proxy_sent(p, (size_t)w);
        out = sp_proxy_out(p, &n);
    }
    for (;;) {
        char buf[IN_MAX];
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            *events = POLLIN;
            return 0;
        }
        if (r <= 0) {
            sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "proxy: %s before the tunnel was open",
                         r == 0 ? "the proxy closed the connection" : strerror(errno));
            return -1;
        }
        size_t used = 0;
        int st = sp_proxy_feed(p, buf, (size_t)r, &used, err);
        if (st < 0)
            return -1;
        if (st == 1) {
            if (used < (size_t)r) { /* the target spoke at once (an SMTP greeting) */
                if (!s) {
                    sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_CONNECT,
                                 "proxy: the target sent bytes before the TLS handshake");
                    return -1;
                }
                sp_session_feed(s, buf + used, (size_t)r - used);
            }
            return 1;
        }
        out = sp_proxy_out(p, &n);
        if (n > 0) /* the next request of the handshake (SOCKS5 credentials, CONNECT) */
            return sp_proxy_step(p, fd, s, events, err);
    }
}
