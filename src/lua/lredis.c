/* Redis for shared limits: the RESP codec is hiredis's (its reader parses
 * bytes without doing I/O, as sp_reply does for SMTP, so both drivers can
 * use it), never a hand-written parser.
 *
 *   core.resp_reader()         a reader: r:feed(bytes), r:next() -> true, value | nil
 *   core.resp_command(...)     one command as RESP bytes (redisFormatCommandArgv)
 *   core.redis_connect(host, port, timeout[, tls[, async[, dns_servers]]]) -> client | nil, err
 *                              a small client for the native driver (async:
 *                              connected by c:step() on the caller's loop):
 *                              c:call(...) -> value | nil, err; c:close();
 *                              tls = {server_name =, ca_file =, ca_path =,
 *                              insecure_skip_verify =} speaks TLS (rediss://),
 *                              the certificate verified unless told by name
 *
 * Values: strings (bulk and status), integers, arrays as tables, a nil
 * reply as false, an error reply as {err = "text"}. */
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <fcntl.h>

#include <hiredis/hiredis.h>
#include <openssl/err.h>

#include "sp_lua.h"
#include "sp_net.h"
#include "sp_resolve.h"
#include "sp_tls.h"

#define RESP_MT "smtppool.resp_reader"
#define REDIS_MT "smtppool.redis"

static void push_reply(lua_State *L, const redisReply *r, int depth)
{
    luaL_checkstack(L, 4, "redis reply too deep");
    switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
        lua_pushlstring(L, r->str, r->len);
        break;
    case REDIS_REPLY_INTEGER:
        lua_pushinteger(L, (lua_Integer)r->integer);
        break;
    case REDIS_REPLY_ERROR:
        lua_createtable(L, 0, 1);
        lua_pushlstring(L, r->str, r->len);
        lua_setfield(L, -2, "err");
        break;
    case REDIS_REPLY_ARRAY:
        lua_createtable(L, (int)r->elements, 0);
        for (size_t i = 0; i < r->elements; i++) {
            if (depth > 32)
                lua_pushboolean(L, 0);
            else
                push_reply(L, r->element[i], depth + 1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        break;
    default: /* REDIS_REPLY_NIL */
        lua_pushboolean(L, 0);
        break;
    }
}

/* ---- the reader ---- */

typedef struct lresp {
    redisReader *r;
} lresp;

static int l_resp_reader(lua_State *L)
{
    lresp *lr = lua_newuserdata(L, sizeof *lr);
    lr->r = NULL;
    luaL_getmetatable(L, RESP_MT);
    lua_setmetatable(L, -2);
    if (!(lr->r = redisReaderCreate()))
        return luaL_error(L, "out of memory");
    return 1;
}

static lresp *check_resp(lua_State *L)
{
    lresp *lr = luaL_checkudata(L, 1, RESP_MT);
    if (!lr->r)
        luaL_argerror(L, 1, "reader is freed");
    return lr;
}

static int resp_feed(lua_State *L)
{
    lresp *lr = check_resp(L);
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    if (redisReaderFeed(lr->r, p, n) != REDIS_OK)
        return luaL_error(L, "redis reader: %s", lr->r->errstr);
    return 0;
}

/* Pushes the next complete reply: 1 with the value on the stack, 0 when
 * more bytes are needed, -1 with a message on a protocol error. */
static int next_reply(lua_State *L, redisReader *r)
{
    void *reply = NULL;
    if (redisReaderGetReply(r, &reply) != REDIS_OK) {
        lua_pushfstring(L, "malformed reply from redis: %s", r->errstr);
        return -1;
    }
    if (!reply)
        return 0;
    push_reply(L, reply, 0);
    freeReplyObject(reply);
    return 1;
}

/* r:next() -> true, value | nil (incomplete) | nil, err (malformed) */
static int resp_next(lua_State *L)
{
    lresp *lr = check_resp(L);
    int k = next_reply(L, lr->r);
    if (k == 0) {
        lua_pushnil(L);
        return 1;
    }
    if (k == 1)
        lua_pushboolean(L, 1);
    else
        lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
}

static int resp_gc(lua_State *L)
{
    lresp *lr = luaL_checkudata(L, 1, RESP_MT);
    if (lr->r)
        redisReaderFree(lr->r);
    lr->r = NULL;
    return 0;
}

/* Formats the arguments at from..top as one RESP command (a string). */
static int push_command(lua_State *L, int from)
{
    int argc = lua_gettop(L) - from + 1;
    luaL_argcheck(L, argc > 0 && argc < 4096, from, "a command and up to 4095 arguments");
    const char *argv[4096];
    size_t lens[4096];
    for (int i = 0; i < argc; i++)
        argv[i] = luaL_checklstring(L, from + i, &lens[i]); /* numbers become strings here */
    char *cmd = NULL;
    long long n = redisFormatCommandArgv(&cmd, argc, argv, lens);
    if (n < 0 || !cmd)
        return luaL_error(L, "out of memory");
    lua_pushlstring(L, cmd, (size_t)n);
    redisFreeCommand(cmd);
    return 1;
}

static int l_resp_command(lua_State *L) { return push_command(L, 1); }

/* ---- the blocking client ---- */

enum { R_RESOLVING = 1, R_CONNECTING, R_HANDSHAKE };

typedef struct lredis {
    int fd;
    redisReader *r;
    double timeout;
    sp_tls_ctx *tls; /* rediss://: its context and connection */
    SSL *ssl;
    short want;      /* what a TLS read or write that could not go on waits for */
    int connecting;  /* a connect under way: R_RESOLVING, R_CONNECTING, R_HANDSHAKE; 0 once made */
    sp_resolve *res; /* the host's addresses (while resolving, the lookup) */
    int next_addr;   /* the next of them to try */
    char why[128];   /* why the last address failed */
} lredis;

/* One write or read on the connection, plain or TLS: bytes moved; -1 with
 * errno EAGAIN (c->want says for what) or an I/O error; 0 on EOF (read). */
static ssize_t io_write(lredis *c, const char *p, size_t n)
{
    c->want = POLLOUT;
    if (!c->ssl)
        return send(c->fd, p, n, MSG_NOSIGNAL);
    size_t w = 0;
    ERR_clear_error();
    int r = SSL_write_ex(c->ssl, p, n, &w);
    if (r == 1)
        return (ssize_t)w;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        c->want = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        errno = EAGAIN;
    } else if (errno == 0 || errno == EAGAIN) {
        errno = EPROTO;
    }
    return -1;
}

