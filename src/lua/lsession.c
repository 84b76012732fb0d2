/* The protocol machine for Lua: the methods a session and a native
 * connection share, message bodies and envelopes read from Lua, and the
 * bare sans-IO session (tests, fuzzing, the OpenResty driver). */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sp_lua.h"

sp_session *sp_l_check_session(lua_State *L, int i)
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

static int s_state(lua_State *L)
{
    lua_pushstring(L, sp_state_name(sp_session_state(sp_l_check_session(L, 1))));
    return 1;
}

static int s_phase(lua_State *L)
{
    sp_phase p = sp_session_phase(sp_l_check_session(L, 1));
    if (p == SP_PHASE_NONE)
        lua_pushnil(L);
    else
        lua_pushstring(L, sp_phase_name(p));
    return 1;
}

static int s_caps(lua_State *L)
{
    sp_session *s = sp_l_check_session(L, 1);
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
              {SP_CAP_BINARYMIME, "binarymime"},
              {SP_CAP_REQUIRETLS, "requiretls"}};
    lua_newtable(L);
    sp_l_setbool(L, "esmtp", c->esmtp);
    for (size_t i = 0; i < sizeof fl / sizeof fl[0]; i++)
        if (c->flags & fl[i].f)
            sp_l_setbool(L, fl[i].n, 1);
    if (c->size_max)
        sp_l_setint(L, "size_max", (lua_Integer)c->size_max);
    if (c->flags & SP_CAP_AUTH) {
        lua_newtable(L);
        for (unsigned i = 0; i < SP_AUTH_COUNT; i++)
            if (c->auth & (1u << i))
                sp_l_setbool(L, sp_auth_mech_name(1u << i), 1);
        lua_setfield(L, -2, "auth_mechs");
    }
    if (c->mailmax)
        sp_l_setint(L, "mailmax", c->mailmax);
    if (c->rcptmax)
        sp_l_setint(L, "rcptmax", c->rcptmax);
    if (c->rcptdomainmax)
        sp_l_setint(L, "rcptdomainmax", c->rcptdomainmax);
    return 1;
}

/* Pushes a transaction's outcome as a table. */
void sp_l_push_tx(lua_State *L, const sp_tx *t)
{
    lua_createtable(L, 0, 8);
    sp_l_setbool(L, "ok", t->ok);
    sp_l_setbool(L, "done", t->done);
    sp_l_setint(L, "accepted", (lua_Integer)t->accepted);
    if (t->final.code) {
        sp_l_setint(L, "code", t->final.code);
        if (t->final.enhanced[0])
            sp_l_setstr(L, "enhanced", t->final.enhanced);
        sp_l_setstr(L, "text", t->final.text ? t->final.text : "");
    }
    lua_createtable(L, (int)t->nrcpt, 0);
    for (size_t i = 0; i < t->nrcpt; i++) {
        const sp_rcpt_result *r = &t->rcpts[i];
        lua_createtable(L, 0, 5);
        sp_l_setstr(L, "address", r->address);
        if (r->code) {
            sp_l_setint(L, "code", r->code);
            if (r->enhanced[0])
                sp_l_setstr(L, "enhanced", r->enhanced);
            sp_l_setstr(L, "text", r->text ? r->text : "");
        }
        sp_l_setbool(L, "ok", r->code >= 200 && r->code < 300);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "recipients");
    if (t->done && !t->ok) {
        sp_l_push_error(L, &t->err);
        lua_setfield(L, -2, "err");
    }
    sp_l_setbool(L, "bdat", t->bdat);
    sp_l_setbool(L, "quit", t->quit);
}

/* The outcome of the last transaction as a table. */
static int s_tx(lua_State *L)
{
    sp_session *s = sp_l_check_session(L, 1);
    sp_l_push_tx(L, sp_session_tx(s));
    sp_session_tx_done(s); /* taken: the next call sees the next one */
    return 1;
}

static int s_error(lua_State *L)
{
    const sp_error *e = sp_session_error(sp_l_check_session(L, 1));
    if (e->kind == SP_KIND_NONE)
        return 0;
    sp_l_push_error(L, e);
    return 1;
}

