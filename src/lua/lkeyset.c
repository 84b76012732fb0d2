/* A compact map from strings (a campaign's normalised addresses) to one
 * state byte, for lists of millions of recipients: each key is kept as its
 * 128-bit MD5 (a collision among a billion keys has a chance below 1e-20),
 * never as a string, so an entry costs about 23 bytes instead of the ~200 a
 * Lua table of strings takes with its collector's slack. Open addressing,
 * linear probing, grown at three quarters full. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "sp_lua.h"

#define KEYSET_MT "smtppool.keyset"

typedef struct keyset {
    uint64_t *h;      /* 2 per slot; {0, 0} marks an empty slot */
    unsigned char *st;
    size_t cap, len;
    size_t counts[256];
} keyset;

static void hash_key(const char *k, size_t n, uint64_t out[2])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int ml = 0;
    EVP_Digest(k, n, md, &ml, EVP_md5(), NULL);
    memcpy(out, md, 16);
    if (out[0] == 0 && out[1] == 0)
        out[1] = 1; /* {0, 0} means empty */
}

static size_t find_slot(const keyset *s, const uint64_t h[2])
{
    size_t i = (size_t)(h[0] & (s->cap - 1));
    for (;;) {
        const uint64_t *e = s->h + 2 * i;
        if ((e[0] == h[0] && e[1] == h[1]) || (e[0] == 0 && e[1] == 0))
            return i;
        i = (i + 1) & (s->cap - 1);
    }
}

static int grow(keyset *s)
{
    size_t ncap = s->cap ? s->cap * 2 : 1024;
    uint64_t *nh = calloc(ncap * 2, sizeof *nh);
    unsigned char *nst = malloc(ncap);
    if (!nh || !nst) {
        free(nh);
        free(nst);
        return -1;
    }
    keyset n = *s;
    n.h = nh;
    n.st = nst;
    n.cap = ncap;
    for (size_t i = 0; i < s->cap; i++) {
        const uint64_t *e = s->h + 2 * i;
        if (e[0] == 0 && e[1] == 0)
            continue;
        size_t j = find_slot(&n, e);
        nh[2 * j] = e[0];
        nh[2 * j + 1] = e[1];
        nst[j] = s->st[i];
    }
    free(s->h);
    free(s->st);
    *s = n;
    return 0;
}

static keyset *check_keyset(lua_State *L)
{
    return luaL_checkudata(L, 1, KEYSET_MT);
}

/* core.keyset() */
static int l_keyset(lua_State *L)
{
    keyset *s = lua_newuserdata(L, sizeof *s);
    memset(s, 0, sizeof *s);
    luaL_getmetatable(L, KEYSET_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* set:get(key) -> the state (a one-character string) or nil */
static int ks_get(lua_State *L)
{
    keyset *s = check_keyset(L);
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    if (!s->cap)
        return 0;
    uint64_t h[2];
    hash_key(k, n, h);
    size_t i = find_slot(s, h);
    const uint64_t *e = s->h + 2 * i;
    if (e[0] == 0 && e[1] == 0)
        return 0;
    lua_pushlstring(L, (const char *)&s->st[i], 1);
    return 1;
}

/* set:set(key, state): state is one character */
static int ks_set(lua_State *L)
{
    keyset *s = check_keyset(L);
    size_t n, sl;
    const char *k = luaL_checklstring(L, 2, &n);
    const char *st = luaL_checklstring(L, 3, &sl);
    luaL_argcheck(L, sl == 1, 3, "a state is one character");
    if ((s->len + 1) * 4 > s->cap * 3 && grow(s) < 0)
        return luaL_error(L, "out of memory");
    uint64_t h[2];
    hash_key(k, n, h);
    size_t i = find_slot(s, h);
    uint64_t *e = s->h + 2 * i;
    if (e[0] == 0 && e[1] == 0) {
        e[0] = h[0];
        e[1] = h[1];
        s->len++;
    } else {
        s->counts[s->st[i]]--;
    }
    s->st[i] = (unsigned char)st[0];
    s->counts[s->st[i]]++;
    return 0;
}

/* set:count(state) -> how many keys are in that state; set:count() -> all keys */
static int ks_count(lua_State *L)
{
    keyset *s = check_keyset(L);
    if (lua_isnoneornil(L, 2)) {
        lua_pushinteger(L, (lua_Integer)s->len);
        return 1;
    }
    size_t sl;
    const char *st = luaL_checklstring(L, 2, &sl);
    luaL_argcheck(L, sl == 1, 2, "a state is one character");
    lua_pushinteger(L, (lua_Integer)s->counts[(unsigned char)st[0]]);
    return 1;
}

static int ks_gc(lua_State *L)
{
    keyset *s = luaL_checkudata(L, 1, KEYSET_MT);
    free(s->h);
    free(s->st);
    s->h = NULL;
    s->st = NULL;
    s->cap = s->len = 0;
    return 0;
}

void sp_lua_open_keyset(lua_State *L)
{
    static const luaL_Reg methods[] = {{"get", ks_get}, {"set", ks_set}, {"count", ks_count}, {NULL, NULL}};
    sp_l_new_type(L, KEYSET_MT, NULL, methods, ks_gc);
    lua_pushcfunction(L, l_keyset);
    lua_setfield(L, -2, "keyset");
}
