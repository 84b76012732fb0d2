/* sp_codec: the byte transforms of mail transfer.
 *
 * Dot-stuffing (RFC 5321 4.5.2) runs as a stream so a body of any size
 * passes through a small window; it also turns bare LF and bare CR into
 * CRLF, because a bare one on the wire is forbidden (RFC 5321 2.3.8). */
#ifndef SP_CODEC_H
#define SP_CODEC_H

#include <stddef.h>

#include "sp_buf.h"

typedef struct sp_dotstuff {
    int state;   /* 0 mid-line, 1 at line start, 2 after a CR */
    int nostuff; /* BDAT: line ends made CRLF, dots left alone (set after init) */
} sp_dotstuff;

void sp_dotstuff_init(sp_dotstuff *st);
/* Appends src, stuffed and with CRLF line ends, to out; -1 when out of memory. */
int sp_dotstuff_feed(sp_dotstuff *st, const char *src, size_t n, sp_buf *out);
/* Ends the body: a CRLF if the last line lacks one, then ".\r\n". */
int sp_dotstuff_finish(sp_dotstuff *st, sp_buf *out);
/* Ends the body without the dot (BDAT): a CRLF if the last line lacks one. */
int sp_dotstuff_end_line(sp_dotstuff *st, sp_buf *out);

/* What a body holds, for choosing MAIL parameters and refusing what cannot
 * go over DATA. */
typedef struct sp_body_info {
    int has_8bit;           /* a byte >= 0x80 */
    int has_nul;            /* a NUL byte */
    size_t longest_line;    /* octets, without the line end */
    size_t long_line_no;    /* 1-based number of the first line over 998, or 0 */
} sp_body_info;

void sp_body_scan(const char *p, size_t n, sp_body_info *info);

/* Base64 (RFC 4648) without line breaks. */
size_t sp_base64_encoded_len(size_t n);
/* Writes sp_base64_encoded_len(n) bytes to out (no NUL). */
void sp_base64_encode(const unsigned char *in, size_t n, char *out);
/* Decodes in (whitespace is skipped); returns bytes written to out, which must hold
 * 3 * (n / 4) + 3 bytes, or -1 when the input is not base64. */
long sp_base64_decode(const char *in, size_t n, unsigned char *out);

#endif