static int s_noop(lua_State *L)
{
    sp_error e;
    if (sp_session_noop(sp_l_check_session(L, 1), &e) < 0)
        return sp_l_push_fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

static int s_quit(lua_State *L)
{
    sp_session_quit(sp_l_check_session(L, 1));
    lua_pushboolean(L, 1);
    return 1;
}

/* core.valid_helo(name): the C rule, for the Lua option checks (a NUL,
 * which C would not see, makes it false). */
static int l_valid_helo(lua_State *L)
{
    size_t n;
    const char *h = luaL_checklstring(L, 1, &n);
    lua_pushboolean(L, strlen(h) == n && sp_session_valid_helo(h));
    return 1;
}

/* x:auth_go(): after an "auth" event (auth_gate), the AUTH command is queued. */
static int s_auth_go(lua_State *L)
{
    lua_pushboolean(L, sp_session_auth_go(sp_l_check_session(L, 1)) == 0);
    return 1;
}

/* Whether a transaction started now goes as BDAT chunks (the session decides). */
static int s_uses_bdat(lua_State *L)
{
    lua_pushboolean(L, sp_session_uses_bdat(sp_l_check_session(L, 1)));
    return 1;
}

/* s:gate_dot(): the transaction just started withholds its final dot
 * until s:gate_open() (sp_session_gate_dot). */
static int s_gate_dot(lua_State *L)
{
    sp_session_gate_dot(sp_l_check_session(L, 1));
    return 0;
}

static int s_gate_open(lua_State *L)
{
    sp_session_gate_open(sp_l_check_session(L, 1));
    return 0;
}

static int s_tls_active(lua_State *L)
{
    lua_pushboolean(L, sp_session_tls_active(sp_l_check_session(L, 1)));
    return 1;
}

static int s_auth_mech(lua_State *L)
{
    unsigned m = sp_session_auth_mech(sp_l_check_session(L, 1));
    if (!m)
        return 0;
    lua_pushstring(L, sp_auth_mech_name(m));
    return 1;
}

/* Reads from, to (array of strings), data (string) at idx..idx+2 and starts a
 * transaction. Bad argument types raise; bad content returns nil, err. */
/* The body argument: a string, or an array of strings and {path = file}
 * segments (attachments streamed from disk, base64-encoded on the way).
 * The segment array is a userdata left on the stack, alive for the call. */
int sp_l_read_body(lua_State *L, int idx, sp_body_seg **segs_out, size_t *nseg_out,
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

int sp_l_start_tx(lua_State *L, sp_session *s, int idx, int quit_after, sp_body_seg **segs, size_t *nseg)
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
        return sp_l_push_fail(L, &e);
    }
    sp_body_info bi;
    unsigned long long dlen = 0;
    if (sp_l_read_body(L, idx + 2, segs, nseg, &dlen, &bi, &e) < 0)
        return sp_l_push_fail(L, &e);
    if (bi.has_nul) {
        sp_error_set(&e, SP_KIND_INVALID, SP_PHASE_DATA, "the message contains a NUL byte");
        return sp_l_push_fail(L, &e);
    }
    if (bi.long_line_no) {
        sp_error_set(&e, SP_KIND_INVALID, SP_PHASE_DATA,
                     "line %zu of the message is longer than 998 octets (RFC 5322 2.1.1)", bi.long_line_no);
        return sp_l_push_fail(L, &e);
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
            return sp_l_push_fail(L, &e);
        }
        lua_pop(L, 1); /* the string stays alive in the table */
    }
    sp_tx_opts o;
    memset(&o, 0, sizeof o);
    o.from = from;
    o.rcpts = rcpts;
    o.quit_after = quit_after;
    o.nrcpt = n;
    /* SIZE= counts the bytes as transmitted: a little more than dlen after
     * line-end normalisation; dlen is the honest lower estimate RFC 1870 asks for. */
    o.size = (unsigned long)dlen;
    o.body_8bit = bi.has_8bit;
    char notify[40] = "";
    if (lua_istable(L, idx + 3)) { /* DSN: {ret=, envid=, notify=, orcpt=} */
        int d = idx + 3;
        const char *ret = sp_l_opt_string(L, d, "ret");
        if (ret) {
            if (!strcasecmp(ret, "full"))
                o.dsn_ret = "FULL";
            else if (!strcasecmp(ret, "hdrs"))
                o.dsn_ret = "HDRS";
            else
                return luaL_error(L, "dsn.ret must be 'full' or 'hdrs'");
        }
        o.dsn_envid = sp_l_opt_string(L, d, "envid");
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
        lua_getfield(L, d, "requiretls");
        o.requiretls = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    if (sp_session_start_tx(s, &o, &e) < 0)
        return sp_l_push_fail(L, &e);
    lua_pop(L, 1); /* the recipients' array; the segments stay below */
    lua_pushboolean(L, 1);
    return 1;
}

