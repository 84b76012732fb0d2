/* The native driver for Lua: connections, the one wait per wake, TLS
 * contexts, the clock. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sp_lua.h"

lconn *sp_l_check_conn(lua_State *L, int i)
{
    lconn *lc = luaL_checkudata(L, i, CONN_MT);
    if (!lc->c)
        luaL_argerror(L, i, "connection is freed");
    return lc;
}

/* core.tls_context{ca_file=, ca_path=, cert_file=, key_file=, insecure_skip_verify=} */
static int l_tls_context(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    sp_tls_opts o;
    memset(&o, 0, sizeof o);
    o.ca_file = sp_l_opt_string(L, 1, "ca_file");
    o.ca_path = sp_l_opt_string(L, 1, "ca_path");
    o.cert_file = sp_l_opt_string(L, 1, "cert_file");
    o.key_file = sp_l_opt_string(L, 1, "key_file");
    lua_getfield(L, 1, "insecure_skip_verify");
    o.insecure_skip_verify = lua_toboolean(L, -1);
    lua_pop(L, 1);
    ltls *lt = lua_newuserdata(L, sizeof *lt);
    lt->t = NULL;
    luaL_getmetatable(L, TLS_MT);
    lua_setmetatable(L, -2);
    sp_error e;
    lt->t = sp_tls_ctx_new(&o, &e);
    if (!lt->t)
        return sp_l_push_fail(L, &e);
    return 1;
}

static int tls_gc(lua_State *L)
{
    ltls *lt = luaL_checkudata(L, 1, TLS_MT);
    sp_tls_ctx_free(lt->t);
    lt->t = NULL;
    return 0;
}

static int tls_stats(lua_State *L)
{
    ltls *lt = luaL_checkudata(L, 1, TLS_MT);
    lua_createtable(L, 0, 2);
    sp_l_setint(L, "handshakes", lt->t ? (lua_Integer)sp_tls_handshakes(lt->t) : 0);
    sp_l_setint(L, "resumed", lt->t ? (lua_Integer)sp_tls_resumed(lt->t) : 0);
    return 1;
}

/* The connection's journal hooks: a final dot's L goes into the open
 * transaction, committed before the connection's next write (one commit
 * for all the dots of a loop turn, which leave together). */
static int conn_dot(void *ud, sp_error *err)
{
    lconn *lc = ud;
    return sp_l_mark_defer(&lc->mark, &lc->sync, err);
}

static int conn_sync(void *ud, sp_error *err)
{
    lconn *lc = ud;
    return sp_l_sync_run(&lc->sync, err);
}

/* core.connect{host=, port=, helo=, connect_timeout=, timeouts={phase=seconds},
 *              tls=ctx, tls_mode="none"|"implicit"|"starttls"|"opportunistic", server_name=, dns_servers=,
 *              bdat_window=, proxy_kind="socks5"|"http", proxy_host=, proxy_port=,
 *              proxy_user=, proxy_password=,
 *              auth={user=, secret=, mechanism=, allow_plaintext=}} */
