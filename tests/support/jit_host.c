/* A minimal LuaJIT interpreter for the test suite: runs a script with
 * arguments, like `luajit script args...`.
 *
 * Debian's `luajit` package conflicts with the LuaJIT 2.1 fork that nginx's
 * Lua module needs (libluajit2-5.1), so the suite builds this host against
 * that same library: the specs then run under exactly the LuaJIT that
 * OpenResty users have. Sets `arg` as lua.c does (arg[0] the script, arg[1..]
 * its arguments); loadfile skips a #! first line. */
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

static int traceback(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    luaL_traceback(L, L, msg ? msg : "(error object is not a string)", 1);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s script.lua [args...]\n", argv[0]);
        return 2;
    }
    lua_State *L = luaL_newstate();
    if (!L)
        return 1;
    luaL_openlibs(L);
    lua_createtable(L, argc - 2, 2);
    lua_pushstring(L, argv[0]);
    lua_rawseti(L, -2, -1);
    for (int i = 1; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - 1);
    }
    lua_setglobal(L, "arg");
    lua_pushcfunction(L, traceback);
    if (luaL_loadfile(L, argv[1]) != 0) {
        fprintf(stderr, "%s\n", lua_tostring(L, -1));
        lua_close(L);
        return 1;
    }
    for (int i = 2; i < argc; i++)
        lua_pushstring(L, argv[i]);
    int rc = lua_pcall(L, argc - 2, 0, 1);
    if (rc != 0)
        fprintf(stderr, "%s\n", lua_tostring(L, -1));
    lua_close(L);
    return rc != 0;
}
