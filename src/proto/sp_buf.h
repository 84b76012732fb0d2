/* sp_buf: a growable byte buffer with a read offset.
 * Used for the protocol machine's output and the reply reader's input. */
#ifndef SP_BUF_H
#define SP_BUF_H

#include <stddef.h>

typedef struct sp_buf {
    char *data;
    size_t off; /* first unconsumed byte */
    size_t len; /* end of valid bytes */
    size_t cap;
} sp_buf;

void sp_buf_init(sp_buf *b);
void sp_buf_free(sp_buf *b);
/* Appends n bytes; returns 0, or -1 when memory runs out (the buffer is unchanged). */
int sp_buf_append(sp_buf *b, const void *p, size_t n);
int sp_buf_append_str(sp_buf *b, const char *s);
/* Room for n more bytes at the end (b->data + b->len), which the caller
 * fills and then adds to b->len; NULL when memory runs out. */
char *sp_buf_reserve(sp_buf *b, size_t n);
/* Marks n bytes from the front as consumed. */
void sp_buf_consume(sp_buf *b, size_t n);
static inline size_t sp_buf_pending(const sp_buf *b) { return b->len - b->off; }
static inline const char *sp_buf_head(const sp_buf *b) { return b->data ? b->data + b->off : ""; }
void sp_buf_reset(sp_buf *b);

#endif