static ssize_t io_read(lredis *c, char *buf, size_t n, int flags)
{
    c->want = POLLIN;
    if (!c->ssl)
        return recv(c->fd, buf, n, flags);
    size_t got = 0;
    ERR_clear_error();
    int r = SSL_read_ex(c->ssl, buf, n, &got);
    if (r == 1)
        return (ssize_t)got;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        c->want = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        errno = EAGAIN;
        return -1;
    }
    if (e == SSL_ERROR_ZERO_RETURN)
        return 0;
    if (errno == 0 || errno == EAGAIN)
        errno = ECONNRESET;
    return -1;
}

static int wait_fd(int fd, short ev, double timeout)
{
    struct pollfd p = {fd, ev, 0};
    int ms = timeout > 0 ? (int)(timeout * 1000) + 1 : -1;
    for (;;) {
        int r = poll(&p, 1, ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0)
            errno = ETIMEDOUT;
        return r;
    }
}

static int fail(lua_State *L, const char *what, const char *detail)
{
    lua_pushnil(L);
    lua_pushfstring(L, "redis %s: %s", what, detail);
    return 2;
}

static void redis_close(lredis *c);

/* Starts a connect to the next address: 1 connected at once, 0 under way
 * (c->fd set), -1 when no address is left (c->why says why the last failed). */
static int connect_next(lredis *c)
{
    socklen_t len;
    const struct sockaddr *sa;
    while ((sa = sp_resolve_addr(c->res, c->next_addr, &len)) != NULL) {
        c->next_addr++;
        c->fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (c->fd < 0) {
            snprintf(c->why, sizeof c->why, "%s", strerror(errno));
            continue;
        }
        if (connect(c->fd, sa, len) == 0)
            return 1;
        if (errno == EINPROGRESS)
            return 0;
        snprintf(c->why, sizeof c->why, "%s", strerror(errno));
        close(c->fd);
        c->fd = -1;
    }
    return -1;
}

/* The connect under way ended (the socket is writable): 1 connected, 0
 * failed (c->why says why; the socket closed). */
static int connect_done(lredis *c)
{
    int err = 0;
    socklen_t sl = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0)
        err = errno;
    if (!err)
        return 1;
    snprintf(c->why, sizeof c->why, "%s", strerror(err));
    close(c->fd);
    c->fd = -1;
    return 0;
}

