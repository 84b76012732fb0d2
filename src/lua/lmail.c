/* Codecs and DKIM for Lua. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "sp_codec.h"
#include "sp_dkim.h"
#include "sp_lua.h"
#include "sp_mime.h"
#include "sp_signq.h"

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

/* core.text_7bit(text) -> body, needs_crlf | nil: a text part that can go as
 * 7bit (no 8-bit byte, no NUL, no CR outside CRLF, no line over 998
 * octets) with its line ends made CRLF. The text itself comes back when it
 * has no bare LF (needs_crlf: it lacks only the final CRLF); nil when it
 * must be encoded. One pass in C: composition's largest cost in Lua. */
static int l_text_7bit(lua_State *L)
{
    size_t n;
    const char *p = luaL_checklstring(L, 1, &n);
    size_t line = 0, bare_lf = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x80 || c == 0)
            return 0;
        if (c == '\r') {
            if (i + 1 < n && p[i + 1] == '\n') {
                i++;
                line = 0;
                continue;
            }
            return 0; /* a bare CR */
        }
        if (c == '\n') {
            bare_lf++;
            line = 0;
            continue;
        }
        if (++line > 998)
            return 0;
    }
    int crlf_end = n >= 2 && p[n - 2] == '\r' && p[n - 1] == '\n';
    if (!bare_lf) {
        lua_pushvalue(L, 1);
        lua_pushboolean(L, n > 0 && !crlf_end);
        return 2;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\n' && (i == 0 || p[i - 1] != '\r')) {
            luaL_addlstring(&b, p + run, i - run);
            luaL_addlstring(&b, "\r\n", 2);
            run = i + 1;
        }
    }
    luaL_addlstring(&b, p + run, n - run);
    if (p[n - 1] != '\n') /* the last line gets its CRLF */
        luaL_addlstring(&b, "\r\n", 2);
    luaL_pushresult(&b);
    lua_pushboolean(L, 0);
    return 2;
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

/* ---- signing off the loop ---- */

#define SIGNQ_MT "smtppool.signq"

static sp_signq **check_signq(lua_State *L)
{
    sp_signq **q = luaL_checkudata(L, 1, SIGNQ_MT);
    if (!*q)
        luaL_argerror(L, 1, "the signing queue is closed");
    return q;
}

/* core.signq(threads) -> queue | nil, err: DKIM signing on worker threads */
static int l_signq(lua_State *L)
{
    int n = (int)luaL_checkinteger(L, 1);
    sp_signq **ud = lua_newuserdata(L, sizeof *ud);
    *ud = NULL;
    luaL_getmetatable(L, SIGNQ_MT);
    lua_setmetatable(L, -2);
    sp_error e;
    sp_error_clear(&e);
    *ud = sp_signq_new(n, &e);
    if (!*ud)
        return sp_l_push_fail(L, &e);
    return 1;
}

/* q:submit(id, key, message, domain, selector, headers|nil, t) -> true;
 * the message is copied and the key referenced: both may go at once. */
static int signq_submit(lua_State *L)
{
    sp_signq **q = check_signq(L);
    sp_sign_job j;
    j.id = (uint64_t)luaL_checkinteger(L, 2);
    sp_dkim_key **k = luaL_checkudata(L, 3, DKIM_MT);
    if (!*k)
        return luaL_argerror(L, 3, "key is freed");
    j.key = *k;
    j.msg = luaL_checklstring(L, 4, &j.len);
    j.domain = luaL_checkstring(L, 5);
    j.selector = luaL_checkstring(L, 6);
    j.headers = luaL_optstring(L, 7, NULL);
    j.t = (long long)luaL_optnumber(L, 8, 0);
    if (sp_signq_submit(*q, &j) < 0)
        return luaL_error(L, "out of memory");
    lua_pushboolean(L, 1);
    return 1;
}

