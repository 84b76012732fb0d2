/* Dot-stuffing, body scan, base64. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "sp_codec.h"

static char *stuff(const char *in, size_t n, size_t chunk, size_t *outlen)
{
    sp_buf b;
    sp_dotstuff st;
    sp_buf_init(&b);
    sp_dotstuff_init(&st);
    for (size_t i = 0; i < n; i += chunk)
        assert_int_equal(sp_dotstuff_feed(&st, in + i, (n - i) < chunk ? n - i : chunk, &b), 0);
    assert_int_equal(sp_dotstuff_finish(&st, &b), 0);
    *outlen = sp_buf_pending(&b);
    char *r = malloc(*outlen + 1);
    memcpy(r, sp_buf_head(&b), *outlen);
    r[*outlen] = '\0';
    sp_buf_free(&b);
    return r;
}

static void check_all_chunkings(const char *in, const char *want)
{
    size_t n = strlen(in);
    for (size_t chunk = 1; chunk <= n + 1; chunk++) {
        size_t ol;
        char *o = stuff(in, n, chunk, &ol);
        if (strcmp(o, want) != 0)
            fail_msg("chunk %zu: got [%s] want [%s]", chunk, o, want);
        free(o);
    }
}

static void dot_stuffing(void **state)
{
    (void)state;
    check_all_chunkings("a\r\n.b\r\n", "a\r\n..b\r\n.\r\n");
    check_all_chunkings(".\r\n", "..\r\n.\r\n");
    check_all_chunkings("x\r\n.\r\n..\r\ny", "x\r\n..\r\n...\r\ny\r\n.\r\n");
    check_all_chunkings("", ".\r\n");
    check_all_chunkings("mid.dot\r\n", "mid.dot\r\n.\r\n");
}

static void line_end_normalisation(void **state)
{
    (void)state;
    check_all_chunkings("a\nb\n", "a\r\nb\r\n.\r\n");
    check_all_chunkings("a\rb\r", "a\r\nb\r\n.\r\n");
    check_all_chunkings("a\r\r\nb", "a\r\n\r\nb\r\n.\r\n");
    check_all_chunkings("\n.x", "\r\n..x\r\n.\r\n");
    check_all_chunkings("a\r.b", "a\r\n..b\r\n.\r\n");
}

static void body_scan(void **state)
{
    (void)state;
    sp_body_info bi;
    sp_body_scan("ascii\r\nonly\n", 12, &bi);
    assert_false(bi.has_8bit);
    assert_false(bi.has_nul);
    assert_int_equal(bi.longest_line, 5);
    sp_body_scan("caf\xc3\xa9", 5, &bi);
    assert_true(bi.has_8bit);
    sp_body_scan("a\0b", 3, &bi);
    assert_true(bi.has_nul);
    char *big = malloc(3000);
    memset(big, 'x', 3000);
    memcpy(big, "one\r\ntwo\r\n", 10);
    sp_body_scan(big, 1008, &bi); /* third line has 998 octets: allowed */
    assert_int_equal(bi.long_line_no, 0);
    sp_body_scan(big, 1009, &bi);
    assert_int_equal(bi.long_line_no, 3);
    free(big);
}

static void base64_roundtrip(void **state)
{
    (void)state;
    const char *vec[][2] = {{"", ""},         {"f", "Zg=="},         {"fo", "Zm8="},
                            {"foo", "Zm9v"},  {"foob", "Zm9vYg=="},  {"fooba", "Zm9vYmE="},
                            {"foobar", "Zm9vYmFy"}};
    for (size_t i = 0; i < sizeof vec / sizeof vec[0]; i++) {
        size_t n = strlen(vec[i][0]);
        char out[32] = {0};
        sp_base64_encode((const unsigned char *)vec[i][0], n, out);
        assert_int_equal(sp_base64_encoded_len(n), strlen(vec[i][1]));
        assert_memory_equal(out, vec[i][1], strlen(vec[i][1]));
        unsigned char dec[32];
        long m = sp_base64_decode(vec[i][1], strlen(vec[i][1]), dec);
        assert_int_equal(m, (long)n);
        assert_memory_equal(dec, vec[i][0], n);
    }
    unsigned char dec[32];
    assert_int_equal(sp_base64_decode("Zm9v\r\nYmFy", 10, dec), 6);
    assert_int_equal(sp_base64_decode("Zm9v!", 5, dec), -1);
    assert_int_equal(sp_base64_decode("Zg==Zg", 6, dec), -1);
    unsigned char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (unsigned char)i;
    char enc[400];
    sp_base64_encode(all, 256, enc);
    unsigned char back[400];
    assert_int_equal(sp_base64_decode(enc, sp_base64_encoded_len(256), back), 256);
    assert_memory_equal(back, all, 256);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(dot_stuffing),
        cmocka_unit_test(line_end_normalisation),
        cmocka_unit_test(body_scan),
        cmocka_unit_test(base64_roundtrip),
    };
    return cmocka_run_group_tests_name("codec", tests, NULL, NULL);
}
