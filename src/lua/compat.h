/* compat.h: the Lua 5.1 C API (LuaJIT 2.1, as nginx's Lua module embeds it)
 * seen through the 5.2+ names the binding uses. luaL_setfuncs (without
 * upvalues) and luaL_testudata follow Lua 5.2's lauxlib.c; LuaJIT 2.1
 * already has them (and luaL_newlib), so the shims step aside there. */
#ifndef SP_LUA_COMPAT_H
#define SP_LUA_COMPAT_H

#include <lauxlib.h>
#include <lua.h>

#if LUA_VERSION_NUM < 502
#define lua_rawlen lua_objlen
#ifndef luaL_newlib /* plain Lua 5.1 */
static inline void luaL_setfuncs(lua_State *L, const luaL_Reg *l, int nup)
{
    (void)nup;
    for (; l->name; l++) {
        lua_pushcfunction(L, l->func);
        lua_setfield(L, -2, l->name);
    }
}
#define luaL_newlib(L, l) (lua_newtable(L), luaL_setfuncs(L, l, 0))
static inline void *luaL_testudata(lua_State *L, int i, const char *tname)
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

#endif