/* rediss://: the TLS context and connection from the table at index 4 (no
 * I/O yet); 0, or the count of values pushed (nil, err, "tls": the CA file
 * or path given cannot be read) with the connection closed. */
static int tls_setup(lua_State *L, lredis *c, const char *host)
{
    sp_tls_opts o;
    memset(&o, 0, sizeof o);
    lua_getfield(L, 4, "ca_file");
    o.ca_file = lua_tostring(L, -1);
    lua_getfield(L, 4, "ca_path");
    o.ca_path = lua_tostring(L, -1);
    lua_getfield(L, 4, "insecure_skip_verify");
    o.insecure_skip_verify = lua_toboolean(L, -1);
    lua_getfield(L, 4, "server_name");
    const char *name = lua_isstring(L, -1) ? lua_tostring(L, -1) : host;
    sp_error e;
    c->tls = sp_tls_ctx_new(&o, &e);
    if (c->tls)
        c->ssl = sp_tls_new_ssl(c->tls, name, &e);
    lua_pop(L, 4);
    if (c->ssl)
        return 0;
    redis_close(c);
    lua_pushnil(L);
    lua_pushfstring(L, "redis connect: %s", e.text);
    lua_pushliteral(L, "tls");
    return 3;
}

/* One step of the TLS handshake on the connected socket: 1 done, 0 to be
 * continued when the socket is ready for c->want, -1 failed (e says why;
 * *refused: a TLS alert or a certificate that does not verify, which every
 * try would meet, not a cut or a timeout). */
static int tls_step(lredis *c, sp_error *e, int *refused)
{
    *refused = 0;
    if (SSL_get_fd(c->ssl) != c->fd) {
        if (sp_tls_set_fd(c->tls, c->ssl, c->fd) != 0) {
            sp_error_set(e, SP_KIND_TLS, SP_PHASE_CONNECT, "out of memory");
            return -1;
        }
    }
    ERR_clear_error();
    int r = SSL_connect(c->ssl);
    if (r == 1)
        return 1;
    int se = SSL_get_error(c->ssl, r);
    if (se == SSL_ERROR_WANT_READ || se == SSL_ERROR_WANT_WRITE) {
        c->want = se == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        return 0;
    }
    sp_tls_error(e, SP_PHASE_CONNECT, "TLS handshake", c->ssl, r);
    *refused = se == SSL_ERROR_SSL;
    return -1;
}

/* A connect that failed: the connection closed, nil, err[, "tls"] pushed
 * ("tls": a TLS alert or a certificate that does not verify, which every
 * try would meet). */
static int connect_failed(lua_State *L, lredis *c, const sp_error *e, int refused)
{
    redis_close(c);
    lua_pushnil(L);
    lua_pushfstring(L, "redis connect: %s", e->text);
    if (!refused)
        return 2;
    lua_pushliteral(L, "tls");
    return 3;
}

/* What a connect under way waits for: up to SP_RESOLVE_MAX_FDS sockets
 * written to p (their count returned), and in *rt the seconds until it must
 * be moved on without I/O (the resolver's retransmit; -1: none). */
static int connect_waits(const lredis *c, struct pollfd *p, double *rt)
{
    *rt = -1;
    if (c->connecting == R_RESOLVING) {
        *rt = sp_resolve_timeout(c->res);
        return sp_resolve_pollfds(c->res, p, SP_RESOLVE_MAX_FDS);
    }
    p[0].fd = c->fd;
    p[0].events = c->connecting == R_CONNECTING ? POLLOUT : c->want;
    p[0].revents = 0;
    return 1;
}

/* The TCP connect to the next address, once the name is resolved: 0, or -1
 * with *e when no address is left. */
static int connect_start(lredis *c, sp_error *e)
{
    int r = connect_next(c);
    if (r < 0) {
        sp_error_set(e, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "%s", c->why);
        return -1;
    }
    c->connecting = r == 1 ? (c->ssl ? R_HANDSHAKE : 0) : R_CONNECTING;
    return 0;
}

/* Moves a connect under way on as far as it goes without waiting (the
 * lookup, the TCP connect to each address in turn, the TLS handshake): 1
 * made, 0 to go on when what connect_waits gives is ready, -1 failed (*e
 * says why; *refused as tls_step's). */
