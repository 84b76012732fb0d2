/* Codecs and DKIM for Lua. */
#include <stdlib.h>
#include <string.h>

#include "sp_codec.h"
#include "sp_dkim.h"
#include "sp_lua.h"
#include "sp_mime.h"

static int l_dotstuff(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    sp_buf b;
    sp_dotstuff st;
    sp_buf_init(&b);
    sp_dotstuff_init(&st);
    if (sp_dotstuff_feed(&st, p, n, &b) < 0 || sp_dotstuff_finish(&st, &b) < 0) {
        sp_buf_free(&b);
        return luaL_error(L, "out of memory");
    }
    return sp_l_push_buf(L, &b);
}

static int l_b64encode(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    size_t m = sp_base64_encoded_len(n);
    char *o = malloc(m ? m : 1);
    if (!o)
        return luaL_error(L, "out of memory");
    sp_base64_encode((const unsigned char *)p, n, o);
    lua_pushlstring(L, o, m);
    free(o);
    return 1;
}

static int l_b64decode(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    unsigned char *o = malloc(3 * (n / 4) + 3);
    if (!o)
        return luaL_error(L, "out of memory");
    long m = sp_base64_decode(p, n, o);
    if (m < 0) {
        free(o);
        lua_pushnil(L);
        lua_pushstring(L, "invalid base64");
        return 2;
    }
    lua_pushlstring(L, (const char *)o, (size_t)m);
    free(o);
    return 1;
}

/* core.header(name, value [, encode=true]) -> "Name: folded value\r\n" | nil, err */
static int l_header(lua_State *L)
{
    size_t vl;
    const char *name = luaL_checkstring(L, 1);
    const char *v = luaL_checklstring(L, 2, &vl);
    int encode = lua_isnoneornil(L, 3) ? 1 : lua_toboolean(L, 3);
    sp_buf b;
    sp_buf_init(&b);
    int rc = sp_header_append(&b, name, v, vl, encode);
    if (rc < 0) {
        sp_buf_free(&b);
        lua_pushnil(L);
        lua_pushstring(L, rc == -2 ? "contains CR, LF or NUL" : rc == -3 ? "has a word longer than 998 characters"
                                                                           : "out of memory");
        return 2;
    }
    return sp_l_push_buf(L, &b);
}

static int l_phrase(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    sp_buf b;
    sp_buf_init(&b);
    if (sp_phrase_append(&b, p, n) < 0) {
        sp_buf_free(&b);
        return luaL_error(L, "out of memory");
    }
    return sp_l_push_buf(L, &b);
}

/* core.encode(kind, data) with kind "base64" (76-column lines) or "qp" */
static int l_encode(lua_State *L)
{
    const char *kind = luaL_checkstring(L, 1);
    size_t n;
    const unsigned char *p = (const unsigned char *)luaL_checklstring(L, 2, &n);
    sp_buf b;
    sp_buf_init(&b);
    int rc;
    if (!strcmp(kind, "base64")) {
        sp_b64_stream st;
        sp_b64_stream_init(&st);
        rc = sp_b64_stream_feed(&st, p, n, &b) < 0 || sp_b64_stream_finish(&st, &b) < 0;
    } else if (!strcmp(kind, "qp")) {
        sp_qp_stream st;
        sp_qp_stream_init(&st);
        rc = sp_qp_stream_feed(&st, p, n, &b) < 0 || sp_qp_stream_finish(&st, &b) < 0;
    } else {
        sp_buf_free(&b);
        return luaL_argerror(L, 1, "base64 or qp expected");
    }
    if (rc) {
        sp_buf_free(&b);
        return luaL_error(L, "out of memory");
    }
    return sp_l_push_buf(L, &b);
}

static int l_utf8_valid(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    lua_pushboolean(L, sp_utf8_valid(p, n));
    return 1;
}