/* q:take() -> { {id, signature} | {id, nil, err}, ... } (never blocks) */
static int signq_take(lua_State *L)
{
    sp_signq **q = check_signq(L);
    sp_sign_result rs[32];
    lua_newtable(L);
    int k = 0;
    size_t n;
    while ((n = sp_signq_take(*q, rs, sizeof rs / sizeof rs[0])) > 0) {
        for (size_t i = 0; i < n; i++) {
            lua_createtable(L, 3, 0);
            lua_pushinteger(L, (lua_Integer)rs[i].id);
            lua_rawseti(L, -2, 1);
            if (rs[i].ok) {
                lua_pushlstring(L, sp_buf_head(&rs[i].sig), sp_buf_pending(&rs[i].sig));
                lua_rawseti(L, -2, 2);
            } else {
                sp_l_push_error(L, &rs[i].err);
                lua_rawseti(L, -2, 3);
            }
            sp_buf_free(&rs[i].sig);
            lua_rawseti(L, -2, ++k);
        }
        if (n < sizeof rs / sizeof rs[0])
            break;
    }
    return 1;
}

static int signq_fd(lua_State *L)
{
    lua_pushinteger(L, sp_signq_fd(*check_signq(L)));
    return 1;
}

static int signq_pending(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)sp_signq_pending(*check_signq(L)));
    return 1;
}

static int signq_threads(lua_State *L)
{
    lua_pushinteger(L, sp_signq_threads(*check_signq(L)));
    return 1;
}

/* q:close(): stops the workers; jobs not taken are dropped. Also __gc. */
static int signq_close(lua_State *L)
{
    sp_signq **q = luaL_checkudata(L, 1, SIGNQ_MT);
    sp_signq_free(*q);
    *q = NULL;
    return 0;
}

/* core.random_hex(n) -> 2n hex digits from OpenSSL's CSPRNG (Message-IDs,
 * MIME boundaries), or nil when it cannot give them */
static int l_random_hex(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n > 0 && n <= 64, 1, "1 to 64 bytes");
    unsigned char raw[64];
    char hex[129];
    if (RAND_bytes(raw, (int)n) != 1) {
        lua_pushnil(L);
        return 1;
    }
    static const char digits[] = "0123456789abcdef";
    for (lua_Integer i = 0; i < n; i++) {
        hex[2 * i] = digits[raw[i] >> 4];
        hex[2 * i + 1] = digits[raw[i] & 15];
    }
    lua_pushlstring(L, hex, (size_t)(2 * n));
    return 1;
}

/* core.cpus() -> the number of processors online */
static int l_cpus(lua_State *L)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    lua_pushinteger(L, n > 0 ? n : 1);
    return 1;
}

void sp_lua_open_mail(lua_State *L)
{
    static const luaL_Reg dkim_methods[] = {{"sign", dkim_sign}, {"sign_hashed", dkim_sign_hashed}, {NULL, NULL}};
    static const luaL_Reg funcs[] = {{"header", l_header},       {"phrase", l_phrase},
                                     {"encode", l_encode},       {"utf8_valid", l_utf8_valid},
                                     {"dkim_key", l_dkim_key},   {"body_hash", l_body_hash},
                                     {"dotstuff", l_dotstuff},   {"base64_encode", l_b64encode},
                                     {"base64_decode", l_b64decode}, {"signq", l_signq},
                                     {"cpus", l_cpus},           {"random_hex", l_random_hex},
                                     {"text_7bit", l_text_7bit},
                                     {NULL, NULL}};
    static const luaL_Reg signq_methods[] = {{"submit", signq_submit},   {"take", signq_take},
                                             {"fd", signq_fd},           {"pending", signq_pending},
                                             {"threads", signq_threads}, {"close", signq_close},
                                             {NULL, NULL}};
    sp_l_new_type(L, DKIM_MT, NULL, dkim_methods, dkim_gc);
    sp_l_new_type(L, SIGNQ_MT, NULL, signq_methods, signq_close);
    luaL_setfuncs(L, funcs, 0);
}
