/* An append-only file with fsync, for the campaign journal. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "sp_lua.h"

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

void sp_lua_open_journal(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"append", journal_append}, {"sync", journal_sync}, {"close", journal_close}, {NULL, NULL}};
    sp_l_new_type(L, JOURNAL_MT, NULL, methods, journal_close);
    lua_pushcfunction(L, l_journal_open);
    lua_setfield(L, -2, "journal_open");
}
