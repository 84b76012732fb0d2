/* The campaign journal (src/store/sp_journal.c, SQLite) as a Lua object.
 *
 *   core.journal_open(path|nil, campaign) -> j | nil, err, status
 *   j:get(key) -> letter, this_run | nil      j:meet(key)
 *   j:record(letter, key, info) -> true | nil, err, status  (info's tabs and line breaks: spaces)
 *   j:commit([sync]) -> true | nil, err, status
 *   j:counts() -> {S = n, ...}                j:close() -> true | nil, err, status
 *   core.journal_status(path[, nfail]) -> {campaign, counts, running, run, failures} | nil, err, status
 *
 * status names the class of failure: "busy", "not_journal", "version",
 * "campaign", "full" or "io". */
#include <string.h>

#include "sp_journal.h"
#include "sp_lua.h"

static const char *const status_names[] = {"ok", "busy", "not_journal", "version", "campaign", "full", "io"};

static int push_fail(lua_State *L, const char *err, sp_journal_status st)
{
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_pushstring(L, status_names[st]);
    return 3;
}

static int fail_j(lua_State *L, sp_journal *j) { return push_fail(L, sp_journal_error(j), sp_journal_last_status(j)); }

static sp_journal **check_ud(lua_State *L) { return luaL_checkudata(L, 1, JOURNAL_MT); }

static sp_journal *check_journal(lua_State *L)
{
    sp_journal **ud = check_ud(L);
    if (!*ud || !sp_journal_is_open(*ud))
        luaL_argerror(L, 1, "journal is closed");
    return *ud;
}

static int l_journal_open(lua_State *L)
{
    const char *path = luaL_optstring(L, 1, NULL);
    const char *campaign = luaL_checkstring(L, 2);
    sp_journal **ud = lua_newuserdata(L, sizeof *ud);
    *ud = NULL;
    luaL_getmetatable(L, JOURNAL_MT);
    lua_setmetatable(L, -2);
    sp_journal_status st;
    char err[512];
    *ud = sp_journal_open(path, campaign, &st, err, sizeof err);
    if (!*ud)
        return push_fail(L, err, st);
    return 1;
}

static int j_get(lua_State *L)
{
    sp_journal *j = check_journal(L);
    size_t n;
    const char *key = luaL_checklstring(L, 2, &n);
    char letter;
    int this_run;
    int r = sp_journal_get(j, key, n, &letter, &this_run);
    if (r < 0)
        return fail_j(L, j);
    if (r == 0)
        return 0;
    lua_pushlstring(L, &letter, 1);
    lua_pushboolean(L, this_run);
    return 2;
}

static int ok_or_fail(lua_State *L, sp_journal *j, int r)
{
    if (r < 0)
        return fail_j(L, j);
    lua_pushboolean(L, 1);
    return 1;
}

static int j_meet(lua_State *L)
{
    sp_journal *j = check_journal(L);
    size_t n;
    const char *key = luaL_checklstring(L, 2, &n);
    return ok_or_fail(L, j, sp_journal_meet(j, key, n));
}

static int j_record(lua_State *L)
{
    sp_journal *j = check_journal(L);
    size_t ln, kn, in = 0;
    const char *letter = luaL_checklstring(L, 2, &ln);
    const char *key = luaL_checklstring(L, 3, &kn);
    const char *info = luaL_optlstring(L, 4, "", &in);
    luaL_argcheck(L, ln == 1 && letter[0] && strchr(SP_J_LETTERS, letter[0]), 2,
                  "a journal letter (one of " SP_J_LETTERS ")");
    /* info on one line (a reply's line breaks, a tab): spaces */
    if (in && (memchr(info, '\r', in) || memchr(info, '\n', in) || memchr(info, '\t', in))) {
        char *clean = lua_newuserdata(L, in);
        for (size_t i = 0; i < in; i++)
            clean[i] = (info[i] == '\r' || info[i] == '\n' || info[i] == '\t') ? ' ' : info[i];
        info = clean;
    }
    return ok_or_fail(L, j, sp_journal_record(j, letter[0], key, kn, info, in));
}

static int j_commit(lua_State *L)
{
    sp_journal *j = check_journal(L);
    return ok_or_fail(L, j, sp_journal_commit(j, lua_toboolean(L, 2)));
}

static void push_counts(lua_State *L, sp_journal *j)
{
    long long counts[26];
    int ok = sp_journal_counts(j, counts) == 0;
    lua_createtable(L, 0, 8);
    for (int i = 0; i < 26; i++)
        if (ok && counts[i]) {
            char c = (char)('A' + i);
            lua_pushlstring(L, &c, 1);
            lua_pushinteger(L, (lua_Integer)counts[i]);
            lua_rawset(L, -3);
        }
}

static int j_counts(lua_State *L)
{
    sp_journal *j = check_journal(L);
    push_counts(L, j);
    return 1;
}

static int j_close(lua_State *L)
{
    sp_journal **ud = check_ud(L);
    if (!*ud)
        return ok_or_fail(L, NULL, 0);
    int r = sp_journal_close(*ud);
    if (r < 0)
        return fail_j(L, *ud);
    lua_pushboolean(L, 1);
    return 1;
}

static int j_gc(lua_State *L)
{
    sp_journal **ud = check_ud(L);
    if (*ud)
        sp_journal_unref(*ud); /* a pending mark keeps it until its dot */
    *ud = NULL;
    return 0;
}

static void push_failure(void *ud, char letter, const char *address, const char *info, double updated)
{
    lua_State *L = ud;
    lua_createtable(L, 0, 4);
    lua_pushlstring(L, &letter, 1);
    lua_setfield(L, -2, "state");
    sp_l_setstr(L, "address", address);
    sp_l_setstr(L, "info", info);
    lua_pushnumber(L, updated);
    lua_setfield(L, -2, "updated");
    lua_rawseti(L, -2, (int)lua_rawlen(L, -2) + 1);
}

