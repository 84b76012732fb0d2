/* A recipient list's rows at C speed: the common CSV line and the address
 * key, the two things a campaign does for every row before it composes.
 *
 *   core.csv_plain(text, pos, delim, n[, header]) -> next_pos[, row] | nil
 *   core.csv_count(text, pos, delim, n) -> next_pos, lines
 *   core.address_key(address) -> key | nil, why
 *
 * csv_plain reads the line that starts at pos (1-based) in text when it is
 * the common case: whole (its LF in text), without a quote or a lone CR,
 * valid UTF-8, not blank, and with exactly n fields split at delim. It
 * returns the position after the line and, given the header (its n names),
 * the row as a table keyed by them. Anything else returns nil, and the
 * caller reads that line its careful way (quoted fields, line breaks in
 * them, errors with their line and column): nil never means an error.
 * csv_count passes over as many such lines as follow one another from pos
 * (the check of a whole list before its first message): the position after
 * them and how many (pos and 0 when the first is not one).
 *
 * address_key is the journal's key of an address: an address holding a
 * control character (CR, LF, NUL, a tab, DEL...) has none (nil and why:
 * trimmed, it could pose as another row's address, and a line break in it
 * could forge a record); otherwise spaces around it are trimmed and ASCII
 * letters lower-cased (local parts are case-sensitive in theory, never in
 * practice). */
#include <stdio.h>
#include <string.h>

#include "sp_lua.h"
#include "sp_mime.h"

/* The length of the plain line at p (up to its LF at *nl), or 0 when the
 * line is not one (see above). */
static size_t plain_line(const char *p, size_t avail, char delim, lua_Integer n, const char **nl, const char **end)
{
    const char *lf = memchr(p, '\n', avail);
    if (!lf)
        return 0;
    const char *e = lf;
    if (e > p && e[-1] == '\r')
        e--;
    size_t ll = (size_t)(e - p);
    if (ll == 0 || memchr(p, '"', ll) || memchr(p, '\r', ll) || !sp_utf8_valid(p, ll))
        return 0;
    lua_Integer fields = 1;
    for (const char *q = p; (q = memchr(q, delim, (size_t)(e - q))) != NULL; q++)
        fields++;
    if (fields != n)
        return 0;
    *nl = lf;
    *end = e;
    return ll;
}

static const char *check_args(lua_State *L, size_t *len, lua_Integer *pos, char *delim, lua_Integer *n)
{
    size_t dlen;
    const char *text = luaL_checklstring(L, 1, len);
    *pos = luaL_checkinteger(L, 2);
    const char *d = luaL_checklstring(L, 3, &dlen);
    *n = luaL_checkinteger(L, 4);
    luaL_argcheck(L, dlen == 1, 3, "a delimiter of one byte");
    luaL_argcheck(L, *n >= 1, 4, "the header's column count");
    *delim = d[0];
    return text;
}

static int l_csv_plain(lua_State *L)
{
    size_t len;
    lua_Integer pos, n;
    char delim;
    const char *text = check_args(L, &len, &pos, &delim, &n);
    int want_row = !lua_isnoneornil(L, 5);
    if (want_row)
        luaL_checktype(L, 5, LUA_TTABLE);
    if (pos < 1 || (size_t)pos > len)
        return 0;
    const char *p = text + pos - 1, *nl, *end;
    if (!plain_line(p, len - (size_t)(pos - 1), delim, n, &nl, &end))
        return 0;
    lua_pushinteger(L, (lua_Integer)(nl - text) + 2);
    if (!want_row)
        return 1;
    lua_createtable(L, 0, (int)n);
    const char *f = p;
    for (lua_Integer i = 1; i <= n; i++) {
        const char *d = i < n ? memchr(f, delim, (size_t)(end - f)) : end;
        lua_rawgeti(L, 5, i);
        lua_pushlstring(L, f, (size_t)(d - f));
        lua_rawset(L, -3);
        f = d + 1;
    }
    return 2;
}

static int l_csv_count(lua_State *L)
{
    size_t len;
    lua_Integer pos, n, lines = 0;
    char delim;
    const char *text = check_args(L, &len, &pos, &delim, &n);
    if (pos >= 1) {
        const char *nl, *end;
        while ((size_t)pos <= len && plain_line(text + pos - 1, len - (size_t)(pos - 1), delim, n, &nl, &end)) {
            pos = (lua_Integer)(nl - text) + 2;
            lines++;
        }
    }
    lua_pushinteger(L, pos);
    lua_pushinteger(L, lines);
    return 2;
}

static int l_address_key(lua_State *L)
{
    size_t n;
    const char *a = luaL_checklstring(L, 1, &n);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)a[i];
        if (c < 32 || c == 127) {
            lua_pushnil(L);
            lua_pushfstring(L, "invalid address: it holds a control character (byte %d at %d)", (int)c,
                            (int)(i + 1));
            return 2;
        }
    }
    size_t b = 0, e = n;
    while (b < e && a[b] == ' ')
        b++;
    while (e > b && a[e - 1] == ' ')
        e--;
    if (b == e) {
        lua_pushnil(L);
        lua_pushliteral(L, "invalid address: empty");
        return 2;
    }
    luaL_Buffer buf;
    luaL_buffinit(L, &buf);
    for (size_t i = b; i < e; i++) {
        char c = a[i];
        luaL_addchar(&buf, (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c);
    }
    luaL_pushresult(&buf);
    return 1;
}

void sp_lua_open_list(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"csv_plain", l_csv_plain}, {"csv_count", l_csv_count}, {"address_key", l_address_key}, {NULL, NULL}};
    luaL_setfuncs(L, funcs, 0);
}
