/* smtppool.core: the Lua binding of the protocol machine, the mail code and
 * the native driver, one file per object family (sp_lua.h). Builds against
 * Lua 5.4 and against LuaJIT / the Lua 5.1 C API (compat.h). */
#include "sp_lua.h"

void sp_l_new_type(lua_State *L, const char *name, const luaL_Reg *common, const luaL_Reg *own,
                   lua_CFunction gc)
{
    luaL_newmetatable(L, name);
    lua_newtable(L);
    if (common)
        luaL_setfuncs(L, common, 0);
    luaL_setfuncs(L, own, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__name");
    lua_pop(L, 1);
}

int luaopen_smtppool_core(lua_State *L)
{
    lua_newtable(L);
    sp_lua_open_errors(L);
    sp_lua_open_session(L);
    sp_lua_open_conn(L);
    sp_lua_open_mail(L);
    sp_lua_open_journal(L);
    sp_lua_open_redis(L);
    sp_lua_open_list(L);
    sp_lua_open_template(L);
    return 1;
}
