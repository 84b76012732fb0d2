/* libFuzzer target: dot-stuffing (checked against its inverse), body scan
 * and base64 round trips. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sp_codec.h"

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
    unsigned char *junk = malloc(3 * (size / 4) + 3);
    sp_base64_decode((const char *)data, size, junk);
    free(junk);
    free(enc);
    free(dec);
    return 0;
}
