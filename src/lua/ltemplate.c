/* core.template_plan(spec) -> render(vars): a message's templates rendered
 * in one C call, for the common case (smtppool.compose.template): every
 * templated field is flat (text and plain names) and every value a row
 * gives is a string or a number. A campaign renders each row's message
 * this way; anything else (a missing variable, a value of another type, a
 * value an html field must escape, vars that are not a table) is handed to
 * the Lua renderer, whose results and errors are the reference.
 *
 * spec = { general = function(vars), fixed = { k1, v1, k2, v2, ... },
 *          fields = { { name = "subject", html = false,
 *                       pieces = { "text", { "key", raw }, ... } }, ... } }
 *
 * The plan keeps every string it uses in one anchor table (the closure's
 * first upvalue); texts are added to the buffer from their bytes, keys and
 * fixed values are pushed from the anchor table by index. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sp_lua.h"

enum { P_TEXT, P_VAR, P_RAW };

typedef struct {
    uint8_t kind;
    int idx;        /* P_TEXT: unused; else the key's index in the anchors */
    const char *s;  /* P_TEXT: the text (anchored) */
    size_t len;
} piece;

typedef struct {
    int name;       /* the field's name, its index in the anchors */
    int html;
    int first, n;   /* its pieces: pieces[first .. first + n) */
} field;

typedef struct {
    int nfixed;     /* fixed k, v pairs: anchors 1 .. 2 * nfixed */
    int nfields;
    field *fields;
    piece *pieces;
} plan;

#define UP_ANCHORS lua_upvalueindex(1)
#define UP_PLAN lua_upvalueindex(2)
#define UP_GENERAL lua_upvalueindex(3)

/* The Lua renderer's answer, for what the plan does not serve. */
static int general(lua_State *L)
{
    lua_settop(L, 1);
    lua_pushvalue(L, UP_GENERAL);
    lua_insert(L, 1);
    lua_call(L, 1, LUA_MULTRET);
    return lua_gettop(L);
}

static int needs_escape(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        switch (s[i]) {
        case '&':
        case '<':
        case '>':
        case '"':
        case '\'':
            return 1;
        }
    return 0;
}

static int render(lua_State *L)
{
    const plan *p = lua_touserdata(L, UP_PLAN);
    if (!lua_istable(L, 1))
        return general(L);
    lua_settop(L, 1);
    lua_createtable(L, 0, p->nfixed + p->nfields + 1); /* 2: the message, room for its to */
    for (int i = 0; i < p->nfixed; i++) {
        lua_rawgeti(L, UP_ANCHORS, 2 * i + 1);
        lua_rawgeti(L, UP_ANCHORS, 2 * i + 2);
        lua_rawset(L, 2);
    }
    for (int f = 0; f < p->nfields; f++) {
        const field *fd = &p->fields[f];
        lua_rawgeti(L, UP_ANCHORS, fd->name); /* 3 */
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        for (int k = fd->first; k < fd->first + fd->n; k++) {
            const piece *pc = &p->pieces[k];
            if (pc->kind == P_TEXT) {
                luaL_addlstring(&b, pc->s, pc->len);
                continue;
            }
            lua_rawgeti(L, UP_ANCHORS, pc->idx);
            lua_gettable(L, 1); /* vars[key], metamethods included, as the Lua renderer reads it */
            int t = lua_type(L, -1);
            if (t != LUA_TSTRING && t != LUA_TNUMBER)
                return general(L);
            if (fd->html && pc->kind == P_VAR && t == LUA_TSTRING) {
                size_t n;
                const char *s = lua_tolstring(L, -1, &n);
                if (needs_escape(s, n))
                    return general(L);
            }
            luaL_addvalue(&b); /* a number as tostring writes it */
        }
        luaL_pushresult(&b);
        lua_rawset(L, 2);
    }
    return 1;
}

static int plan_gc(lua_State *L)
{
    plan *p = lua_touserdata(L, 1);
    free(p->fields);
    free(p->pieces);
    p->fields = NULL;
    p->pieces = NULL;
    return 0;
}

/* Appends v (at the top of the stack) to the anchors at index a; returns its index. */
static int anchor(lua_State *L, int a, int *n)
{
    lua_rawseti(L, a, ++*n);
    return *n;
}

static int l_template_plan(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_newtable(L); /* 2: anchors */
    int na = 0;
    plan *p = lua_newuserdata(L, sizeof *p); /* 3 */
    memset(p, 0, sizeof *p);
    lua_newtable(L);
    lua_pushcfunction(L, plan_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, 3);

    lua_getfield(L, 1, "fixed"); /* 4 */
    luaL_checktype(L, 4, LUA_TTABLE);
    int nf2 = (int)lua_rawlen(L, 4);
    p->nfixed = nf2 / 2;
    for (int i = 1; i <= 2 * p->nfixed; i++) {
        lua_rawgeti(L, 4, i);
        anchor(L, 2, &na); /* fixed pairs are anchors 1 .. 2 * nfixed */
    }
    lua_pop(L, 1);

    lua_getfield(L, 1, "fields"); /* 4 */
    luaL_checktype(L, 4, LUA_TTABLE);
    p->nfields = (int)lua_rawlen(L, 4);
    int npieces = 0;
    for (int f = 1; f <= p->nfields; f++) {
        lua_rawgeti(L, 4, f);
        luaL_checktype(L, -1, LUA_TTABLE);
        lua_getfield(L, -1, "pieces");
        luaL_checktype(L, -1, LUA_TTABLE);
        npieces += (int)lua_rawlen(L, -1);
        lua_pop(L, 2);
    }
    p->fields = calloc((size_t)p->nfields + 1, sizeof *p->fields);
    p->pieces = calloc((size_t)npieces + 1, sizeof *p->pieces);
    if (!p->fields || !p->pieces)
        return luaL_error(L, "template_plan: out of memory");
    int at = 0;
    for (int f = 0; f < p->nfields; f++) {
        field *fd = &p->fields[f];
        lua_rawgeti(L, 4, f + 1); /* 5 */
        lua_getfield(L, 5, "name");
        luaL_checktype(L, -1, LUA_TSTRING);
        fd->name = anchor(L, 2, &na);
        lua_getfield(L, 5, "html");
        fd->html = lua_toboolean(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, 5, "pieces"); /* 6 */
        fd->first = at;
        fd->n = (int)lua_rawlen(L, 6);
        for (int k = 1; k <= fd->n; k++, at++) {
            piece *pc = &p->pieces[at];
            lua_rawgeti(L, 6, k); /* 7 */
            if (lua_type(L, 7) == LUA_TSTRING) {
                pc->kind = P_TEXT;
                pc->s = lua_tolstring(L, 7, &pc->len);
                anchor(L, 2, &na); /* keeps the bytes pc->s points at */
            } else {
                luaL_checktype(L, 7, LUA_TTABLE);
                lua_rawgeti(L, 7, 2);
                pc->kind = lua_toboolean(L, -1) ? P_RAW : P_VAR;
                lua_pop(L, 1);
                lua_rawgeti(L, 7, 1);
                luaL_checktype(L, -1, LUA_TSTRING);
                pc->idx = anchor(L, 2, &na);
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 2);
    }
    lua_pop(L, 1);

    lua_getfield(L, 1, "general"); /* 4 */
    luaL_checktype(L, 4, LUA_TFUNCTION);
    lua_pushcclosure(L, render, 3); /* anchors, plan, general */
    return 1;
}

void sp_lua_open_template(lua_State *L)
{
    lua_pushcfunction(L, l_template_plan);
    lua_setfield(L, -2, "template_plan");
}