static int l_journal_status(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int nfail = (int)luaL_optinteger(L, 2, 10);
    sp_journal_status st;
    char err[512];
    sp_journal *j = sp_journal_open_read(path, &st, err, sizeof err);
    if (!j)
        return push_fail(L, err, st);
    lua_createtable(L, 0, 6);
    sp_l_setstr(L, "campaign", sp_journal_campaign(j));
    sp_l_setbool(L, "running", sp_journal_running(j));
    push_counts(L, j);
    lua_setfield(L, -2, "counts");
    long long pid;
    char host[128];
    double started, ended;
    if (sp_journal_last_run(j, &pid, host, sizeof host, &started, &ended) > 0) {
        lua_createtable(L, 0, 4);
        sp_l_setint(L, "pid", (lua_Integer)pid);
        sp_l_setstr(L, "host", host);
        lua_pushnumber(L, started);
        lua_setfield(L, -2, "started");
        if (ended > 0) {
            lua_pushnumber(L, ended);
            lua_setfield(L, -2, "ended");
        }
        lua_setfield(L, -2, "run");
    }
    lua_newtable(L);
    sp_journal_failures(j, nfail, push_failure, L);
    lua_setfield(L, -2, "failures");
    sp_journal_unref(j);
    return 1;
}

/* Marks: the key to write L for just before a final dot leaves. */
void sp_l_mark_clear(sp_l_mark *m)
{
    free(m->key);
    m->key = NULL;
    m->len = 0;
    if (m->j)
        sp_journal_unref(m->j);
    m->j = NULL;
}

void sp_l_mark_take(lua_State *L, sp_l_mark *m, int idx)
{
    sp_l_mark_clear(m);
    if (lua_isnoneornil(L, idx))
        return;
    sp_journal **ud = luaL_checkudata(L, idx, JOURNAL_MT);
    size_t len;
    const char *key = luaL_checklstring(L, idx + 1, &len);
    if (!*ud || !sp_journal_is_open(*ud))
        luaL_argerror(L, idx, "journal is closed");
    /* copied now: the string may not outlive this call */
    if (!(m->key = malloc(len ? len : 1)))
        luaL_error(L, "out of memory");
    memcpy(m->key, key, len);
    m->len = len;
    m->j = *ud;
    sp_journal_ref(m->j);
}

static void mark_failed(sp_error *err, sp_journal *j)
{
    sp_error_set(err, SP_KIND_CONNECTION, SP_PHASE_DATA, "cannot journal the message before its final dot: %s",
                 sp_journal_error(j));
}

/* The pre-dot hook: L for the key, committed (it survives kill -9) before
 * the dot leaves; when it cannot be, the dot does not leave. */
int sp_l_mark_write(void *ud, sp_error *err)
{
    sp_l_mark *m = ud;
    int r = sp_journal_mark(m->j, m->key, m->len);
    if (r < 0)
        mark_failed(err, m->j);
    sp_l_mark_clear(m);
    return r;
}

void sp_l_sync_clear(sp_l_sync *sync)
{
    if (sync->j)
        sp_journal_unref(sync->j);
    sync->j = NULL;
    sync->gen = 0;
}

int sp_l_sync_run(sp_l_sync *sync, sp_error *err)
{
    if (!sync->j)
        return 0;
    int r = sp_journal_sync_to(sync->j, sync->gen);
    if (r < 0)
        mark_failed(err, sync->j);
    sp_l_sync_clear(sync);
    return r;
}

int sp_l_mark_defer(sp_l_mark *m, sp_l_sync *sync, sp_error *err)
{
    /* an earlier dot of this connection still waiting (its write blocked)
     * is settled first: a later transaction's commit does not cover it */
    if (sync->j && sync->j != m->j && sp_l_sync_run(sync, err) < 0) {
        sp_l_mark_clear(m);
        return -1;
    }
    unsigned long long gen;
    int r = sp_journal_mark_deferred(m->j, m->key, m->len, &gen);
    if (r < 0) {
        mark_failed(err, m->j);
    } else if (sync->j && sync->gen != gen) {
        r = sp_l_sync_run(sync, err);
    }
    if (r == 0 && !sync->j) {
        sync->j = m->j;
        sp_journal_ref(sync->j);
    }
    if (r == 0)
        sync->gen = gen;
    sp_l_mark_clear(m);
    return r;
}

void sp_lua_open_journal(lua_State *L)
{
    static const luaL_Reg methods[] = {{"get", j_get},       {"meet", j_meet},     {"record", j_record},
                                       {"commit", j_commit}, {"counts", j_counts}, {"close", j_close},
                                       {NULL, NULL}};
    sp_l_new_type(L, JOURNAL_MT, NULL, methods, j_gc);
    lua_pushcfunction(L, l_journal_open);
    lua_setfield(L, -2, "journal_open");
    lua_pushcfunction(L, l_journal_status);
    lua_setfield(L, -2, "journal_status");
    /* the letters, by meaning (sp_journal.h) */
    static const char *const letters[][2] = {
        {"prepared", SP_J_PREPARED}, {"leaving", SP_J_LEAVING},   {"sent", SP_J_SENT},
        {"twice", SP_J_TWICE},       {"failed", SP_J_FAILED},     {"transient", SP_J_TRANSIENT},
        {"ambiguous", SP_J_AMBIGUOUS}};
    lua_createtable(L, 0, 7);
    for (size_t i = 0; i < sizeof letters / sizeof letters[0]; i++) {
        lua_pushstring(L, letters[i][1]);
        lua_setfield(L, -2, letters[i][0]);
    }
    lua_setfield(L, -2, "letters");
}
