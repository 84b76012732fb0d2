/* smtppool.core: the Lua binding of the protocol machine and native driver.
 * Builds against Lua 5.4 and against LuaJIT / the Lua 5.1 C API. */
#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "sp_codec.h"
#include "sp_dkim.h"
#include "sp_mime.h"
#include "sp_net.h"
#include "sp_session.h"

#if LUA_VERSION_NUM < 502
#define lua_rawlen lua_objlen
#ifndef luaL_newlib /* plain Lua 5.1; LuaJIT 2.1 has these three */
static void luaL_setfuncs(lua_State *L, const luaL_Reg *l, int nup)
{
    (void)nup;
    for (; l->name; l++) {
        lua_pushcfunction(L, l->func);
        lua_setfield(L, -2, l->name);
    }
}
#define luaL_newlib(L, l) (lua_newtable(L), luaL_setfuncs(L, l, 0))
static void *luaL_testudata(lua_State *L, int i, const char *tname)
{
    void *p = lua_touserdata(L, i);
    if (p && lua_getmetatable(L, i)) {
        luaL_getmetatable(L, tname);
        int eq = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
        return eq ? p : NULL;
    }
    return NULL;
}
#endif
#endif

#define CONN_MT "smtppool.conn"
#define SESSION_MT "smtppool.session"
#define ERROR_MT "smtppool.error"
#define TLS_MT "smtppool.tls"
#define DKIM_MT "smtppool.dkim_key"
#define JOURNAL_MT "smtppool.journal"

typedef struct lconn {
    sp_conn *c;
    int body_ref; /* registry reference keeping the body string alive */
    int tls_ref;  /* registry reference keeping the TLS context alive */
    int trace;    /* state changes are reported with the events */
} lconn;

typedef struct ltls {
    sp_tls_ctx *t;
} ltls;

typedef struct lsession {
    sp_session *s;
} lsession;

/* ---- error values ---- */

static void push_error(lua_State *L, const sp_error *e)
{
    lua_createtable(L, 0, 5);
    lua_pushstring(L, sp_kind_name(e->kind));
    lua_setfield(L, -2, "kind");
    if (e->phase != SP_PHASE_NONE) {
        lua_pushstring(L, sp_phase_name(e->phase));
        lua_setfield(L, -2, "phase");
    }
    if (e->code) {
        lua_pushinteger(L, e->code);
        lua_setfield(L, -2, "code");
    }
    if (e->enhanced[0]) {
        lua_pushstring(L, e->enhanced);
        lua_setfield(L, -2, "enhanced");
    }
    lua_pushstring(L, e->text);
    lua_setfield(L, -2, "text");
    luaL_getmetatable(L, ERROR_MT);
    lua_setmetatable(L, -2);
}

static int error_tostring(lua_State *L)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    lua_getfield(L, 1, "kind");
    luaL_addstring(&b, lua_isstring(L, -1) ? lua_tostring(L, -1) : "unknown");
    lua_pop(L, 1);
    luaL_addstring(&b, " error");
    lua_getfield(L, 1, "phase");
    if (lua_isstring(L, -1)) {
        luaL_addstring(&b, " in ");
        luaL_addstring(&b, lua_tostring(L, -1));
    }
    lua_pop(L, 1);
    luaL_addstring(&b, ":");
    lua_getfield(L, 1, "code");
    if (lua_isnumber(L, -1)) {
        luaL_addchar(&b, ' ');
        luaL_addstring(&b, lua_tostring(L, -1));
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "enhanced");
    if (lua_isstring(L, -1)) {
        luaL_addchar(&b, ' ');
        luaL_addstring(&b, lua_tostring(L, -1));
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "text");
    if (lua_isstring(L, -1)) {
        luaL_addchar(&b, ' ');
        luaL_addstring(&b, lua_tostring(L, -1));
    }
    lua_pop(L, 1);
    luaL_pushresult(&b);
    return 1;
}

/* Pushes a buffer's bytes as a string and frees the buffer. */
static int push_buf(lua_State *L, sp_buf *b)
{
    lua_pushlstring(L, sp_buf_head(b), sp_buf_pending(b));
    sp_buf_free(b);
    return 1;
}

static int push_fail(lua_State *L, const sp_error *e)
{
    lua_pushnil(L);
    push_error(L, e);
    return 2;
}

/* ---- shared session accessors ---- */

static sp_session *check_session(lua_State *L, int i)
{
    lconn *lc = luaL_testudata(L, i, CONN_MT);
    if (lc) {
        if (!lc->c)
            luaL_argerror(L, i, "connection is freed");
        return sp_conn_session(lc->c);
    }
    lsession *ls = luaL_testudata(L, i, SESSION_MT);
    if (ls && ls->s)
        return ls->s;
    luaL_argerror(L, i, "smtppool connection or session expected");
    return NULL;
}

static void setint(lua_State *L, const char *k, lua_Integer v)
{
    lua_pushinteger(L, v);
    lua_setfield(L, -2, k);
}