static int connect_advance(lredis *c, sp_error *e, int *refused)
{
    *refused = 0;
    if (c->connecting == R_RESOLVING) {
        struct pollfd p[SP_RESOLVE_MAX_FDS];
        int n = sp_resolve_pollfds(c->res, p, SP_RESOLVE_MAX_FDS);
        if (n > 0 && poll(p, (nfds_t)n, 0) > 0) {
            for (int k = 0; k < n; k++)
                if (p[k].revents)
                    sp_resolve_process(c->res, p[k].fd, p[k].revents);
        } else {
            sp_resolve_process(c->res, -1, 0); /* its retransmit, when due */
        }
        if (!sp_resolve_done(c->res))
            return 0;
        if (sp_resolve_result(c->res, e) < 0 || connect_start(c, e) < 0)
            return -1;
    }
    while (c->connecting == R_CONNECTING) {
        struct pollfd p = {c->fd, POLLOUT, 0};
        if (poll(&p, 1, 0) == 0)
            return 0;
        if (connect_done(c))
            c->connecting = c->ssl ? R_HANDSHAKE : 0;
        else if (connect_start(c, e) < 0)
            return -1;
    }
    if (c->connecting == R_HANDSHAKE) {
        int r = tls_step(c, e, refused);
        if (r <= 0)
            return r;
        c->connecting = 0;
    }
    return 1;
}

/* core.redis_connect(host, port, timeout[, tls[, async[, dns_servers]]]).
 * The name is resolved with c-ares (an address or a name in /etc/hosts at
 * once; dns_servers "ip[:port],..." instead of /etc/resolv.conf's), then
 * each address tried, then the TLS handshake made, all within timeout.
 * With async the client comes back at once with all that under way, for a
 * loop that waits itself: c:step() moves it on. */
static int l_redis_connect(lua_State *L)
{
    const char *host = luaL_checkstring(L, 1);
    char port[16];
    snprintf(port, sizeof port, "%d", (int)luaL_checkinteger(L, 2));
    double timeout = luaL_optnumber(L, 3, 2);
    int async = lua_toboolean(L, 5);
    const char *servers = luaL_optstring(L, 6, NULL);
    lredis *c = lua_newuserdata(L, sizeof *c);
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->timeout = timeout;
    c->r = redisReaderCreate();
    luaL_getmetatable(L, REDIS_MT);
    lua_setmetatable(L, -2);
    if (!c->r)
        return luaL_error(L, "out of memory");
    sp_error e;
    c->res = sp_resolve_new(host, port, servers, &e);
    if (!c->res)
        return connect_failed(L, c, &e, 0);
    snprintf(c->why, sizeof c->why, "no address");
    int pushed;
    if (lua_istable(L, 4) && (pushed = tls_setup(L, c, host)) != 0)
        return pushed;
    c->connecting = R_RESOLVING;
    if (async)
        return 1; /* the client, on top */
    double deadline = sp_now() + timeout;
    int refused;
    for (;;) {
        int r = connect_advance(c, &e, &refused);
        if (r > 0)
            return 1;
        if (r < 0)
            return connect_failed(L, c, &e, refused);
        double left = deadline - sp_now(), rt;
        if (left <= 0) {
            sp_error_set(&e, c->connecting == R_HANDSHAKE ? SP_KIND_TLS : SP_KIND_CONNECTION, SP_PHASE_CONNECT,
                         c->connecting == R_RESOLVING ? "resolving %s timed out"
                         : c->connecting == R_HANDSHAKE ? "TLS handshake with %s timed out" : "connect to %s timed out",
                         host);
            return connect_failed(L, c, &e, 0);
        }
        struct pollfd p[SP_RESOLVE_MAX_FDS];
        int n = connect_waits(c, p, &rt);
        if (rt >= 0 && rt < left)
            left = rt;
        if (poll(p, (nfds_t)n, (int)(left * 1000) + 1) < 0 && errno != EINTR) {
            sp_error_set(&e, SP_KIND_CONNECTION, SP_PHASE_CONNECT, "poll: %s", strerror(errno));
            return connect_failed(L, c, &e, 0);
        }
    }
}

/* c:step() for a client made with async: true once connected (and its TLS
 * handshake done); false, fds, seconds to be called again when one of fds
 * is ready (an fd to read, or -(fd + 1) to write, as the native driver's
 * wait takes them) or after seconds (nil: no such limit); nil, err[, "tls"]
 * when it failed (the connection closed). The caller keeps the time. */
