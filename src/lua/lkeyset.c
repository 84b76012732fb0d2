/* A map from strings (a campaign's normalised addresses) to one state byte,
 * for lists of millions of recipients, kept in a file rather than in memory:
 * the process's memory stays flat however long the list (the index of a
 * million addresses is a 32 MB file the kernel's page cache holds, not the
 * process).
 *
 * Each key is kept as its 128-bit MD5 with the low byte replaced by the
 * state (120 bits of hash: a collision among a billion keys has a chance
 * below 1e-18), never as a string: 16 bytes a slot. Open addressing, linear
 * probing, grown at three quarters full by rehashing into a file twice the
 * size. The file is unlinked as soon as it is created, so nothing is left
 * behind however the process ends; reads and writes are pread/pwrite of the
 * 4 KB block a probe needs. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "sp_lua.h"

#define KEYSET_MT "smtppool.keyset"
#define SLOT 16
#define BLOCK_SLOTS 256 /* one 4 KB block per read */
#define FIRST_CAP 4096

typedef struct keyset {
    int fd;
    char dir[256];
    size_t cap, len;
    size_t counts[256];
} keyset;

typedef struct slot {
    uint64_t a, b; /* b's low byte is the state; {0, 0} marks an empty slot */
} slot;

static void hash_key(const char *k, size_t n, slot *out)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int ml = 0;
    EVP_Digest(k, n, md, &ml, EVP_md5(), NULL);
    memcpy(&out->a, md, 8);
    memcpy(&out->b, md + 8, 8);
    out->b &= ~(uint64_t)0xff;
}