/* The auth = {user=, secret=, mechanism=, allow_plaintext=} field of the
 * options table at t, into o. -1 on misuse. */
int sp_l_read_auth(lua_State *L, int t, sp_session_opts *o)
{
    lua_getfield(L, t, "auth");
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    int a = lua_gettop(L);
    o->auth_user = sp_l_opt_string(L, a, "user");
    o->auth_secret = sp_l_opt_string(L, a, "secret");
    if (!o->auth_user || !o->auth_secret)
        return -1;
    const char *m = sp_l_opt_string(L, a, "mechanism");
    if (m) {
        o->auth_mech = sp_auth_mech_of(m, strlen(m));
        if (!o->auth_mech)
            return -1;
    }
    lua_getfield(L, a, "allow_plaintext");
    o->allow_plaintext_auth = lua_toboolean(L, -1);
    lua_pop(L, 2); /* the strings stay alive in the auth table, which the caller's table holds */
    return 0;
}

/* The `timeouts` field of the table at idx (phase name -> seconds) into
 * out; phases not named stay as they are (0: the default). */
void sp_l_read_timeouts(lua_State *L, int idx, double out[SP_PHASE_COUNT])
{
    lua_getfield(L, idx, "timeouts");
    if (lua_istable(L, -1)) {
        int t = lua_gettop(L);
        for (int p = SP_PHASE_GREETING; p < SP_PHASE_COUNT; p++)
            out[p] = sp_l_opt_number(L, t, sp_phase_name((sp_phase)p), out[p]);
    }
    lua_pop(L, 1);
}

static int l_session(lua_State *L)
{
    sp_session_opts o;
    memset(&o, 0, sizeof o);
    if (lua_istable(L, 1)) {
        lua_getfield(L, 1, "helo");
        o.helo = luaL_optstring(L, -1, NULL);
        const char *st = sp_l_opt_string(L, 1, "starttls");
        if (st)
            o.starttls = !strcmp(st, "required") ? SP_STARTTLS_REQUIRED : SP_STARTTLS_OPPORTUNISTIC;
        lua_getfield(L, 1, "tls_active");
        o.tls_active = lua_toboolean(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, 1, "auth_gate");
        o.auth_gate = lua_toboolean(L, -1);
        lua_pop(L, 1);
        o.bdat_window = (int)sp_l_opt_number(L, 1, "bdat_window", 0);
        sp_l_read_timeouts(L, 1, o.timeouts);
        if (sp_l_read_auth(L, 1, &o) < 0)
            return luaL_error(L, "auth needs 'user' and 'secret' strings and a known mechanism");
    }
    sp_error e;
    if (sp_session_opts_check(&o, &e) < 0)
        return sp_l_push_fail(L, &e);
    lsession *ls = lua_newuserdata(L, sizeof *ls);
    memset(ls, 0, sizeof *ls);
    ls->body_ref = LUA_NOREF;
    ls->mark.j = NULL;
    luaL_getmetatable(L, SESSION_MT);
    lua_setmetatable(L, -2);
    ls->s = sp_session_new(&o);
    if (!ls->s)
        return luaL_error(L, "out of memory");
    if (lua_istable(L, 1)) {
        lua_getfield(L, 1, "trace");
        ls->trace = lua_toboolean(L, -1);
        lua_pop(L, 1);
        sp_session_trace(ls->s, ls->trace);
    }
    return 1;
}