static void setstr(lua_State *L, const char *k, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void setbool(lua_State *L, const char *k, int v)
{
    lua_pushboolean(L, v);
    lua_setfield(L, -2, k);
}

static int s_state(lua_State *L)
{
    lua_pushstring(L, sp_state_name(sp_session_state(check_session(L, 1))));
    return 1;
}

static int s_phase(lua_State *L)
{
    sp_phase p = sp_session_phase(check_session(L, 1));
    if (p == SP_PHASE_NONE)
        lua_pushnil(L);
    else
        lua_pushstring(L, sp_phase_name(p));
    return 1;
}

static int s_caps(lua_State *L)
{
    sp_session *s = check_session(L, 1);
    const sp_caps *c = sp_session_caps(s);
    static const struct {
        unsigned f;
        const char *n;
    } fl[] = {{SP_CAP_SIZE, "size"},
              {SP_CAP_PIPELINING, "pipelining"},
              {SP_CAP_8BITMIME, "8bitmime"},
              {SP_CAP_SMTPUTF8, "smtputf8"},
              {SP_CAP_STARTTLS, "starttls"},
              {SP_CAP_AUTH, "auth"},
              {SP_CAP_ENHANCEDSTATUSCODES, "enhancedstatuscodes"},
              {SP_CAP_DSN, "dsn"},
              {SP_CAP_CHUNKING, "chunking"},
              {SP_CAP_LIMITS, "limits"},
              {SP_CAP_BINARYMIME, "binarymime"}};
    lua_newtable(L);
    setbool(L, "esmtp", c->esmtp);
    for (size_t i = 0; i < sizeof fl / sizeof fl[0]; i++)
        if (c->flags & fl[i].f)
            setbool(L, fl[i].n, 1);
    if (c->size_max)
        setint(L, "size_max", (lua_Integer)c->size_max);
    if (c->flags & SP_CAP_AUTH) {
        lua_newtable(L);
        if (c->auth & SP_AUTH_PLAIN)
            setbool(L, "PLAIN", 1);
        if (c->auth & SP_AUTH_LOGIN)
            setbool(L, "LOGIN", 1);
        if (c->auth & SP_AUTH_CRAM_MD5)
            setbool(L, "CRAM-MD5", 1);
        if (c->auth & SP_AUTH_XOAUTH2)
            setbool(L, "XOAUTH2", 1);
        lua_setfield(L, -2, "auth_mechs");
    }
    if (c->mailmax)
        setint(L, "mailmax", c->mailmax);
    if (c->rcptmax)
        setint(L, "rcptmax", c->rcptmax);
    if (c->rcptdomainmax)
        setint(L, "rcptdomainmax", c->rcptdomainmax);
    return 1;
}

/* Pushes a transaction's outcome as a table. */
static void push_tx(lua_State *L, const sp_tx *t)
{
    lua_createtable(L, 0, 8);
    setbool(L, "ok", t->ok);
    setbool(L, "done", t->done);
    setint(L, "accepted", (lua_Integer)t->accepted);
    if (t->final.code) {
        setint(L, "code", t->final.code);
        if (t->final.enhanced[0])
            setstr(L, "enhanced", t->final.enhanced);
        setstr(L, "text", t->final.text ? t->final.text : "");
    }
    lua_createtable(L, (int)t->nrcpt, 0);
    for (size_t i = 0; i < t->nrcpt; i++) {
        const sp_rcpt_result *r = &t->rcpts[i];
        lua_createtable(L, 0, 5);
        setstr(L, "address", r->address);
        if (r->code) {
            setint(L, "code", r->code);
            if (r->enhanced[0])
                setstr(L, "enhanced", r->enhanced);
            setstr(L, "text", r->text ? r->text : "");
        }
        setbool(L, "ok", r->code >= 200 && r->code < 300);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "recipients");
    if (t->done && !t->ok) {
        push_error(L, &t->err);
        lua_setfield(L, -2, "err");
    }
}

/* The outcome of the last transaction as a table. */
static int s_tx(lua_State *L)
{
    push_tx(L, sp_session_tx(check_session(L, 1)));
    return 1;
}

static int s_error(lua_State *L)
{
    const sp_error *e = sp_session_error(check_session(L, 1));
    if (e->kind == SP_KIND_NONE)
        return 0;
    push_error(L, e);
    return 1;
}

static int s_tx_count(lua_State *L)
{
    lua_pushinteger(L, sp_session_tx_count(check_session(L, 1)));
    return 1;
}

static int s_greeting(lua_State *L)
{
    const sp_reply *r = sp_session_greeting(check_session(L, 1));
    if (!r->code)
        return 0;
    lua_pushinteger(L, r->code);
    lua_pushstring(L, r->text ? r->text : "");
    return 2;
}

static int s_noop(lua_State *L)
{
    sp_error e;
    if (sp_session_noop(check_session(L, 1), &e) < 0)
        return push_fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

static int s_rset(lua_State *L)
{
    sp_error e;
    if (sp_session_rset(check_session(L, 1), &e) < 0)
        return push_fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

static int s_quit(lua_State *L)
{
    sp_session_quit(check_session(L, 1));
    lua_pushboolean(L, 1);
    return 1;
}

static const char *opt_string_field(lua_State *L, int t, const char *k)
{
    lua_getfield(L, t, k);
    const char *v = NULL;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "option '%s' must be a string", k);
        v = lua_tostring(L, -1);
    }
    lua_pop(L, 1); /* the string stays alive in the options table */
    return v;
}

/* Reads from, to (array of strings), data (string) at idx..idx+2 and starts a
 * transaction. Bad argument types raise; bad content returns nil, err. */
/* The body argument: a string, or an array of strings and {path = file}
 * segments (attachments streamed from disk, base64-encoded on the way).
 * The segment array is a userdata left on the stack, alive for the call. */
static int read_body(lua_State *L, int idx, sp_body_seg **segs_out, size_t *nseg_out,
                     unsigned long long *size, sp_body_info *bi, sp_error *e)
{
    memset(bi, 0, sizeof *bi);
    if (lua_type(L, idx) == LUA_TSTRING) {
        sp_body_seg *g = lua_newuserdata(L, sizeof *g);
        g->p = lua_tolstring(L, idx, &g->n);
        g->path = NULL;
        sp_body_scan(g->p, g->n, bi);
        *segs_out = g;
        *nseg_out = 1;
        *size = g->n;
        return 0;
    }
    if (!lua_istable(L, idx))
        return luaL_argerror(L, idx, "message data must be a string or an array of segments");
    size_t n = lua_rawlen(L, idx);
    sp_body_seg *g = lua_newuserdata(L, (n ? n : 1) * sizeof *g);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, idx, (int)i + 1);
        g[i].p = NULL;
        g[i].n = 0;
        g[i].path = NULL;
        if (lua_type(L, -1) == LUA_TSTRING) {
            g[i].p = lua_tolstring(L, -1, &g[i].n);
            sp_body_info part;
            sp_body_scan(g[i].p, g[i].n, &part);
            bi->has_8bit |= part.has_8bit;
            bi->has_nul |= part.has_nul;
            if (part.long_line_no && !bi->long_line_no)
                bi->long_line_no = part.long_line_no;
        } else if (lua_istable(L, -1)) {
            lua_getfield(L, -1, "path");
            if (lua_type(L, -1) != LUA_TSTRING)
                return luaL_error(L, "segment %d: {path = string} expected", (int)i + 1);
            g[i].path = lua_tostring(L, -1); /* alive: the table holds it */
            lua_pop(L, 1);
        } else {
            return luaL_error(L, "segment %d must be a string or {path = ...}", (int)i + 1);
        }
        lua_pop(L, 1);
    }
    *segs_out = g;
    *nseg_out = n;
    return sp_body_segs_size(g, n, size, e);
}

