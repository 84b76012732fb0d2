/* sp_mime: the encoders of message composition (RFC 2045, 2047, 5322).
 *
 * Each appends to an sp_buf and returns 0, or -1 when memory runs out. The
 * base64 and quoted-printable encoders stream: a part of any size passes
 * through them in chunks, with the state carried between calls. */
#ifndef SP_MIME_H
#define SP_MIME_H

#include <stddef.h>

#include "sp_buf.h"

/* Base64 in lines of 76 characters ending in CRLF (RFC 2045 6.8). */
typedef struct sp_b64_stream {
    unsigned char carry[3];
    size_t ncarry;
    size_t col;
} sp_b64_stream;

void sp_b64_stream_init(sp_b64_stream *st);
int sp_b64_stream_feed(sp_b64_stream *st, const unsigned char *p, size_t n, sp_buf *out);
/* Flushes the last bytes and ends the last line with CRLF. */
int sp_b64_stream_finish(sp_b64_stream *st, sp_buf *out);

/* Quoted-printable (RFC 2045 6.7) for text: line ends (CRLF, LF or CR) are
 * hard breaks written as CRLF; lines are soft-broken to at most 76
 * characters; '=', controls, bytes over 0x7e and whitespace before a line
 * end are escaped; a dot or "From " at the start of a line is escaped too,
 * so the part survives dot-stuffing and mbox alike. */
typedef struct sp_qp_stream {
    char line[80]; /* the current output line, not yet written */
    size_t len;
    int pending_cr;
} sp_qp_stream;

void sp_qp_stream_init(sp_qp_stream *st);
int sp_qp_stream_feed(sp_qp_stream *st, const unsigned char *p, size_t n, sp_buf *out);
int sp_qp_stream_finish(sp_qp_stream *st, sp_buf *out);

/* A header field "Name: value" CRLF, folded at whitespace to lines of at most
 * 78 characters where possible and never more than 998. Non-ASCII words of
 * an unstructured value become RFC 2047 encoded-words (UTF-8, base64), each
 * at most 75 characters, never splitting a UTF-8 sequence. The value must be
 * free of CR, LF and NUL (-2 is returned otherwise); -3 when a word cannot
 * fit in 998 characters. encode = 0 leaves non-ASCII as it is (structured
 * fields already encoded, or SMTPUTF8 addresses). */
int sp_header_append(sp_buf *out, const char *name, const char *value, size_t vlen, int encode);

/* One phrase (a display name) as it goes into an address header: atoms as
 * they are, a quoted-string when it holds specials, encoded-words when it
 * holds non-ASCII. */
int sp_phrase_append(sp_buf *out, const char *p, size_t n);

/* Whether p holds only printable ASCII, space and tab. */
int sp_is_plain_ascii(const char *p, size_t n);
/* Whether p is valid UTF-8 (no overlongs, no surrogates). */
int sp_utf8_valid(const char *p, size_t n);

#endif