static lsession *check_ls(lua_State *L)
{
    lsession *ls = luaL_checkudata(L, 1, SESSION_MT);
    if (!ls->s)
        luaL_argerror(L, 1, "session is freed");
    return ls;
}

static void ls_release_body(lua_State *L, lsession *ls)
{
    sp_body_src_free(ls->body);
    ls->body = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, ls->body_ref);
    ls->body_ref = LUA_NOREF;
}

/* The transaction methods a driver written in Lua uses: the session keeps
 * the body source and the journal mark, and feeds the body as its output
 * drains, exactly as the native driver's connection does. */

/* s:send(from, to, data, params[, journal, key[, last]]): starts a
 * transaction as conn:start does (data: a string or segments). */
static int ls_send(lua_State *L)
{
    lsession *ls = check_ls(L);
    sp_body_seg *segs = NULL;
    size_t nseg = 0;
    ls_release_body(L, ls);
    sp_l_mark_take(L, &ls->mark, 6);
    int quit_after = lua_toboolean(L, 8);
    lua_settop(L, 5);
    int nret = sp_l_start_tx(L, ls->s, 2, quit_after, &segs, &nseg);
    if (!(lua_toboolean(L, -1) && nret == 1)) {
        sp_l_mark_clear(&ls->mark);
        return nret;
    }
    /* keep the strings the segments point into alive until the outcome */
    lua_pushvalue(L, 4);
    ls->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (!(ls->body = sp_body_src_new(segs, nseg)))
        return luaL_error(L, "out of memory");
    return nret;
}

static void ls_pump(lsession *ls)
{
    sp_dot_hook hook = ls->mark.j ? sp_l_mark_write : NULL;
    sp_body_pump(ls->s, &ls->body, &hook, &ls->mark);
    if (!hook)
        sp_l_mark_clear(&ls->mark);
}

/* s:pending(): the bytes waiting to be written (body bytes fed as needed),
 * or nil; they stay queued until s:written(n). */
static int ls_pending(lua_State *L)
{
    lsession *ls = check_ls(L);
    if (sp_session_state(ls->s) == SP_ST_BODY)
        ls_pump(ls);
    const sp_buf *o = sp_session_output(ls->s);
    size_t n = sp_buf_pending(o);
    if (n == 0 || sp_session_gated(ls->s))
        return 0;
    lua_pushlstring(L, sp_buf_head(o), n);
    return 1;
}

/* s:written(n): n bytes of the pending output have left (a final dot
 * counts as sent only from here: a failed write before it is no ambiguity). */
static int ls_written(lua_State *L)
{
    lsession *ls = check_ls(L);
    lua_Integer n = luaL_checkinteger(L, 2);
    size_t have = sp_buf_pending(sp_session_output(ls->s));
    luaL_argcheck(L, n >= 0 && (size_t)n <= have, 2, "more than is pending");
    sp_session_consume(ls->s, (size_t)n);
    return 0;
}

/* s:handing(n): the next n pending bytes are being written (before a
 * cosocket send that yields while the reader may take their replies). */
static int ls_handing(lua_State *L)
{
    lsession *ls = check_ls(L);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_argcheck(L, n >= 0, 2, "a byte count");
    sp_session_handing(ls->s, (size_t)n);
    return 0;
}

/* s:activity(now): bytes left at now (monotonic seconds); s:deadline(now)
 * -> when the awaited reply is overdue, or nil when none is awaited: the
 * session's reply clock (sp_session_deadline), one rule for every driver. */
static int ls_activity(lua_State *L)
{
    lsession *ls = check_ls(L);
    sp_session_activity(ls->s, luaL_checknumber(L, 2));
    return 0;
}

static int ls_deadline(lua_State *L)
{
    lsession *ls = check_ls(L);
    double d = sp_session_deadline(ls->s, luaL_checknumber(L, 2));
    if (d <= 0)
        return 0;
    lua_pushnumber(L, d);
    return 1;
}

static sp_event ls_next(void *ud)
{
    lsession *ls = ud;
    for (;;) {
        sp_event e = sp_session_next_event(ls->s);
        if (e != SP_EV_BODY)
            return e;
        ls_pump(ls);
    }
}

