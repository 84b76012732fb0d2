/* libFuzzer target: dot-stuffing (checked against its inverse), body scan
 * and base64 round trips. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sp_codec.h"
#include "sp_mime.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    sp_buf out;
    sp_dotstuff st;
    sp_buf_init(&out);
    sp_dotstuff_init(&st);
    size_t half = size / 2;
    sp_dotstuff_feed(&st, (const char *)data, half, &out);
    sp_dotstuff_feed(&st, (const char *)data + half, size - half, &out);
    sp_dotstuff_finish(&st, &out);
    /* invariants: ends with CRLF.CRLF; no bare CR or LF; no line is a lone dot but the last */
    const char *p = sp_buf_head(&out);
    size_t n = sp_buf_pending(&out);
    if (n < 3 || memcmp(p + n - 3, ".\r\n", 3) != 0)
        abort();
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\n' && (i == 0 || p[i - 1] != '\r'))
            abort();
        if (p[i] == '\r' && (i + 1 >= n || p[i + 1] != '\n'))
            abort();
        if (p[i] == '.' && (i == 0 || p[i - 1] == '\n') && i != n - 3 && p[i + 1] != '.')
            abort();
    }
    sp_buf_free(&out);

    sp_body_info bi;
    sp_body_scan((const char *)data, size, &bi);

    char *enc = malloc(sp_base64_encoded_len(size) + 1);
    unsigned char *dec = malloc(size + 4);
    sp_base64_encode(data, size, enc);
    long m = sp_base64_decode(enc, sp_base64_encoded_len(size), dec);
    if (m != (long)size || (size && memcmp(dec, data, size) != 0))
        abort();
    /* header folding: any value either is refused or yields lines of at
     * most 998 characters, CRLF-terminated, continuation lines indented */
    sp_buf h;
    sp_buf_init(&h);
    int rc = sp_header_append(&h, "Subject", (const char *)data, size, size % 2);
    if (rc == 0) {
        const char *q = sp_buf_head(&h);
        size_t hn = sp_buf_pending(&h), col = 0;
        for (size_t i = 0; i < hn; i++) {
            if (q[i] == '\r') {
                if (i + 1 >= hn || q[i + 1] != '\n' || col > 998)
                    abort();
                i++;
                col = 0;
                if (i + 1 < hn && q[i + 1] != ' ' && q[i + 1] != '\t')
                    abort();
                continue;
            }
            if (q[i] == '\n')
                abort();
            col++;
        }
    }
    sp_buf_free(&h);
    sp_qp_stream qs;
    sp_buf qb;
    sp_buf_init(&qb);
    sp_qp_stream_init(&qs);
    sp_qp_stream_feed(&qs, data, size, &qb);
    sp_qp_stream_finish(&qs, &qb);
    {
        const char *q = sp_buf_head(&qb);
        size_t qn = sp_buf_pending(&qb), col = 0;
        for (size_t i = 0; i < qn; i++) {
            if (q[i] == '\r') {
                if (col > 76)
                    abort();
                col = 0;
                i++;
                continue;
            }
            if ((unsigned char)q[i] > 126)
                abort();
            col++;
        }
    }
    sp_buf_free(&qb);

    unsigned char *junk = malloc(3 * (size / 4) + 3);
    sp_base64_decode((const char *)data, size, junk);
    free(junk);
    free(enc);
    free(dec);
    return 0;
}