static int l_connect(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    sp_conn_opts o;
    memset(&o, 0, sizeof o);
    int tls_idx = 0;
    char port[32];
    lua_getfield(L, 1, "host");
    o.host = luaL_checkstring(L, -1);
    lua_getfield(L, 1, "port");
    if (lua_type(L, -1) == LUA_TNUMBER)
        snprintf(port, sizeof port, "%d", (int)lua_tointeger(L, -1));
    else
        snprintf(port, sizeof port, "%s", luaL_optstring(L, -1, "25"));
    o.port = port;
    lua_getfield(L, 1, "helo");
    o.session.helo = luaL_optstring(L, -1, NULL);
    o.connect_timeout = sp_l_opt_number(L, 1, "connect_timeout", 0);
    sp_l_read_timeouts(L, 1, o.timeouts);
    const char *mode = sp_l_opt_string(L, 1, "tls_mode");
    if (mode && strcmp(mode, "none") != 0) {
        lua_getfield(L, 1, "tls");
        ltls *lt = luaL_testudata(L, -1, TLS_MT);
        if (!lt || !lt->t)
            return luaL_error(L, "option 'tls' must be a TLS context for tls_mode '%s'", mode);
        o.tls = lt->t;
        tls_idx = lua_gettop(L);
        if (strcmp(mode, "implicit") == 0)
            o.implicit_tls = 1;
        else if (strcmp(mode, "starttls") == 0)
            o.session.starttls = SP_STARTTLS_REQUIRED;
        else if (strcmp(mode, "opportunistic") == 0)
            o.session.starttls = SP_STARTTLS_OPPORTUNISTIC;
        else
            return luaL_error(L, "unknown tls_mode '%s'", mode);
    }
    o.server_name = sp_l_opt_string(L, 1, "server_name");
    o.dns_servers = sp_l_opt_string(L, 1, "dns_servers");
    const char *pk = sp_l_opt_string(L, 1, "proxy_kind");
    if (pk) {
        if (strcmp(pk, "socks5") == 0)
            o.proxy_kind = SP_PROXY_SOCKS5;
        else if (strcmp(pk, "http") == 0)
            o.proxy_kind = SP_PROXY_HTTP;
        else
            return luaL_error(L, "unknown proxy_kind '%s'", pk);
        o.proxy_host = sp_l_opt_string(L, 1, "proxy_host");
        o.proxy_port = sp_l_opt_string(L, 1, "proxy_port");
        if (!o.proxy_host || !o.proxy_port)
            return luaL_error(L, "a proxy needs proxy_host and proxy_port");
        o.proxy_user = sp_l_opt_string(L, 1, "proxy_user");
        o.proxy_password = sp_l_opt_string(L, 1, "proxy_password");
    }
    lua_getfield(L, 1, "auth_gate");
    o.session.auth_gate = lua_toboolean(L, -1);
    lua_pop(L, 1);
    o.session.bdat_window = (int)sp_l_opt_number(L, 1, "bdat_window", 0);
    if (sp_l_read_auth(L, 1, &o.session) < 0)
        return luaL_error(L, "auth needs 'user' and 'secret' strings and a known mechanism");
    lconn *lc = lua_newuserdata(L, sizeof *lc);
    lc->c = NULL;
    lc->body_ref = LUA_NOREF;
    lc->tls_ref = LUA_NOREF;
    lc->trace = 0;
    lc->mark.j = NULL;
    lc->mark.key = NULL;
    lc->mark.len = 0;
    lc->sync.j = NULL;
    lc->sync.gen = 0;
    if (tls_idx) {
        lua_pushvalue(L, tls_idx);
        lc->tls_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    luaL_getmetatable(L, CONN_MT);
    lua_setmetatable(L, -2);
    sp_error e;
    lc->c = sp_conn_new(&o, &e);
    if (!lc->c)
        return sp_l_push_fail(L, &e);
    lua_getfield(L, 1, "trace");
    lc->trace = lua_toboolean(L, -1);
    lua_pop(L, 1);
    sp_session_trace(sp_conn_session(lc->c), lc->trace);
    sp_conn_set_sync_hook(lc->c, conn_sync, lc);
    return 1;
}

static void release_body(lua_State *L, lconn *lc)
{
    luaL_unref(L, LUA_REGISTRYINDEX, lc->body_ref);
    lc->body_ref = LUA_NOREF;
}

/* conn:start(from, to, data, params[, journal, key[, last]]): with a
 * journal, key's L is committed to it just before the final dot leaves; with
 * last, QUIT leaves with the final dot. */
static int c_start(lua_State *L)
{
    lconn *lc = sp_l_check_conn(L, 1);
    sp_body_seg *segs = NULL;
    size_t nseg = 0;
    sp_conn_set_dot_hook(lc->c, NULL, NULL);
    sp_l_mark_take(L, &lc->mark, 6);
    int quit_after = lua_toboolean(L, 8);
    lua_settop(L, 5);
    int nret = sp_l_start_tx(L, sp_conn_session(lc->c), 2, quit_after, &segs, &nseg);
    if (lua_toboolean(L, -1) && nret == 1 && lc->mark.j)
        sp_conn_set_dot_hook(lc->c, conn_dot, lc);
    else
        sp_l_mark_clear(&lc->mark);
    if (lua_toboolean(L, -1) && nret == 1) {
        /* keep the strings the segments point into alive until TX_DONE */
        release_body(L, lc);
        lua_pushvalue(L, 4);
        lc->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        sp_body_src *src = sp_body_src_new(segs, nseg);
        if (!src)
            return luaL_error(L, "out of memory");
        sp_conn_set_body_src(lc->c, src);
    }
    return nret;
}

static int c_close(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, CONN_MT);
    sp_l_mark_clear(&lc->mark);
    sp_l_sync_clear(&lc->sync);
    if (lc->c) {
        sp_conn_free(lc->c);
        lc->c = NULL;
    }
    release_body(L, lc);
    /* the TLS context may go once no connection uses it */
    luaL_unref(L, LUA_REGISTRYINDEX, lc->tls_ref);
    lc->tls_ref = LUA_NOREF;
    return 0;
}

/* conn:abort(text): ends the connection now (no QUIT); a transaction in
 * flight fails with a connection error, or ambiguous when its final dot has
 * left. For the pool's per-message deadline. */
static int c_abort(lua_State *L)
{
    lconn *lc = sp_l_check_conn(L, 1);
    const char *text = luaL_checkstring(L, 2);
    sp_error e;
    sp_error_set(&e, SP_KIND_CONNECTION, sp_session_phase(sp_conn_session(lc->c)), "%s", text);
    sp_conn_abort(lc->c, &e);
    return 0;
}

static sp_event conn_next(void *ud) { return sp_conn_next_event(((lconn *)ud)->c); }

static void conn_tx_done(lua_State *L, void *ud)
{
    lconn *lc = ud;
    if (!sp_session_tx_open(sp_conn_session(lc->c))) /* a pipelined next transaction keeps its body */
        release_body(L, lc);
}

/* core.wait(conns, timeout): moves bytes until a connection has an event or
 * timeout seconds pass; returns {{conn = i, name, payload, name, payload...}...}
 * for the connections with events (payload: the tx table for "tx", the error
 * for "error", false otherwise). */