static void ls_tx_done(lua_State *L, void *ud)
{
    lsession *ls = ud;
    if (!sp_session_tx_open(ls->s)) /* a pipelined next transaction keeps its body */
        ls_release_body(L, ls);
}

/* s:drain(index): the events so far as one wait entry ({conn = index, name,
 * payload...}, "tls" included: the driver does the handshake and calls
 * s:tls_done()), or nil when there are none. */
static int ls_drain(lua_State *L)
{
    lsession *ls = check_ls(L);
    lua_Integer idx = luaL_optinteger(L, 2, 1);
    if (!sp_l_push_entry(L, ls->s, ls->trace, idx, ls_next, ls, ls_tx_done))
        return 0;
    return 1;
}

/* s:abort(text[, phase[, kind]]): the connection is gone (a refused
 * connect, a failed write, a cut), its handshake failed ("tls") or its
 * host name does not exist ("config"): the session fails with an error of
 * that kind (default "connection") in phase (default: the current one), or
 * ambiguous when a final dot had left. */
static int ls_abort(lua_State *L)
{
    lsession *ls = check_ls(L);
    const char *text = luaL_checkstring(L, 2);
    const char *pname = luaL_optstring(L, 3, NULL);
    const char *kname = luaL_optstring(L, 4, "connection");
    sp_phase ph = sp_session_phase(ls->s);
    if (pname) {
        int p = SP_PHASE_NONE;
        while (p < SP_PHASE_COUNT && strcmp(sp_phase_name((sp_phase)p), pname) != 0)
            p++;
        luaL_argcheck(L, p < SP_PHASE_COUNT, 3, "unknown phase");
        ph = (sp_phase)p;
    }
    sp_kind kind = !strcmp(kname, "connection") ? SP_KIND_CONNECTION
                   : !strcmp(kname, "tls")      ? SP_KIND_TLS
                   : !strcmp(kname, "config")   ? SP_KIND_CONFIG
                                                : SP_KIND_NONE;
    luaL_argcheck(L, kind != SP_KIND_NONE, 4, "'connection', 'tls' or 'config'");
    sp_error e;
    sp_error_set(&e, kind, ph, "%s", text);
    sp_session_fail(ls->s, &e);
    return 0;
}

/* s:replies(): complete replies read so far (a driver restarts its reply
 * clock when this or the phase changes). */
static int ls_replies(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)sp_session_replies(check_ls(L)->s));
    return 1;
}

int sp_l_push_entry(lua_State *L, sp_session *s, int trace, lua_Integer index, sp_l_next_fn next, void *ud,
                    void (*on_tx_done)(lua_State *L, void *ud))
{
    sp_transition tr[32];
    size_t ntr = trace ? sp_session_transitions(s, tr, 32) : 0;
    sp_event e = next(ud);
    if (e == SP_EV_NONE && ntr == 0)
        return 0;
    lua_createtable(L, 4, 1);
    sp_l_setint(L, "conn", index);
    int m = 0;
    if (ntr) { /* state changes first: they led to the events */
        lua_pushstring(L, "trace");
        lua_rawseti(L, -2, ++m);
        lua_createtable(L, (int)ntr, 0);
        for (size_t j = 0; j < ntr; j++) {
            lua_createtable(L, 0, 3);
            sp_l_setstr(L, "from", sp_state_name(tr[j].from));
            sp_l_setstr(L, "to", sp_state_name(tr[j].to));
            if (tr[j].code)
                sp_l_setint(L, "code", tr[j].code);
            lua_rawseti(L, -2, (int)j + 1);
        }
        lua_rawseti(L, -2, ++m);
    }
    for (; e != SP_EV_NONE; e = next(ud)) {
        lua_pushstring(L, sp_event_name(e));
        lua_rawseti(L, -2, ++m);
        if (e == SP_EV_TX_DONE) {
            on_tx_done(L, ud);
            sp_l_push_tx(L, sp_session_tx(s));
            sp_session_tx_done(s);
        } else if (e == SP_EV_ERROR) {
            sp_l_push_error(L, sp_session_error(s));
        } else {
            lua_pushboolean(L, 0);
        }
        lua_rawseti(L, -2, ++m);
    }
    return 1;
}

