/* Error values and the small table helpers every binding file uses. */
#include <stdio.h>
#include <string.h>

#include "sp_buf.h"
#include "sp_lua.h"

void sp_l_push_error(lua_State *L, const sp_error *e)
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
    if (e->silent) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "silent");
    }
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
int sp_l_push_buf(lua_State *L, sp_buf *b)
{
    lua_pushlstring(L, sp_buf_head(b), sp_buf_pending(b));
    sp_buf_free(b);
    return 1;
}

int sp_l_push_fail(lua_State *L, const sp_error *e)
{
    lua_pushnil(L);
    sp_l_push_error(L, e);
    return 2;
}

void sp_l_setint(lua_State *L, const char *k, lua_Integer v)
{
    lua_pushinteger(L, v);
    lua_setfield(L, -2, k);
}

void sp_l_setstr(lua_State *L, const char *k, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

void sp_l_setbool(lua_State *L, const char *k, int v)
{
    lua_pushboolean(L, v);
    lua_setfield(L, -2, k);
}

const char *sp_l_opt_string(lua_State *L, int t, const char *k)
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

double sp_l_opt_number(lua_State *L, int t, const char *k, double dflt)
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

void sp_lua_open_errors(lua_State *L)
{
    luaL_newmetatable(L, ERROR_MT);
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_setfield(L, -2, "error_mt");
}
