/* sp_body: a message body as a list of segments, read in chunks.
 *
 * A segment is bytes in memory or a file sent base64-encoded in 76-column
 * lines (an attachment streamed from disk): a body of any size passes
 * through a window of about 64 KB, never whole in memory. The same source
 * feeds the wire and the DKIM body hash. */
#ifndef SP_BODY_H
#define SP_BODY_H

#include <stddef.h>

#include "sp_error.h"

typedef struct sp_body_seg {
    const char *p;    /* bytes in memory (borrowed: must outlive the source) */
    size_t n;
    const char *path; /* or a file to send base64-encoded (copied) */
} sp_body_seg;

typedef struct sp_body_src sp_body_src;

sp_body_src *sp_body_src_new(const sp_body_seg *segs, size_t nseg);
void sp_body_src_free(sp_body_src *s);
/* The next chunk: 1 with *p, *n set (valid until the next call), 0 at the
 * end, -1 with *err set (kind invalid) when a file cannot be read. */
int sp_body_src_next(sp_body_src *s, const char **p, size_t *n, sp_error *err);
/* The body's size on the wire before dot-stuffing (files by their encoded
 * size); -1 with *err when a file cannot be examined. */
int sp_body_segs_size(const sp_body_seg *segs, size_t nseg, unsigned long long *size, sp_error *err);

#endif