/* core.dkim_key(pem_or_path, "rsa-sha256" | "ed25519-sha256") -> key | nil, err */
static int l_dkim_key(lua_State *L)
{
    size_t n;
    const char *pem = luaL_checklstring(L, 1, &n);
    const char *a = luaL_optstring(L, 2, "rsa-sha256");
    int alg = !strcmp(a, "rsa-sha256") ? SP_DKIM_RSA_SHA256 : !strcmp(a, "ed25519-sha256") ? SP_DKIM_ED25519_SHA256 : 0;
    if (!alg)
        return luaL_argerror(L, 2, "rsa-sha256 or ed25519-sha256 expected");
    sp_dkim_key **ud = lua_newuserdata(L, sizeof *ud);
    *ud = NULL;
    luaL_getmetatable(L, DKIM_MT);
    lua_setmetatable(L, -2);
    sp_error e;
    sp_error_clear(&e);
    *ud = sp_dkim_key_new(pem, n, alg, &e);
    if (!*ud)
        return sp_l_push_fail(L, &e);
    return 1;
}

static int dkim_gc(lua_State *L)
{
    sp_dkim_key **ud = luaL_checkudata(L, 1, DKIM_MT);
    sp_dkim_key_free(*ud);
    *ud = NULL;
    return 0;
}

/* key:sign(message, domain, selector [, headers [, t]]) and
 * key:sign_hashed(header_block, domain, selector, headers|nil, t, body_hash):
 * "DKIM-Signature: ...\r\n" | nil, err */
static int dkim_sign_common(lua_State *L, int hashed)
{
    sp_dkim_key **ud = luaL_checkudata(L, 1, DKIM_MT);
    size_t n;
    const char *msg = luaL_checklstring(L, 2, &n);
    const char *d = luaL_checkstring(L, 3);
    const char *sel = luaL_checkstring(L, 4);
    const char *h = luaL_optstring(L, 5, NULL);
    long long t = (long long)luaL_optnumber(L, 6, 0);
    const char *bh = hashed ? luaL_checkstring(L, 7) : NULL;
    if (!*ud)
        return luaL_argerror(L, 1, "key is freed");
    sp_buf b;
    sp_buf_init(&b);
    sp_error e;
    sp_error_clear(&e);
    int rc = hashed ? sp_dkim_sign_hashed(*ud, d, sel, h, t, msg, n, bh, &b, &e)
                    : sp_dkim_sign(*ud, d, sel, h, t, msg, n, &b, &e);
    if (rc < 0) {
        sp_buf_free(&b);
        return sp_l_push_fail(L, &e);
    }
    return sp_l_push_buf(L, &b);
}

static int dkim_sign(lua_State *L) { return dkim_sign_common(L, 0); }

static int dkim_sign_hashed(lua_State *L) { return dkim_sign_common(L, 1); }

/* core.body_hash(data) -> base64 DKIM body hash (relaxed) of a string or segments */
static int l_body_hash(lua_State *L)
{
    sp_body_seg *segs;
    size_t nseg;
    unsigned long long size;
    sp_body_info bi;
    sp_error e;
    sp_error_clear(&e);
    if (sp_l_read_body(L, 1, &segs, &nseg, &size, &bi, &e) < 0)
        return sp_l_push_fail(L, &e);
    sp_body_src *src = sp_body_src_new(segs, nseg);
    if (!src)
        return luaL_error(L, "out of memory");
    char bh[45];
    int rc = sp_dkim_body_hash_src(src, bh, &e);
    sp_body_src_free(src);
    if (rc < 0)
        return sp_l_push_fail(L, &e);
    lua_pushstring(L, bh);
    return 1;
}

void sp_lua_open_mail(lua_State *L)
{
    static const luaL_Reg dkim_methods[] = {{"sign", dkim_sign}, {"sign_hashed", dkim_sign_hashed}, {NULL, NULL}};
    static const luaL_Reg funcs[] = {{"header", l_header},       {"phrase", l_phrase},
                                     {"encode", l_encode},       {"utf8_valid", l_utf8_valid},
                                     {"dkim_key", l_dkim_key},   {"body_hash", l_body_hash},
                                     {"dotstuff", l_dotstuff},   {"base64_encode", l_b64encode},
                                     {"base64_decode", l_b64decode}, {NULL, NULL}};
    sp_l_new_type(L, DKIM_MT, NULL, dkim_methods, dkim_gc);
    luaL_setfuncs(L, funcs, 0);
}