static int start_tx(lua_State *L, sp_session *s, int idx, sp_body_seg **segs, size_t *nseg)
{
    size_t flen;
    const char *from = luaL_checklstring(L, idx, &flen);
    luaL_checktype(L, idx + 1, LUA_TTABLE);
    size_t n = lua_rawlen(L, idx + 1);
    sp_error e;
    sp_error_clear(&e);
    /* A NUL would cut the address short in C: refuse it rather than send a
     * different address than the caller gave. */
    if (strlen(from) != flen) {
        sp_error_set(&e, SP_KIND_INVALID, SP_PHASE_MAIL, "sender address contains a NUL byte");
        return push_fail(L, &e);
    }
    sp_body_info bi;
    unsigned long long dlen = 0;
    if (read_body(L, idx + 2, segs, nseg, &dlen, &bi, &e) < 0)
        return push_fail(L, &e);
    if (bi.has_nul) {
        sp_error_set(&e, SP_KIND_INVALID, SP_PHASE_DATA, "the message contains a NUL byte");
        return push_fail(L, &e);
    }
    if (bi.long_line_no) {
        sp_error_set(&e, SP_KIND_INVALID, SP_PHASE_DATA,
                     "line %zu of the message is longer than 998 octets (RFC 5322 2.1.1)", bi.long_line_no);
        return push_fail(L, &e);
    }
    const char **rcpts = lua_newuserdata(L, (n ? n : 1) * sizeof *rcpts);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, idx + 1, (int)i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "recipient %d is not a string", (int)i + 1);
        size_t rlen;
        rcpts[i] = lua_tolstring(L, -1, &rlen);
        if (strlen(rcpts[i]) != rlen) {
            sp_error_set(&e, SP_KIND_INVALID, SP_PHASE_RCPT, "recipient %zu contains a NUL byte", i + 1);
            return push_fail(L, &e);
        }
        lua_pop(L, 1); /* the string stays alive in the table */
    }
    sp_tx_opts o;
    memset(&o, 0, sizeof o);
    o.from = from;
    o.rcpts = rcpts;
    o.nrcpt = n;
    /* SIZE= counts the bytes as transmitted: a little more than dlen after
     * line-end normalisation; dlen is the honest lower estimate RFC 1870 asks for. */
    o.size = (unsigned long)dlen;
    o.body_8bit = bi.has_8bit;
    char notify[40] = "";
    if (lua_istable(L, idx + 3)) { /* DSN: {ret=, envid=, notify=, orcpt=} */
        int d = idx + 3;
        const char *ret = opt_string_field(L, d, "ret");
        if (ret) {
            if (!strcasecmp(ret, "full"))
                o.dsn_ret = "FULL";
            else if (!strcasecmp(ret, "hdrs"))
                o.dsn_ret = "HDRS";
            else
                return luaL_error(L, "dsn.ret must be 'full' or 'hdrs'");
        }
        o.dsn_envid = opt_string_field(L, d, "envid");
        lua_getfield(L, d, "notify");
        if (lua_istable(L, -1)) {
            size_t nn = lua_rawlen(L, -1);
            for (size_t i = 1; i <= nn; i++) {
                lua_rawgeti(L, -1, (int)i);
                const char *w = lua_tostring(L, -1);
                const char *up = !w ? NULL : !strcasecmp(w, "success") ? "SUCCESS" : !strcasecmp(w, "failure") ? "FAILURE"
                                 : !strcasecmp(w, "delay") ? "DELAY" : !strcasecmp(w, "never") ? "NEVER" : NULL;
                if (!up || (nn > 1 && !strcmp(up, "NEVER")) || strstr(notify, up))
                    return luaL_error(L, "dsn.notify takes success, failure, delay, or never alone");
                if (*notify)
                    strcat(notify, ",");
                strcat(notify, up);
                lua_pop(L, 1);
            }
            if (*notify)
                o.dsn_notify = notify;
        } else if (!lua_isnil(L, -1)) {
            return luaL_error(L, "dsn.notify must be an array");
        }
        lua_pop(L, 1);
        lua_getfield(L, d, "orcpt");
        o.dsn_orcpt = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    if (sp_session_start_tx(s, &o, &e) < 0)
        return push_fail(L, &e);
    lua_pop(L, 1); /* the recipients' array; the segments stay below */
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- the native connection ---- */

static lconn *check_conn(lua_State *L, int i)
{
    lconn *lc = luaL_checkudata(L, i, CONN_MT);
    if (!lc->c)
        luaL_argerror(L, i, "connection is freed");
    return lc;
}

static double opt_number_field(lua_State *L, int t, const char *k, double dflt)
{
    lua_getfield(L, t, k);
    double v = dflt;
    if (!lua_isnil(L, -1)) {
        if (!lua_isnumber(L, -1))
            luaL_error(L, "option '%s' must be a number", k);
        v = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* The auth = {user=, secret=, mechanism=, allow_plaintext=} field of the
 * options table at t, into o. -1 on misuse. */
static int read_auth(lua_State *L, int t, sp_session_opts *o)
{
    lua_getfield(L, t, "auth");
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    int a = lua_gettop(L);
    o->auth_user = opt_string_field(L, a, "user");
    o->auth_secret = opt_string_field(L, a, "secret");
    if (!o->auth_user || !o->auth_secret)
        return -1;
    const char *m = opt_string_field(L, a, "mechanism");
    if (m) {
        static const struct {
            const char *n;
            unsigned v;
        } mechs[] = {{"PLAIN", SP_AUTH_PLAIN}, {"LOGIN", SP_AUTH_LOGIN}, {"CRAM-MD5", SP_AUTH_CRAM_MD5},
                     {"XOAUTH2", SP_AUTH_XOAUTH2}};
        o->auth_mech = 0;
        for (size_t i = 0; i < sizeof mechs / sizeof mechs[0]; i++)
            if (!strcmp(m, mechs[i].n))
                o->auth_mech = mechs[i].v;
        if (!o->auth_mech)
            return -1;
    }
    lua_getfield(L, a, "allow_plaintext");
    o->allow_plaintext_auth = lua_toboolean(L, -1);
    lua_pop(L, 2); /* the strings stay alive in the auth table, which the caller's table holds */
    return 0;
}

/* core.tls_context{ca_file=, ca_path=, cert_file=, key_file=, insecure_skip_verify=} */
static int l_tls_context(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    sp_tls_opts o;
    memset(&o, 0, sizeof o);
    o.ca_file = opt_string_field(L, 1, "ca_file");
    o.ca_path = opt_string_field(L, 1, "ca_path");
    o.cert_file = opt_string_field(L, 1, "cert_file");
    o.key_file = opt_string_field(L, 1, "key_file");
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
        return push_fail(L, &e);
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
    setint(L, "handshakes", lt->t ? (lua_Integer)sp_tls_handshakes(lt->t) : 0);
    setint(L, "resumed", lt->t ? (lua_Integer)sp_tls_resumed(lt->t) : 0);
    return 1;
}

/* core.connect{host=, port=, helo=, connect_timeout=, timeouts={phase=seconds},
 *              tls=ctx, tls_mode="none"|"implicit"|"starttls"|"opportunistic", server_name=,
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
    o.connect_timeout = opt_number_field(L, 1, "connect_timeout", 0);
    lua_getfield(L, 1, "timeouts");
    if (lua_istable(L, -1)) {
        for (int p = SP_PHASE_GREETING; p < SP_PHASE_COUNT; p++)
            o.timeouts[p] = opt_number_field(L, lua_gettop(L), sp_phase_name((sp_phase)p), 0);
    }
    const char *mode = opt_string_field(L, 1, "tls_mode");
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
    o.server_name = opt_string_field(L, 1, "server_name");
    if (read_auth(L, 1, &o.session) < 0)
        return luaL_error(L, "auth needs 'user' and 'secret' strings and a known mechanism");
    lconn *lc = lua_newuserdata(L, sizeof *lc);
    lc->c = NULL;
    lc->body_ref = LUA_NOREF;
    lc->tls_ref = LUA_NOREF;
    lc->trace = 0;
    if (tls_idx) {
        lua_pushvalue(L, tls_idx);
        lc->tls_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    luaL_getmetatable(L, CONN_MT);
    lua_setmetatable(L, -2);
    sp_error e;
    lc->c = sp_conn_new(&o, &e);
    if (!lc->c)
        return push_fail(L, &e);
    lua_getfield(L, 1, "trace");
    lc->trace = lua_toboolean(L, -1);
    lua_pop(L, 1);
    sp_session_trace(sp_conn_session(lc->c), lc->trace);
    return 1;
}

static void release_body(lua_State *L, lconn *lc)
{
    luaL_unref(L, LUA_REGISTRYINDEX, lc->body_ref);
    lc->body_ref = LUA_NOREF;
}

static int c_start(lua_State *L)
{
    lconn *lc = check_conn(L, 1);
    sp_body_seg *segs = NULL;
    size_t nseg = 0;
    int nret = start_tx(L, sp_conn_session(lc->c), 2, &segs, &nseg);
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

static int c_next_event(lua_State *L)
{
    lconn *lc = check_conn(L, 1);
    sp_event e = sp_conn_next_event(lc->c);
    if (e == SP_EV_NONE)
        return 0;
    if (e == SP_EV_TX_DONE)
        release_body(L, lc);
    lua_pushstring(L, sp_event_name(e));
    return 1;
}

static int c_close(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, CONN_MT);
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

static int s_tls_active(lua_State *L)
{
    lua_pushboolean(L, sp_session_tls_active(check_session(L, 1)));
    return 1;
}

static int s_auth_mech(lua_State *L)
{
    static const struct {
        unsigned m;
        const char *n;
    } names[] = {{SP_AUTH_PLAIN, "PLAIN"}, {SP_AUTH_LOGIN, "LOGIN"}, {SP_AUTH_CRAM_MD5, "CRAM-MD5"},
                 {SP_AUTH_XOAUTH2, "XOAUTH2"}};
    unsigned m = sp_session_auth_mech(check_session(L, 1));
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (names[i].m == m) {
            lua_pushstring(L, names[i].n);
            return 1;
        }
    return 0;
}

/* conn:abort(text): ends the connection now (no QUIT); a transaction in
 * flight fails with a connection error, or ambiguous when its final dot has
 * left. For the pool's per-message deadline. */
static int c_abort(lua_State *L)
{
    lconn *lc = check_conn(L, 1);
    const char *text = luaL_checkstring(L, 2);
    sp_error e;
    sp_error_set(&e, SP_KIND_CONNECTION, sp_session_phase(sp_conn_session(lc->c)), "%s", text);
    sp_conn_abort(lc->c, &e);
    return 0;
}

static int c_is_open(lua_State *L)
{
    lua_pushboolean(L, sp_conn_is_open(check_conn(L, 1)->c));
    return 1;
}

static int c_counters(lua_State *L)
{
    const sp_conn_counters *k = sp_conn_counters_get(check_conn(L, 1)->c);
    lua_createtable(L, 0, 4);
    setint(L, "writes", (lua_Integer)k->writes);
    setint(L, "reads", (lua_Integer)k->reads);
    setint(L, "bytes_out", (lua_Integer)k->bytes_out);
    setint(L, "bytes_in", (lua_Integer)k->bytes_in);
    return 1;
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
        cs[i] = check_conn(L, -1)->c;
        lua_pop(L, 1);
    }
    int r = sp_conn_wait(cs, n, timeout);
    if (r < 0)
        return luaL_error(L, "poll failed");
    /* One crossing per wake: every connection with events, its events
     * drained, each with what the pool needs of it (the transaction's outcome,
     * the session's error), so no further call is needed to read them. */
    lua_createtable(L, r, 0);
    int k = 0;
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, 1, (int)i + 1);
        lconn *lc = check_conn(L, -1);
        lua_pop(L, 1);
        sp_transition tr[32];
        size_t ntr = lc->trace ? sp_session_transitions(sp_conn_session(cs[i]), tr, 32) : 0;
        if (!sp_conn_has_events(cs[i]) && ntr == 0)
            continue;
        lua_createtable(L, 4, 1);
        setint(L, "conn", (lua_Integer)i + 1);
        int m = 0;
        if (ntr) { /* state changes first: they led to the events */
            lua_pushstring(L, "trace");
            lua_rawseti(L, -2, ++m);
            lua_createtable(L, (int)ntr, 0);
            for (size_t j = 0; j < ntr; j++) {
                lua_createtable(L, 0, 3);
                setstr(L, "from", sp_state_name(tr[j].from));
                setstr(L, "to", sp_state_name(tr[j].to));
                if (tr[j].code)
                    setint(L, "code", tr[j].code);
                lua_rawseti(L, -2, (int)j + 1);
            }
            lua_rawseti(L, -2, ++m);
        }
        sp_event e;
        while ((e = sp_conn_next_event(cs[i])) != SP_EV_NONE) {
            lua_pushstring(L, sp_event_name(e));
            lua_rawseti(L, -2, ++m);
            if (e == SP_EV_TX_DONE) {
                release_body(L, lc);
                push_tx(L, sp_session_tx(sp_conn_session(cs[i])));
            } else if (e == SP_EV_ERROR) {
                push_error(L, sp_session_error(sp_conn_session(cs[i])));
            } else {
                lua_pushboolean(L, 0);
            }
            lua_rawseti(L, -2, ++m);
        }
        lua_rawseti(L, -2, ++k);
    }
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

/* ---- the bare sans-IO session (tests, fuzzing, the OpenResty driver) ---- */

static int l_session(lua_State *L)
{
    sp_session_opts o;
    memset(&o, 0, sizeof o);
    if (lua_istable(L, 1)) {
        lua_getfield(L, 1, "helo");
        o.helo = luaL_optstring(L, -1, NULL);
        const char *st = opt_string_field(L, 1, "starttls");
        if (st)
            o.starttls = !strcmp(st, "required") ? SP_STARTTLS_REQUIRED : SP_STARTTLS_OPPORTUNISTIC;
        lua_getfield(L, 1, "tls_active");
        o.tls_active = lua_toboolean(L, -1);
        lua_pop(L, 1);
        if (read_auth(L, 1, &o) < 0)
            return luaL_error(L, "auth needs 'user' and 'secret' strings and a known mechanism");
    }
    sp_error e;
    if (sp_session_opts_check(&o, &e) < 0)
        return push_fail(L, &e);
    lsession *ls = lua_newuserdata(L, sizeof *ls);
    ls->s = NULL;
    luaL_getmetatable(L, SESSION_MT);
    lua_setmetatable(L, -2);
    ls->s = sp_session_new(&o);
    if (!ls->s)
        return luaL_error(L, "out of memory");
    return 1;
}

static int ss_feed(lua_State *L)
{
    size_t n;
    sp_session *s = check_session(L, 1);
    const char *p = luaL_checklstring(L, 2, &n);
    lua_pushboolean(L, sp_session_feed(s, p, n) == 0);
    return 1;
}

static int ss_eof(lua_State *L)
{
    lua_pushboolean(L, sp_session_eof(check_session(L, 1)) == 0);
    return 1;
}

static int ss_timeout(lua_State *L)
{
    sp_session_timeout(check_session(L, 1));
    return 0;
}

/* Returns the pending output as a string and marks it written. */
static int ss_output(lua_State *L)
{
    sp_session *s = check_session(L, 1);
    const sp_buf *o = sp_session_output(s);
    size_t n = sp_buf_pending(o);
    lua_pushlstring(L, sp_buf_head(o), n);
    sp_session_consume(s, n);
    return 1;
}

static int ss_next_event(lua_State *L)
{
    sp_event e = sp_session_next_event(check_session(L, 1));
    if (e == SP_EV_NONE)
        return 0;
    lua_pushstring(L, sp_event_name(e));
    return 1;
}

static int ss_start(lua_State *L)
{
    sp_body_seg *segs;
    size_t nseg;
    return start_tx(L, check_session(L, 1), 2, &segs, &nseg);
}

static int ss_body(lua_State *L)
{
    size_t n;
    sp_session *s = check_session(L, 1);
    const char *p = luaL_checklstring(L, 2, &n);
    sp_error e;
    if (sp_session_body(s, p, n, &e) < 0)
        return push_fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

static int ss_body_end(lua_State *L)
{
    sp_error e;
    if (sp_session_body_end(check_session(L, 1), &e) < 0)
        return push_fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

static int ss_tls_done(lua_State *L)
{
    sp_session_tls_done(check_session(L, 1));
    return 0;
}

static int ss_gc(lua_State *L)
{
    lsession *ls = luaL_checkudata(L, 1, SESSION_MT);
    sp_session_free(ls->s);
    ls->s = NULL;
    return 0;
}

/* ---- codecs for Lua ---- */

static int l_dotstuff(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    sp_buf b;
    sp_dotstuff st;
    sp_buf_init(&b);
    sp_dotstuff_init(&st);
    if (sp_dotstuff_feed(&st, p, n, &b) < 0 || sp_dotstuff_finish(&st, &b) < 0) {
        sp_buf_free(&b);
        return luaL_error(L, "out of memory");
    }
    return push_buf(L, &b);
}

static int l_b64encode(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    size_t m = sp_base64_encoded_len(n);
    char *o = malloc(m ? m : 1);
    if (!o)
        return luaL_error(L, "out of memory");
    sp_base64_encode((const unsigned char *)p, n, o);
    lua_pushlstring(L, o, m);
    free(o);
    return 1;
}

static int l_b64decode(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    unsigned char *o = malloc(3 * (n / 4) + 3);
    if (!o)
        return luaL_error(L, "out of memory");
    long m = sp_base64_decode(p, n, o);
    if (m < 0) {
        free(o);
        lua_pushnil(L);
        lua_pushstring(L, "invalid base64");
        return 2;
    }
    lua_pushlstring(L, (const char *)o, (size_t)m);
    free(o);
    return 1;
}

/* core.header(name, value [, encode=true]) -> "Name: folded value\r\n" | nil, err */
static int l_header(lua_State *L)
{
    size_t vl;
    const char *name = luaL_checkstring(L, 1);
    const char *v = luaL_checklstring(L, 2, &vl);
    int encode = lua_isnoneornil(L, 3) ? 1 : lua_toboolean(L, 3);
    sp_buf b;
    sp_buf_init(&b);
    int rc = sp_header_append(&b, name, v, vl, encode);
    if (rc < 0) {
        sp_buf_free(&b);
        lua_pushnil(L);
        lua_pushstring(L, rc == -2 ? "contains CR, LF or NUL" : rc == -3 ? "has a word longer than 998 characters"
                                                                           : "out of memory");
        return 2;
    }
    return push_buf(L, &b);
}

static int l_phrase(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    sp_buf b;
    sp_buf_init(&b);
    if (sp_phrase_append(&b, p, n) < 0) {
        sp_buf_free(&b);
        return luaL_error(L, "out of memory");
    }
    return push_buf(L, &b);
}

/* core.encode(kind, data) with kind "base64" (76-column lines) or "qp" */
static int l_encode(lua_State *L)
{
    const char *kind = luaL_checkstring(L, 1);
    size_t n;
    const unsigned char *p = (const unsigned char *)luaL_checklstring(L, 2, &n);
    sp_buf b;
    sp_buf_init(&b);
    int rc;
    if (!strcmp(kind, "base64")) {
        sp_b64_stream st;
        sp_b64_stream_init(&st);
        rc = sp_b64_stream_feed(&st, p, n, &b) < 0 || sp_b64_stream_finish(&st, &b) < 0;
    } else if (!strcmp(kind, "qp")) {
        sp_qp_stream st;
        sp_qp_stream_init(&st);
        rc = sp_qp_stream_feed(&st, p, n, &b) < 0 || sp_qp_stream_finish(&st, &b) < 0;
    } else {
        sp_buf_free(&b);
        return luaL_argerror(L, 1, "base64 or qp expected");
    }
    if (rc) {
        sp_buf_free(&b);
        return luaL_error(L, "out of memory");
    }
    return push_buf(L, &b);
}

static int l_utf8_valid(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    lua_pushboolean(L, sp_utf8_valid(p, n));
    return 1;
}

/* core.dkim_key(pem_or_path, "rsa-sha256" | "ed25519-sha256") -> key | nil, err */
static int l_dkim_key(lua_State *L)
{
    size_t n;
    const char *pem = luaL_checklstring(L, 1, &n);
    const char *a = luaL_optstring(L, 2, "rsa-sha256");
    int alg = !strcmp(a, "rsa-sha256") ? SP_DKIM_RSA_SHA256 : !strcmp(a, "ed25519-sha256") ? SP_DKIM_ED25519_SHA256 : 0;
    if (!alg)
        return luaL_argerror(L, 2, "rsa-sha256 or ed25519-sha256 expected");
    sp_dkim_key **ud = lua_newuserdata(L, sizeof *ud);
    *ud = NULL;
    luaL_getmetatable(L, DKIM_MT);
    lua_setmetatable(L, -2);
    sp_error e;
    sp_error_clear(&e);
    *ud = sp_dkim_key_new(pem, n, alg, &e);
    if (!*ud)
        return push_fail(L, &e);
    return 1;
}

static int dkim_gc(lua_State *L)
{
    sp_dkim_key **ud = luaL_checkudata(L, 1, DKIM_MT);
    sp_dkim_key_free(*ud);
    *ud = NULL;
    return 0;
}

/* key:sign(message, domain, selector [, headers [, t]]) and
 * key:sign_hashed(header_block, domain, selector, headers|nil, t, body_hash):
 * "DKIM-Signature: ...\r\n" | nil, err */
static int dkim_sign_common(lua_State *L, int hashed)
{
    sp_dkim_key **ud = luaL_checkudata(L, 1, DKIM_MT);
    size_t n;
    const char *msg = luaL_checklstring(L, 2, &n);
    const char *d = luaL_checkstring(L, 3);
    const char *sel = luaL_checkstring(L, 4);
    const char *h = luaL_optstring(L, 5, NULL);
    long long t = (long long)luaL_optnumber(L, 6, 0);
    const char *bh = hashed ? luaL_checkstring(L, 7) : NULL;
    if (!*ud)
        return luaL_argerror(L, 1, "key is freed");
    sp_buf b;
    sp_buf_init(&b);
    sp_error e;
    sp_error_clear(&e);
    int rc = hashed ? sp_dkim_sign_hashed(*ud, d, sel, h, t, msg, n, bh, &b, &e)
                    : sp_dkim_sign(*ud, d, sel, h, t, msg, n, &b, &e);
    if (rc < 0) {
        sp_buf_free(&b);
        return push_fail(L, &e);
    }
    return push_buf(L, &b);
}

static int dkim_sign(lua_State *L) { return dkim_sign_common(L, 0); }

/* core.body_hash(data) -> base64 DKIM body hash (relaxed) of a string or segments */
static int l_body_hash(lua_State *L)
{
    sp_body_seg *segs;
    size_t nseg;
    unsigned long long size;
    sp_body_info bi;
    sp_error e;
    sp_error_clear(&e);
    if (read_body(L, 1, &segs, &nseg, &size, &bi, &e) < 0)
        return push_fail(L, &e);
    sp_body_src *src = sp_body_src_new(segs, nseg);
    if (!src)
        return luaL_error(L, "out of memory");
    char bh[45];
    int rc = sp_dkim_body_hash_src(src, bh, &e);
    sp_body_src_free(src);
    if (rc < 0)
        return push_fail(L, &e);
    lua_pushstring(L, bh);
    return 1;
}

static int dkim_sign_hashed(lua_State *L) { return dkim_sign_common(L, 1); }

/* ---- an append-only file with fsync, for the campaign journal ---- */

static int l_journal_open(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int *fd = lua_newuserdata(L, sizeof *fd);
    *fd = -1;
    luaL_getmetatable(L, JOURNAL_MT);
    lua_setmetatable(L, -2);
    *fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (*fd < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "cannot open journal %s: %s", path, strerror(errno));
        return 2;
    }
    /* make the file's creation itself durable: fsync its directory */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    int dfd = open(slash ? (dir[0] ? dir : "/") : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 1;
}

static int *check_journal(lua_State *L)
{
    int *fd = luaL_checkudata(L, 1, JOURNAL_MT);
    if (*fd < 0)
        luaL_argerror(L, 1, "journal is closed");
    return fd;
}

/* j:append(text [, sync]) -> true | nil, err: writes all of text, then fsync when sync */
static int journal_append(lua_State *L)
{
    int *fd = check_journal(L);
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    while (n > 0) {
        ssize_t w = write(*fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            lua_pushnil(L);
            lua_pushfstring(L, "journal write: %s", strerror(errno));
            return 2;
        }
        p += w;
        n -= (size_t)w;
    }
    if (lua_toboolean(L, 3) && fsync(*fd) < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "journal fsync: %s", strerror(errno));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int journal_sync(lua_State *L)
{
    int *fd = check_journal(L);
    lua_pushboolean(L, fsync(*fd) == 0);
    return 1;
}

static int journal_close(lua_State *L)
{
    int *fd = luaL_checkudata(L, 1, JOURNAL_MT);
    if (*fd >= 0) {
        fsync(*fd);
        close(*fd);
        *fd = -1;
    }
    return 0;
}

static const luaL_Reg session_common[] = {
    {"state", s_state},       {"phase", s_phase}, {"caps", s_caps},         {"tx", s_tx},
    {"error", s_error},       {"tx_count", s_tx_count}, {"greeting", s_greeting},
    {"noop", s_noop},         {"rset", s_rset},   {"quit", s_quit},
    {"tls_active", s_tls_active}, {"auth_mechanism", s_auth_mech}, {NULL, NULL}};

static const luaL_Reg conn_methods[] = {{"start", c_start},         {"next_event", c_next_event},
                                        {"close", c_close},         {"is_open", c_is_open},
                                        {"abort", c_abort},
                                        {"counters", c_counters},   {NULL, NULL}};

static const luaL_Reg session_methods[] = {{"feed", ss_feed},     {"eof", ss_eof},
                                           {"timeout", ss_timeout}, {"output", ss_output},
                                           {"next_event", ss_next_event}, {"start", ss_start},
                                           {"body", ss_body},     {"body_end", ss_body_end},
                                           {"tls_done", ss_tls_done}, {NULL, NULL}};

static const luaL_Reg funcs[] = {{"connect", l_connect},       {"wait", l_wait},
                                 {"tls_context", l_tls_context},
                                 {"header", l_header},           {"phrase", l_phrase},
                                 {"encode", l_encode},           {"utf8_valid", l_utf8_valid},
                                 {"dkim_key", l_dkim_key},       {"body_hash", l_body_hash},
                                 {"journal_open", l_journal_open},
                                 {"now", l_now},               {"hostname", l_hostname},
                                 {"session", l_session},       {"dotstuff", l_dotstuff},
                                 {"base64_encode", l_b64encode}, {"base64_decode", l_b64decode},
                                 {NULL, NULL}};

static void new_class(lua_State *L, const char *name, const luaL_Reg *own, lua_CFunction gc)
{
    luaL_newmetatable(L, name);
    lua_newtable(L);
    luaL_setfuncs(L, session_common, 0);
    luaL_setfuncs(L, own, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__name");
    lua_pop(L, 1);
}

/* A userdata type with methods and a finaliser. */
static void new_type(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc)
{
    luaL_newmetatable(L, name);
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

int luaopen_smtppool_core(lua_State *L)
{
    new_class(L, CONN_MT, conn_methods, c_close);
    new_class(L, SESSION_MT, session_methods, ss_gc);
    static const luaL_Reg tls_methods[] = {{"stats", tls_stats}, {NULL, NULL}};
    static const luaL_Reg dkim_methods[] = {{"sign", dkim_sign}, {"sign_hashed", dkim_sign_hashed}, {NULL, NULL}};
    static const luaL_Reg journal_methods[] = {
        {"append", journal_append}, {"sync", journal_sync}, {"close", journal_close}, {NULL, NULL}};
    new_type(L, TLS_MT, tls_methods, tls_gc);
    new_type(L, DKIM_MT, dkim_methods, dkim_gc);
    new_type(L, JOURNAL_MT, journal_methods, journal_close);
    luaL_newmetatable(L, ERROR_MT);
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
    luaL_newlib(L, funcs);
    luaL_getmetatable(L, ERROR_MT);
    lua_setfield(L, -2, "error_mt");
    return 1;
}
