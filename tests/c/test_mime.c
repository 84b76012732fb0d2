/* MIME encoders: base64 lines, quoted-printable, header folding, encoded-words. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "sp_codec.h"
#include "sp_mime.h"

static char *b64_chunked(const unsigned char *in, size_t n, size_t chunk)
{
    sp_buf b;
    sp_b64_stream st;
    sp_buf_init(&b);
    sp_b64_stream_init(&st);
    for (size_t i = 0; i < n; i += chunk)
        assert_int_equal(sp_b64_stream_feed(&st, in + i, n - i < chunk ? n - i : chunk, &b), 0);
    assert_int_equal(sp_b64_stream_finish(&st, &b), 0);
    char *r = strndup(sp_buf_head(&b), sp_buf_pending(&b));
    sp_buf_free(&b);
    return r;
}

static void base64_lines(void **state)
{
    (void)state;
    unsigned char in[300];
    for (int i = 0; i < 300; i++)
        in[i] = (unsigned char)(i * 7);
    char *ref = b64_chunked(in, 300, 300);
    /* 300 bytes -> 400 characters -> 5 full lines of 76 and one of 20 */
    assert_int_equal(strlen(ref), 400 + 6 * 2);
    for (char *p = ref; *p;) {
        char *e = strstr(p, "\r\n");
        assert_non_null(e);
        assert_true(e - p <= 76);
        p = e + 2;
    }
    for (size_t chunk = 1; chunk < 10; chunk++) {
        char *o = b64_chunked(in, 300, chunk);
        assert_string_equal(o, ref);
        free(o);
    }
    free(ref);
}

static char *qp(const char *in)
{
    sp_buf b;
    sp_qp_stream st;
    sp_buf_init(&b);
    sp_qp_stream_init(&st);
    assert_int_equal(sp_qp_stream_feed(&st, (const unsigned char *)in, strlen(in), &b), 0);
    assert_int_equal(sp_qp_stream_finish(&st, &b), 0);
    char *r = strndup(sp_buf_head(&b), sp_buf_pending(&b));
    sp_buf_free(&b);
    return r;
}

static void quoted_printable(void **state)
{
    (void)state;
    char *o = qp("caf\xc3\xa9 = 1 \n.dot\nFrom here\r\nend");
    assert_string_equal(o, "caf=C3=A9 =3D 1=20\r\n=2Edot\r\n=46rom here\r\nend\r\n");
    free(o);
    char longl[200];
    memset(longl, 'a', 199);
    longl[199] = 0;
    o = qp(longl);
    for (char *p = o; *p;) {
        char *e = strstr(p, "\r\n");
        assert_true(e - p <= 76);
        p = e + 2;
    }
    free(o);
}

static char *header(const char *name, const char *v, int encode, int *rc)
{
    sp_buf b;
    sp_buf_init(&b);
    *rc = sp_header_append(&b, name, v, strlen(v), encode);
    char *r = strndup(sp_buf_head(&b), sp_buf_pending(&b));
    sp_buf_free(&b);
    return r;
}

static void header_folding(void **state)
{
    (void)state;
    int rc;
    char *h = header("Subject", "short", 1, &rc);
    assert_string_equal(h, "Subject: short\r\n");
    free(h);
    h = header("Subject", "Re: Gr\xc3\xbc\xc3\x9f" "e aus K\xc3\xb6ln und mehr", 1, &rc);
    assert_int_equal(rc, 0);
    /* the non-ASCII span, spaces included, is one encoded run */
    assert_string_equal(h, "Subject: Re: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?= und mehr\r\n");
    free(h);
    char v[400];
    memset(v, 0, sizeof v);
    for (int i = 0; i < 60; i++)
        strcat(v, "word ");
    h = header("X-Long", v, 1, &rc);
    for (char *p = h; *p;) {
        char *e = strstr(p, "\r\n");
        assert_true(e - p <= 78);
        p = e + 2;
        if (*p)
            assert_true(*p == ' ' || *p == '\t');
    }
    free(h);
    h = header("Subject", "a\r\nBcc: x", 1, &rc);
    assert_int_equal(rc, -2);
    free(h);
    char huge[1200];
    memset(huge, 'x', 1199);
    huge[1199] = 0;
    h = header("X-Huge", huge, 1, &rc);
    assert_int_equal(rc, -3);
    free(h);
}

static void phrases(void **state)
{
    (void)state;
    sp_buf b;
    sp_buf_init(&b);
    sp_phrase_append(&b, "John Doe", 8);
    sp_buf_append(&b, "|", 1);
    sp_phrase_append(&b, "Doe, \"J\"", 8);
    sp_buf_append(&b, "|", 1);
    sp_phrase_append(&b, "J\xc3\xb6rg", 5);
    assert_int_equal(sp_buf_pending(&b), strlen("John Doe|\"Doe, \\\"J\\\"\"|=?UTF-8?B?SsO2cmc=?="));
    assert_memory_equal(sp_buf_head(&b), "John Doe|\"Doe, \\\"J\\\"\"|=?UTF-8?B?SsO2cmc=?=", sp_buf_pending(&b));
    sp_buf_free(&b);
    assert_true(sp_utf8_valid("J\xc3\xb6rg", 5));
    assert_false(sp_utf8_valid("\xc0\xaf", 2));       /* overlong */
    assert_false(sp_utf8_valid("\xed\xa0\x80", 3));   /* surrogate */
    assert_false(sp_utf8_valid("\xc3", 1));           /* truncated */
    /* the ASCII fast path (eight bytes at a time) hands every other byte on */
    assert_true(sp_utf8_valid("", 0));
    assert_true(sp_utf8_valid("abcdefgh", 8));
    assert_true(sp_utf8_valid("abcdefghJ\xc3\xb6rg", 13));
    assert_true(sp_utf8_valid("abcdefg\xc3\xb6", 9));          /* a sequence across the 8-byte edge */
    assert_false(sp_utf8_valid("abcdefgh\xc0\xaf", 10));       /* bad after a fast word */
    assert_false(sp_utf8_valid("abcdefghijklmno\xc3", 16));     /* truncated at the end of a word */
    assert_false(sp_utf8_valid("abcdefghijklmnopq\xff", 18));   /* bad in the tail */
    assert_false(sp_utf8_valid("abc\x80" "defghijk", 12));         /* bad inside the first word */
    assert_true(sp_utf8_valid("abc\0defghijk", 12));            /* NUL is ASCII here (callers check controls) */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(base64_lines),
        cmocka_unit_test(quoted_printable),
        cmocka_unit_test(header_folding),
        cmocka_unit_test(phrases),
    };
    return cmocka_run_group_tests_name("mime", tests, NULL, NULL);
}