/* A new empty table file of cap slots (sparse), unlinked at once. */
static int table_file(const char *dir, size_t cap)
{
    char path[512];
    snprintf(path, sizeof path, "%s/smtppool-keys.XXXXXX", dir);
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    unlink(path);
    if (ftruncate(fd, (off_t)(cap * SLOT)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int read_block(int fd, size_t first, size_t n, slot *buf)
{
    size_t want = n * SLOT;
    size_t got = 0;
    while (got < want) {
        ssize_t r = pread(fd, (char *)buf + got, want - got, (off_t)(first * SLOT + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

static int write_slot(int fd, size_t i, const slot *s)
{
    for (;;) {
        ssize_t w = pwrite(fd, s, SLOT, (off_t)(i * SLOT));
        if (w == SLOT)
            return 0;
        if (w < 0 && errno == EINTR)
            continue;
        return -1;
    }
}

/* The slot holding h, or the empty slot where it would go: its index in
 * *at and its content in *cur. -1 on an I/O error. */
static int find_slot(int fd, size_t cap, const slot *h, size_t *at, slot *cur)
{
    slot buf[BLOCK_SLOTS];
    size_t i = (size_t)(h->a & (cap - 1));
    for (size_t seen = 0; seen < cap;) {
        size_t first = i - i % BLOCK_SLOTS;
        size_t n = cap - first < BLOCK_SLOTS ? cap - first : BLOCK_SLOTS;
        if (read_block(fd, first, n, buf) < 0)
            return -1;
        for (size_t j = i - first; j < n; j++, seen++) {
            const slot *e = &buf[j];
            if ((e->a == 0 && e->b == 0) || (e->a == h->a && (e->b & ~(uint64_t)0xff) == h->b)) {
                *at = first + j;
                *cur = *e;
                return 0;
            }
        }
        i = (first + n) & (cap - 1);
    }
    errno = ENOSPC;
    return -1; /* never: the table is grown at three quarters */
}

static int grow(keyset *s)
{
    size_t ncap = s->cap * 2;
    int nfd = table_file(s->dir, ncap);
    if (nfd < 0)
        return -1;
    slot buf[BLOCK_SLOTS];
    for (size_t first = 0; first < s->cap; first += BLOCK_SLOTS) {
        size_t n = s->cap - first < BLOCK_SLOTS ? s->cap - first : BLOCK_SLOTS;
        if (read_block(s->fd, first, n, buf) < 0)
            goto fail;
        for (size_t j = 0; j < n; j++) {
            if (buf[j].a == 0 && buf[j].b == 0)
                continue;
            slot h = {buf[j].a, buf[j].b & ~(uint64_t)0xff}, cur;
            size_t at;
            if (find_slot(nfd, ncap, &h, &at, &cur) < 0 || write_slot(nfd, at, &buf[j]) < 0)
                goto fail;
        }
    }
    close(s->fd);
    s->fd = nfd;
    s->cap = ncap;
    return 0;
fail:
    close(nfd);
    return -1;
}

static keyset *check_keyset(lua_State *L)
{
    keyset *s = luaL_checkudata(L, 1, KEYSET_MT);
    if (s->fd < 0)
        luaL_argerror(L, 1, "keyset is closed");
    return s;
}

static int io_fail(lua_State *L, const char *what)
{
    return luaL_error(L, "keyset: cannot %s its file: %s", what, strerror(errno));
}

/* core.keyset([dir]) -> set | nil, err: dir holds the (unlinked) table
 * file; default $TMPDIR or /tmp. */
static int l_keyset(lua_State *L)
{
    const char *dir = luaL_optstring(L, 1, NULL);
    if (!dir)
        dir = getenv("TMPDIR");
    if (!dir || !*dir)
        dir = "/tmp";
    luaL_argcheck(L, strlen(dir) < sizeof ((keyset *)0)->dir, 1, "folder name too long");
    keyset *s = lua_newuserdata(L, sizeof *s);
    memset(s, 0, sizeof *s);
    s->fd = -1;
    luaL_getmetatable(L, KEYSET_MT);
    lua_setmetatable(L, -2);
    snprintf(s->dir, sizeof s->dir, "%s", dir);
    s->cap = FIRST_CAP;
    s->fd = table_file(s->dir, s->cap);
    if (s->fd < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "cannot make the address index in %s: %s", dir, strerror(errno));
        return 2;
    }
    return 1;
}

/* set:get(key) -> the state (a one-character string) or nil */
static int ks_get(lua_State *L)
{
    keyset *s = check_keyset(L);
    size_t n;
    const char *k = luaL_checklstring(L, 2, &n);
    slot h, cur;
    size_t at;
    hash_key(k, n, &h);
    if (find_slot(s->fd, s->cap, &h, &at, &cur) < 0)
        return io_fail(L, "read");
    if (cur.a == 0 && cur.b == 0)
        return 0;
    char st = (char)(cur.b & 0xff);
    lua_pushlstring(L, &st, 1);
    return 1;
}

/* set:set(key, state): state is one character (not NUL) */
static int ks_set(lua_State *L)
{
    keyset *s = check_keyset(L);
    size_t n, sl;
    const char *k = luaL_checklstring(L, 2, &n);
    const char *st = luaL_checklstring(L, 3, &sl);
    luaL_argcheck(L, sl == 1 && st[0] != '\0', 3, "a state is one character, not NUL");
    if ((s->len + 1) * 4 > s->cap * 3 && grow(s) < 0)
        return io_fail(L, "grow");
    slot h, cur;
    size_t at;
    hash_key(k, n, &h);
    if (find_slot(s->fd, s->cap, &h, &at, &cur) < 0)
        return io_fail(L, "read");
    unsigned char old = (unsigned char)(cur.b & 0xff);
    if (cur.a == 0 && cur.b == 0)
        s->len++;
    else
        s->counts[old]--;
    slot e = {h.a, h.b | (unsigned char)st[0]};
    if (write_slot(s->fd, at, &e) < 0)
        return io_fail(L, "write");
    s->counts[(unsigned char)st[0]]++;
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

/* set:close(): the file goes now rather than at collection; safe twice */
static int ks_close(lua_State *L)
{
    keyset *s = luaL_checkudata(L, 1, KEYSET_MT);
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    s->cap = s->len = 0;
    return 0;
}

void sp_lua_open_keyset(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"get", ks_get}, {"set", ks_set}, {"count", ks_count}, {"close", ks_close}, {NULL, NULL}};
    sp_l_new_type(L, KEYSET_MT, NULL, methods, ks_close);
    lua_pushcfunction(L, l_keyset);
    lua_setfield(L, -2, "keyset");
}