static int redis_step(lua_State *L)
{
    lredis *c = luaL_checkudata(L, 1, REDIS_MT);
    if (!c->r)
        return fail(L, "connect", "the connection is closed");
    sp_error e;
    int refused;
    int r = connect_advance(c, &e, &refused);
    if (r < 0)
        return connect_failed(L, c, &e, refused);
    if (r > 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    struct pollfd p[SP_RESOLVE_MAX_FDS];
    double rt;
    int n = connect_waits(c, p, &rt);
    lua_pushboolean(L, 0);
    lua_createtable(L, n, 0);
    for (int k = 0; k < n; k++) {
        lua_pushinteger(L, (p[k].events & POLLOUT) && !(p[k].events & POLLIN) ? -(p[k].fd + 1) : p[k].fd);
        lua_rawseti(L, -2, k + 1);
    }
    if (rt >= 0)
        lua_pushnumber(L, rt);
    else
        lua_pushnil(L);
    return 3;
}

static void redis_close(lredis *c)
{
    if (c->ssl)
        SSL_free(c->ssl);
    c->ssl = NULL;
    sp_tls_ctx_free(c->tls);
    c->tls = NULL;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->connecting = 0;
    if (c->r)
        redisReaderFree(c->r);
    c->r = NULL;
    sp_resolve_free(c->res);
    c->res = NULL;
}

/* Writes n bytes; -1 with errno on an I/O error or timeout. */
static int send_all(lredis *c, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = io_write(c, p, n);
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (wait_fd(c->fd, c->want, c->timeout) <= 0)
                return -1;
            continue;
        }
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Pushes the next reply: 1; 0 with errno set on an I/O error or timeout;
 * -1 with the message pushed when the reply is malformed. */
static int read_reply(lua_State *L, lredis *c)
{
    for (;;) {
        int k = next_reply(L, c->r);
        if (k != 0)
            return k;
        char buf[16384];
        ssize_t r = io_read(c, buf, sizeof buf, 0);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (wait_fd(c->fd, c->want, c->timeout) <= 0)
                return 0;
            continue;
        }
        if (r == 0)
            errno = ECONNRESET;
        if (r <= 0)
            return 0;
        if (redisReaderFeed(c->r, buf, (size_t)r) != REDIS_OK)
            return 0;
    }
}

static int io_failed(lua_State *L, lredis *c, const char *what)
{
    const char *why = strerror(errno);
    redis_close(c);
    return fail(L, what, why);
}

static int malformed(lua_State *L, lredis *c)
{
    redis_close(c);
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
}

/* Writes the command at 2..top: 0, or the pushed nil, err (what failed). */
static int send_command(lua_State *L, lredis *c, const char *what)
{
    if (c->fd < 0)
        return fail(L, what, "the connection is closed");
    if (c->connecting)
        return fail(L, what, "the connection is not made yet (c:step())");
    push_command(L, 2);
    size_t n;
    const char *p = lua_tolstring(L, -1, &n);
    if (send_all(c, p, n) < 0)
        return io_failed(L, c, what);
    lua_pop(L, 1);
    return 0;
}

/* c:call(cmd, args...) -> value | nil, err (the connection is closed on an
 * I/O error or timeout: make a new one). An error reply is a value. */
static int redis_call(lua_State *L)
{
    lredis *c = luaL_checkudata(L, 1, REDIS_MT);
    int r = send_command(L, c, "call");
    if (r)
        return r;
    int k = read_reply(L, c);
    if (k == 1)
        return 1;
    return k < 0 ? malformed(L, c) : io_failed(L, c, "call");
}

/* Pushes the commands of the list at index 2 ({cmd, args...}, ...) as
 * one string, concatenated in the protocol (they are short), and returns
 * their count. */
static lua_Integer push_commands(lua_State *L)
{
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer ncmd = (lua_Integer)lua_rawlen(L, 2);
    lua_pushliteral(L, "");
    for (lua_Integer i = 1; i <= ncmd; i++) {
        lua_rawgeti(L, 2, (int)i);
        if (!lua_istable(L, -1))
            return luaL_argerror(L, 2, "each command must be a table of strings");
        int nargs = (int)lua_rawlen(L, -1);
        int from = lua_gettop(L) + 1;
        luaL_checkstack(L, nargs + 2, "too many arguments");
        for (int k = 1; k <= nargs; k++)
            lua_rawgeti(L, from - 1, k);
        push_command(L, from);
        lua_replace(L, from - 1);
        lua_settop(L, from - 1);
        lua_concat(L, 2);
    }
    return ncmd;
}

/* c:pipeline({cmd, args...}, ...) -> {value, ...} | nil, err: the commands
 * leave in one write and their replies are read in order (one round trip);
 * an error reply is a value in its place. */