static int ss_feed(lua_State *L)
{
    size_t n;
    sp_session *s = sp_l_check_session(L, 1);
    const char *p = luaL_checklstring(L, 2, &n);
    lua_pushboolean(L, sp_session_feed(s, p, n) == 0);
    return 1;
}

static int ss_eof(lua_State *L)
{
    lua_pushboolean(L, sp_session_eof(sp_l_check_session(L, 1)) == 0);
    return 1;
}

static int ss_timeout(lua_State *L)
{
    sp_session_timeout(sp_l_check_session(L, 1));
    return 0;
}

/* Returns the pending output as a string and marks it written. */
static int ss_output(lua_State *L)
{
    sp_session *s = sp_l_check_session(L, 1);
    const sp_buf *o = sp_session_output(s);
    size_t n = sp_buf_pending(o);
    lua_pushlstring(L, sp_buf_head(o), n);
    sp_session_consume(s, n);
    return 1;
}

static int ss_next_event(lua_State *L)
{
    sp_event e = sp_session_next_event(sp_l_check_session(L, 1));
    if (e == SP_EV_NONE)
        return 0;
    lua_pushstring(L, sp_event_name(e));
    return 1;
}

static int ss_start(lua_State *L)
{
    sp_body_seg *segs;
    size_t nseg;
    return sp_l_start_tx(L, sp_l_check_session(L, 1), 2, 0, &segs, &nseg);
}

static int ss_body(lua_State *L)
{
    size_t n;
    sp_session *s = sp_l_check_session(L, 1);
    const char *p = luaL_checklstring(L, 2, &n);
    sp_error e;
    if (sp_session_body(s, p, n, &e) < 0)
        return sp_l_push_fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

static int ss_body_end(lua_State *L)
{
    sp_error e;
    if (sp_session_body_end(sp_l_check_session(L, 1), &e) < 0)
        return sp_l_push_fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

static int ss_tls_done(lua_State *L)
{
    sp_session_tls_done(sp_l_check_session(L, 1));
    return 0;
}

static int ss_gc(lua_State *L)
{
    lsession *ls = luaL_checkudata(L, 1, SESSION_MT);
    ls_release_body(L, ls);
    sp_l_mark_clear(&ls->mark);
    sp_session_free(ls->s);
    ls->s = NULL;
    return 0;
}

const luaL_Reg sp_l_session_common[] = {
    {"state", s_state}, {"phase", s_phase}, {"caps", s_caps},   {"tx", s_tx},
    {"error", s_error}, {"noop", s_noop},   {"quit", s_quit},   {"auth_mechanism", s_auth_mech},
    {"tls_active", s_tls_active}, {"auth_go", s_auth_go}, {"uses_bdat", s_uses_bdat},
    {"gate_dot", s_gate_dot}, {"gate_open", s_gate_open}, {NULL, NULL}};

void sp_lua_open_session(lua_State *L)
{
    static const luaL_Reg methods[] = {{"feed", ss_feed},           {"eof", ss_eof},     {"timeout", ss_timeout},
                                       {"output", ss_output},       {"start", ss_start}, {"body", ss_body},
                                       {"next_event", ss_next_event}, {"body_end", ss_body_end},
                                       {"tls_done", ss_tls_done},   {"send", ls_send},
                                       {"pending", ls_pending},     {"written", ls_written}, {"handing", ls_handing},
                                       {"activity", ls_activity},   {"deadline", ls_deadline},
                                       {"drain", ls_drain},         {"abort", ls_abort},
                                       {"replies", ls_replies},     {NULL, NULL}};
    sp_l_new_type(L, SESSION_MT, sp_l_session_common, methods, ss_gc);
    lua_pushcfunction(L, l_session);
    lua_setfield(L, -2, "session");
    lua_pushcfunction(L, l_valid_helo);
    lua_setfield(L, -2, "valid_helo");
    /* the AUTH mechanisms the core speaks, for the Lua side's checks */
    lua_createtable(L, SP_AUTH_COUNT, 0);
    for (unsigned i = 0; i < SP_AUTH_COUNT; i++) {
        lua_pushstring(L, sp_auth_mech_name(1u << i));
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "auth_mechanisms");
}
