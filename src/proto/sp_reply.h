/* sp_reply: an incremental SMTP reply reader (RFC 5321 section 4.2).
 *
 * Fed bytes as they arrive; yields whole replies. It knows nothing of sockets.
 * Malformed input (no code, bad continuation, oversized line or reply,
 * bytes outside printable ASCII) is a protocol error, never a crash or a hang:
 * the reader refuses to buffer more than one line's cap without a line end. */
#ifndef SP_REPLY_H
#define SP_REPLY_H

#include <stddef.h>

#include "sp_error.h"

/* RFC 5321 4.5.3.1.5 allows 512 octets per reply line; real servers exceed it,
 * so we accept eight times that and refuse anything longer. */
#define SP_REPLY_LINE_MAX 4096
#define SP_REPLY_MAX 65536

typedef struct sp_reply {
    int code;
    char enhanced[SP_ENHANCED_MAX]; /* RFC 3463 code of the first line, or "" */
    char *text;                     /* lines' text joined by '\n', enhanced codes removed */
    size_t text_len;
    size_t nlines;
} sp_reply;

typedef struct sp_reply_reader sp_reply_reader;

typedef enum sp_reply_status {
    SP_REPLY_MORE = 0, /* no complete reply yet */
    SP_REPLY_OK = 1,   /* *out holds a reply; free it with sp_reply_clear */
    SP_REPLY_ERR = -1  /* malformed input; see sp_reply_reader_error */
} sp_reply_status;

sp_reply_reader *sp_reply_reader_new(void);
void sp_reply_reader_free(sp_reply_reader *r);
/* Forgets buffered bytes and any error (used after STARTTLS). */
void sp_reply_reader_reset(sp_reply_reader *r);
/* Buffers bytes; returns -1 when memory runs out. */
int sp_reply_reader_feed(sp_reply_reader *r, const char *buf, size_t len);
/* Parses the next complete reply from the buffered bytes. */
sp_reply_status sp_reply_reader_next(sp_reply_reader *r, sp_reply *out);
/* Description of the last SP_REPLY_ERR. */
const char *sp_reply_reader_error(const sp_reply_reader *r);
/* Bytes buffered but not yet parsed, and whether a reply is partly read. */
size_t sp_reply_reader_pending(const sp_reply_reader *r);

void sp_reply_clear(sp_reply *rep);
/* Parses an RFC 3463 enhanced status code at the start of s whose class
 * matches the reply's first digit; returns its length (0 if none) and copies
 * it into out. */
size_t sp_enhanced_parse(const char *s, size_t n, int code, char out[SP_ENHANCED_MAX]);

#endif
