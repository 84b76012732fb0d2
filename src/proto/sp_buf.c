#include "sp_buf.h"

#include <stdlib.h>
#include <string.h>

void sp_buf_init(sp_buf *b) { memset(b, 0, sizeof *b); }

void sp_buf_free(sp_buf *b)
{
    free(b->data);
    sp_buf_init(b);
}

void sp_buf_reset(sp_buf *b) { b->off = b->len = 0; }

char *sp_buf_reserve(sp_buf *b, size_t n)
{
    if (b->off > 0 && b->off == b->len)
        b->off = b->len = 0;
    if (b->cap - b->len < n || !b->data) { /* an empty buffer has no room to point at, even for 0 */
        /* Compact first: consumed bytes at the front are dead weight. */
        if (b->off > 0) {
            memmove(b->data, b->data + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->cap - b->len < n) {
            size_t cap = b->cap ? b->cap : 256;
            while (cap - b->len < n) {
                if (cap > ((size_t)-1) / 2)
                    return NULL;
                cap *= 2;
            }
            char *d = realloc(b->data, cap);
            if (!d)
                return NULL;
            b->data = d;
            b->cap = cap;
        }
    }
    return b->data + b->len;
}

int sp_buf_append(sp_buf *b, const void *p, size_t n)
{
    if (n == 0)
        return 0;
    char *o = sp_buf_reserve(b, n);
    if (!o)
        return -1;
    memcpy(o, p, n);
    b->len += n;
    return 0;
}

int sp_buf_append_str(sp_buf *b, const char *s) { return sp_buf_append(b, s, strlen(s)); }

void sp_buf_consume(sp_buf *b, size_t n)
{
    if (n > b->len - b->off)
        n = b->len - b->off;
    b->off += n;
    if (b->off == b->len)
        b->off = b->len = 0;
}
