/* sp_lua.h: what the binding's files share. One file per object family
 * (lerror.c: error values and table helpers; lsession.c: the protocol
 * machine, bare and through a connection; lconn.c: the native driver and
 * TLS contexts; lmail.c: codecs and DKIM; ljournal.c: the campaign journal
 * (SQLite, src/store); lredis.c: RESP through
 * hiredis and a small blocking Redis client),
 * each registering its types and functions through sp_lua_open_*, all with
 * the one type registrar in lsmtppool.c. */
#ifndef SP_LUA_H
#define SP_LUA_H

#include "compat.h"

#include "sp_body.h"
#include "sp_codec.h"
#include "sp_error.h"
#include "sp_net.h"
#include "sp_session.h"
#include "sp_tls.h"

#define CONN_MT "smtppool.conn"
#define SESSION_MT "smtppool.session"
#define ERROR_MT "smtppool.error"
#define TLS_MT "smtppool.tls"
#define DKIM_MT "smtppool.dkim_key"
#define JOURNAL_MT "smtppool.journal"

/* A recipient whose L goes into a campaign journal just before a final dot
 * leaves (ljournal.c). */
struct sp_journal;
typedef struct sp_l_mark {
    struct sp_journal *j; /* holds a reference; NULL: no mark */
    char *key;
    size_t len;
} sp_l_mark;

/* A connection's L records waiting for their commit, which happens before
 * the connection's next write (sp_conn_set_sync_hook). */
typedef struct sp_l_sync {
    struct sp_journal *j; /* holds a reference; NULL: nothing waits */
    unsigned long long gen;
} sp_l_sync;

typedef struct lconn {
    sp_conn *c;
    int body_ref; /* registry reference keeping the body string alive */
    int tls_ref;  /* registry reference keeping the TLS context alive */
    int trace;    /* state changes are reported with the events */
    sp_l_mark mark;
    sp_l_sync sync;
} lconn;

typedef struct ltls {
    sp_tls_ctx *t;
} ltls;

/* A session without sockets. With `send` it also carries a transaction's
 * body source and journal mark, so a driver written in Lua (cosockets) only
 * moves bytes: see lsession.c. */
typedef struct lsession {
    sp_session *s;
    sp_body_src *body;
    int body_ref;
    int trace;
    sp_l_mark mark;
} lsession;

/* Error values: the one pusher of an sp_error (a table with the error
 * metatable), and `nil, err` for runtime failures. */
void sp_l_push_error(lua_State *L, const sp_error *e);
int sp_l_push_fail(lua_State *L, const sp_error *e);
/* A buffer's pending bytes as a Lua string (the buffer is freed). */
int sp_l_push_buf(lua_State *L, sp_buf *b);

void sp_l_setint(lua_State *L, const char *k, lua_Integer v);
void sp_l_setstr(lua_State *L, const char *k, const char *v);
void sp_l_setbool(lua_State *L, const char *k, int v);
const char *sp_l_opt_string(lua_State *L, int t, const char *k);
double sp_l_opt_number(lua_State *L, int t, const char *k, double dflt);

/* A session, bare or inside a connection. */
sp_session *sp_l_check_session(lua_State *L, int i);
lconn *sp_l_check_conn(lua_State *L, int i);
void sp_l_push_tx(lua_State *L, const sp_tx *t);
/* Starts a transaction from Lua's from, to, data, params at idx..idx+3;
 * quit_after: QUIT leaves with the final dot (the session's last). */
int sp_l_start_tx(lua_State *L, sp_session *s, int idx, int quit_after, sp_body_seg **segs, size_t *nseg);
int sp_l_read_auth(lua_State *L, int t, sp_session_opts *o);
/* The `timeouts` field (phase name -> seconds) of the options at idx. */
void sp_l_read_timeouts(lua_State *L, int idx, double out[SP_PHASE_COUNT]);
/* The optional journal and key arguments at j, j+1 into m (raises on
 * misuse); clearing frees the line. sp_l_mark_write is the dot hook. */
void sp_l_mark_take(lua_State *L, sp_l_mark *m, int j);
void sp_l_mark_clear(sp_l_mark *m);
int sp_l_mark_write(void *ud, sp_error *err);
/* The native connection's way: the mark's L goes into the open transaction
 * and sync remembers it; sp_l_sync_run commits it (once for all the marks
 * of a loop turn) before the connection writes again. */
int sp_l_mark_defer(sp_l_mark *m, sp_l_sync *sync, sp_error *err);
int sp_l_sync_run(sp_l_sync *sync, sp_error *err);
void sp_l_sync_clear(sp_l_sync *sync);
/* One wait entry {conn = index, name, payload...}: the trace (when on) and
 * every event next(ud) yields; on_tx_done runs before a "tx" payload is
 * made (to release the body). Pushes nothing and returns 0 when there is
 * nothing to report. */
typedef sp_event (*sp_l_next_fn)(void *ud);
int sp_l_push_entry(lua_State *L, sp_session *s, int trace, lua_Integer index, sp_l_next_fn next, void *ud,
                    void (*on_tx_done)(lua_State *L, void *ud));
/* A message body from Lua (a string, or an array of strings and {path =
 * file} segments) as segments pointing into the Lua strings, with its facts. */
int sp_l_read_body(lua_State *L, int idx, sp_body_seg **segs_out, size_t *nseg_out, unsigned long long *size,
                   sp_body_info *bi, sp_error *e);

/* The one type registrar: a metatable `name` whose __index holds the
 * methods of `common` (may be NULL) and `own`, with a finaliser. */
void sp_l_new_type(lua_State *L, const char *name, const luaL_Reg *common, const luaL_Reg *own,
                   lua_CFunction gc);
/* The methods sessions and connections share. */
extern const luaL_Reg sp_l_session_common[];

/* Each registers its types and sets its functions in the table on top. */
void sp_lua_open_errors(lua_State *L);
void sp_lua_open_session(lua_State *L);
void sp_lua_open_conn(lua_State *L);
void sp_lua_open_mail(lua_State *L);
void sp_lua_open_journal(lua_State *L);
void sp_lua_open_redis(lua_State *L);
void sp_lua_open_list(lua_State *L);
void sp_lua_open_template(lua_State *L);

#endif