static int redis_pipeline(lua_State *L)
{
    lredis *c = luaL_checkudata(L, 1, REDIS_MT);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (c->fd < 0)
        return fail(L, "pipeline", "the connection is closed");
    if (c->connecting)
        return fail(L, "pipeline", "the connection is not made yet (c:step())");
    lua_Integer ncmd = push_commands(L);
    size_t n;
    const char *p = lua_tolstring(L, -1, &n);
    if (send_all(c, p, n) < 0)
        return io_failed(L, c, "pipeline");
    lua_createtable(L, (int)ncmd, 0);
    for (lua_Integer i = 1; i <= ncmd; i++) {
        int k = read_reply(L, c);
        if (k == 1) {
            lua_rawseti(L, -2, i);
            continue;
        }
        return k < 0 ? malformed(L, c) : io_failed(L, c, "pipeline");
    }
    return 1;
}

/* The non-blocking way, for a loop that waits on the descriptor itself:
 * c:fd() -> the socket (nil when closed); c:send(cmd, args...) -> true |
 * nil, err (a command is small: written whole, waiting at most the timeout
 * for room; c:send_many(cmds) writes several at once); c:recv() -> true,
 * value (a reply is complete) | nil (not yet: wait until the socket is
 * readable) | nil, err (closed, malformed). */
static int redis_fd(lua_State *L)
{
    lredis *c = luaL_checkudata(L, 1, REDIS_MT);
    if (c->fd < 0)
        return 0;
    lua_pushinteger(L, c->fd);
    return 1;
}

static int redis_send(lua_State *L)
{
    lredis *c = luaL_checkudata(L, 1, REDIS_MT);
    int r = send_command(L, c, "send");
    if (r)
        return r;
    lua_pushboolean(L, 1);
    return 1;
}

/* c:send_many({cmd, args...}, ...) -> true | nil, err: the commands leave
 * in one write; their replies are read later (c:recv()). */
static int redis_send_many(lua_State *L)
{
    lredis *c = luaL_checkudata(L, 1, REDIS_MT);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (c->fd < 0)
        return fail(L, "send", "the connection is closed");
    if (c->connecting)
        return fail(L, "send", "the connection is not made yet (c:step())");
    push_commands(L);
    size_t n;
    const char *p = lua_tolstring(L, -1, &n);
    if (send_all(c, p, n) < 0)
        return io_failed(L, c, "send");
    lua_pushboolean(L, 1);
    return 1;
}

static int redis_recv(lua_State *L)
{
    lredis *c = luaL_checkudata(L, 1, REDIS_MT);
    if (c->fd < 0)
        return fail(L, "recv", "the connection is closed");
    if (c->connecting)
        return fail(L, "recv", "the connection is not made yet (c:step())");
    for (;;) {
        int k = next_reply(L, c->r);
        if (k == 1) {
            lua_pushboolean(L, 1);
            lua_insert(L, -2);
            return 2;
        }
        if (k < 0)
            return malformed(L, c);
        char buf[16384];
        ssize_t r = io_read(c, buf, sizeof buf, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (r == 0)
            errno = ECONNRESET;
        if (r <= 0 || redisReaderFeed(c->r, buf, (size_t)r) != REDIS_OK)
            return io_failed(L, c, "recv");
    }
}

static int redis_gc(lua_State *L)
{
    redis_close(luaL_checkudata(L, 1, REDIS_MT));
    return 0;
}

void sp_lua_open_redis(lua_State *L)
{
    static const luaL_Reg resp_methods[] = {{"feed", resp_feed}, {"next", resp_next}, {NULL, NULL}};
    static const luaL_Reg redis_methods[] = {{"call", redis_call},     {"pipeline", redis_pipeline},
                                               {"fd", redis_fd},         {"send", redis_send},
                                               {"send_many", redis_send_many}, {"recv", redis_recv},
                                               {"step", redis_step},     {"close", redis_gc},
                                               {NULL, NULL}};
    static const luaL_Reg funcs[] = {{"resp_reader", l_resp_reader}, {"resp_command", l_resp_command},
                                     {"redis_connect", l_redis_connect}, {NULL, NULL}};
    sp_l_new_type(L, RESP_MT, NULL, resp_methods, resp_gc);
    sp_l_new_type(L, REDIS_MT, NULL, redis_methods, redis_gc);
    luaL_setfuncs(L, funcs, 0);
}