static int l_wait(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    double timeout = luaL_optnumber(L, 2, -1);
    size_t n = lua_rawlen(L, 1);
    sp_conn *stackc[64];
    sp_conn **cs = n <= 64 ? stackc : lua_newuserdata(L, n * sizeof *cs);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, 1, (int)i + 1);
        cs[i] = sp_l_check_conn(L, -1)->c;
        lua_pop(L, 1);
    }
    /* optional third argument: an array of fds whose readability also ends
     * the wait (a signing queue's eventfd), or whose writability, given as
     * -(fd + 1) (a Redis socket still connecting); the second result lists
     * the ready ones, keyed as they were given */
    lua_Integer given[8];
    int fds[8];
    unsigned char fd_write[8], fd_ready[8];
    size_t nfds = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        nfds = lua_rawlen(L, 3);
        luaL_argcheck(L, nfds <= 8, 3, "at most 8 fds");
        for (size_t i = 0; i < nfds; i++) {
            lua_rawgeti(L, 3, (int)i + 1);
            given[i] = luaL_checkinteger(L, -1);
            luaL_argcheck(L, given[i] >= -INT_MAX && given[i] <= INT_MAX, 3, "not a file descriptor");
            fd_write[i] = given[i] < 0;
            fds[i] = (int)(given[i] < 0 ? -given[i] - 1 : given[i]);
            lua_pop(L, 1);
        }
    }
    int r = sp_conn_wait_fds(cs, n, fds, fd_write, nfds, fd_ready, timeout);
    if (r < 0)
        return luaL_error(L, "poll failed");
    /* One crossing per wake: every connection with events, its events
     * drained, each with what the pool needs of it (the transaction's outcome,
     * the session's error), so no further call is needed to read them. */
    lua_createtable(L, r, 0);
    int k = 0;
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, 1, (int)i + 1);
        lconn *lc = sp_l_check_conn(L, -1);
        lua_pop(L, 1);
        if (sp_l_push_entry(L, sp_conn_session(cs[i]), lc->trace, (lua_Integer)i + 1, conn_next, lc, conn_tx_done))
            lua_rawseti(L, -2, ++k);
    }
    if (nfds == 0)
        return 1;
    lua_createtable(L, 0, 0);
    for (size_t i = 0; i < nfds; i++)
        if (fd_ready[i]) {
            lua_pushboolean(L, 1);
            lua_rawseti(L, -2, given[i]);
        }
    return 2;
}

/* SIGINT and SIGTERM, counted. A signal is process-wide, so this counter is
 * the binding's one piece of global state; the handler only counts, and the
 * poll it interrupts returns so the pool can look (core.signalled). */
static volatile sig_atomic_t signals_seen;

static void on_signal(int sig)
{
    (void)sig;
    if (signals_seen < 1000)
        signals_seen++;
}

/* core.catch_signals(): SIGINT and SIGTERM are counted instead of ending the
 * process (no SA_RESTART, so a wait in progress returns). */
static int l_catch_signals(lua_State *L)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signals_seen = 0;
    (void)L;
    return 0;
}

/* core.signalled(): how many SIGINT/SIGTERM arrived since catch_signals. */
static int l_signalled(lua_State *L)
{
    lua_pushinteger(L, signals_seen);
    return 1;
}

static int l_now(lua_State *L)
{
    lua_pushnumber(L, sp_now());
    return 1;
}

static int l_hostname(lua_State *L)
{
    char h[256];
    if (gethostname(h, sizeof h) < 0)
        return 0;
    h[sizeof h - 1] = '\0';
    lua_pushstring(L, h);
    return 1;
}

void sp_lua_open_conn(lua_State *L)
{
    static const luaL_Reg conn_methods[] = {{"start", c_start}, {"close", c_close}, {"abort", c_abort}, {NULL, NULL}};
    static const luaL_Reg tls_methods[] = {{"stats", tls_stats}, {NULL, NULL}};
    static const luaL_Reg funcs[] = {{"connect", l_connect}, {"wait", l_wait},         {"tls_context", l_tls_context},
                                     {"now", l_now},         {"hostname", l_hostname},
                                     {"catch_signals", l_catch_signals}, {"signalled", l_signalled},
                                     {NULL, NULL}};
    sp_l_new_type(L, CONN_MT, sp_l_session_common, conn_methods, c_close);
    sp_l_new_type(L, TLS_MT, NULL, tls_methods, tls_gc);
    luaL_setfuncs(L, funcs, 0);
    /* core.default_timeouts: phase name -> seconds (RFC 5321 4.5.3.2), for
     * drivers written in Lua, so there is one table of them */
    lua_createtable(L, 0, SP_PHASE_COUNT);
    for (int p = SP_PHASE_CONNECT; p < SP_PHASE_COUNT; p++) {
        lua_pushnumber(L, sp_default_timeout((sp_phase)p));
        lua_setfield(L, -2, sp_phase_name((sp_phase)p));
    }
    lua_setfield(L, -2, "default_timeouts");
}
