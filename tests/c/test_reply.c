/* Reply reader and capability parser. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "sp_caps.h"
#include "sp_reply.h"

/* Feeds s whole, returns the status of the first next(). */
static sp_reply_status parse(const char *s, size_t n, sp_reply *out, sp_reply_reader **keep)
{
    sp_reply_reader *r = sp_reply_reader_new();
    assert_non_null(r);
    assert_int_equal(sp_reply_reader_feed(r, s, n), 0);
    memset(out, 0, sizeof *out);
    sp_reply_status st = sp_reply_reader_next(r, out);
    if (keep)
        *keep = r;
    else
        sp_reply_reader_free(r);
    return st;
}

static void single_line(void **state)
{
    (void)state;
    sp_reply rep;
    const char *s = "250 2.1.0 Sender OK\r\n";
    assert_int_equal(parse(s, strlen(s), &rep, NULL), SP_REPLY_OK);
    assert_int_equal(rep.code, 250);
    assert_string_equal(rep.enhanced, "2.1.0");
    assert_string_equal(rep.text, "Sender OK");
    assert_int_equal(rep.nlines, 1);
    sp_reply_clear(&rep);
}

static void multi_line_and_byte_by_byte(void **state)
{
    (void)state;
    const char *s = "250-mx.example.org hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n";
    sp_reply_reader *r = sp_reply_reader_new();
    sp_reply rep;
    memset(&rep, 0, sizeof rep);
    size_t n = strlen(s);
    for (size_t i = 0; i < n - 1; i++) {
        assert_int_equal(sp_reply_reader_feed(r, s + i, 1), 0);
        assert_int_equal(sp_reply_reader_next(r, &rep), SP_REPLY_MORE);
    }
    assert_int_equal(sp_reply_reader_feed(r, s + n - 1, 1), 0);
    assert_int_equal(sp_reply_reader_next(r, &rep), SP_REPLY_OK);
    assert_int_equal(rep.code, 250);
    assert_int_equal(rep.nlines, 4);
    assert_string_equal(rep.text, "mx.example.org hello\nPIPELINING\nSIZE 1000\n8BITMIME");
    sp_reply_clear(&rep);
    sp_reply_reader_free(r);
}

static void several_replies_in_one_chunk(void **state)
{
    (void)state;
    const char *s = "250 ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n";
    sp_reply_reader *r = sp_reply_reader_new();
    sp_reply rep;
    memset(&rep, 0, sizeof rep);
    sp_reply_reader_feed(r, s, strlen(s));
    int codes[] = {250, 550, 354};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(sp_reply_reader_next(r, &rep), SP_REPLY_OK);
        assert_int_equal(rep.code, codes[i]);
        sp_reply_clear(&rep);
    }
    assert_int_equal(sp_reply_reader_next(r, &rep), SP_REPLY_MORE);
    sp_reply_reader_free(r);
}

static void bare_code_and_bare_lf(void **state)
{
    (void)state;
    sp_reply rep;
    assert_int_equal(parse("250\n", 4, &rep, NULL), SP_REPLY_OK);
    assert_int_equal(rep.code, 250);
    assert_string_equal(rep.text, "");
    sp_reply_clear(&rep);
}

static void enhanced_must_match_class(void **state)
{
    (void)state;
    sp_reply rep;
    const char *s = "550 4.1.1 mismatched\r\n";
    assert_int_equal(parse(s, strlen(s), &rep, NULL), SP_REPLY_OK);
    assert_string_equal(rep.enhanced, "");
    assert_string_equal(rep.text, "4.1.1 mismatched");
    sp_reply_clear(&rep);
    char out[SP_ENHANCED_MAX];
    assert_int_equal(sp_enhanced_parse("5.7.1234 x", 10, 550, out), 0);
    assert_int_equal(sp_enhanced_parse("5.7.123", 7, 550, out), 7);
    assert_int_equal(sp_enhanced_parse("5..1 x", 6, 550, out), 0);
}

static void expect_error(const char *s, size_t n, const char *needle)
{
    sp_reply rep;
    sp_reply_reader *r;
    assert_int_equal(parse(s, n, &rep, &r), SP_REPLY_ERR);
    if (!strstr(sp_reply_reader_error(r), needle))
        fail_msg("error '%s' lacks '%s'", sp_reply_reader_error(r), needle);
    /* stays failed */
    assert_int_equal(sp_reply_reader_next(r, &rep), SP_REPLY_ERR);
    sp_reply_reader_free(r);
}

static void malformed(void **state)
{
    (void)state;
    expect_error("hello there\r\n", 13, "3-digit code");
    expect_error("25\r\n", 4, "3-digit code");
    expect_error("250-first\r\n251 second\r\n", 23, "changes the reply code");
    expect_error("250_bad\r\n", 9, "separator");
    expect_error("150 one\r\n", 9, "outside");
    expect_error("290 x\r\n", 7, "outside");
    expect_error("250 caf\xc3\xa9\r\n", 11, "non-ASCII");
    expect_error("250 a\x01z\r\n", 9, "control byte");
    expect_error("250 nul\0x\r\n", 11, "control byte");
}

static void oversized_line(void **state)
{
    (void)state;
    size_t n = 100 * 1024;
    char *big = malloc(n);
    memset(big, 'a', n);
    memcpy(big, "250 ", 4);
    /* without a line end: refused as soon as it passes the cap */
    expect_error(big, n, "longer than");
    big[n - 2] = '\r';
    big[n - 1] = '\n';
    expect_error(big, n, "longer than");
    free(big);
}

static void oversized_reply(void **state)
{
    (void)state;
    /* many short continuation lines adding up past the reply cap */
    size_t lines = SP_REPLY_MAX / 100 + 10;
    char *s = malloc(lines * 100 + 1);
    size_t o = 0;
    for (size_t i = 0; i < lines; i++) {
        memcpy(s + o, "250-", 4);
        memset(s + o + 4, 'x', 94);
        memcpy(s + o + 98, "\r\n", 2);
        o += 100;
    }
    expect_error(s, o, "reply longer");
    free(s);
}

static void caps_from_ehlo(void **state)
{
    (void)state;
    const char *s = "250-mx.example.org Hello\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n250-PIPELINING\r\n"
                    "250-AUTH PLAIN LOGIN CRAM-MD5\r\n250-auth=login\r\n250-CHUNKING\r\n250-STARTTLS\r\n"
                    "250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-SMTPUTF8\r\n"
                    "250-LIMITS MAILMAX=5 RCPTMAX=100 RCPTDOMAINMAX=10\r\n250 XUNKNOWN foo\r\n";
    sp_reply rep;
    assert_int_equal(parse(s, strlen(s), &rep, NULL), SP_REPLY_OK);
    sp_caps c;
    sp_caps_parse(&c, &rep);
    unsigned want = SP_CAP_SIZE | SP_CAP_8BITMIME | SP_CAP_PIPELINING | SP_CAP_AUTH | SP_CAP_CHUNKING |
                    SP_CAP_STARTTLS | SP_CAP_ENHANCEDSTATUSCODES | SP_CAP_DSN | SP_CAP_SMTPUTF8 | SP_CAP_LIMITS;
    assert_int_equal(c.flags, want);
    assert_int_equal(c.size_max, 52428800);
    assert_int_equal(c.auth, SP_AUTH_PLAIN | SP_AUTH_LOGIN | SP_AUTH_CRAM_MD5);
    assert_int_equal(c.mailmax, 5);
    assert_int_equal(c.rcptmax, 100);
    assert_int_equal(c.rcptdomainmax, 10);
    sp_reply_clear(&rep);

    /* the greeting line alone: nothing offered; garbage numbers ignored */
    const char *t = "250-x\r\n250-SIZE lots\r\n250 LIMITS MAILMAX=abc\r\n";
    assert_int_equal(parse(t, strlen(t), &rep, NULL), SP_REPLY_OK);
    sp_caps_parse(&c, &rep);
    assert_int_equal(c.flags, SP_CAP_SIZE | SP_CAP_LIMITS);
    assert_int_equal(c.size_max, 0);
    assert_int_equal(c.mailmax, 0);
    sp_reply_clear(&rep);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(single_line),
        cmocka_unit_test(multi_line_and_byte_by_byte),
        cmocka_unit_test(several_replies_in_one_chunk),
        cmocka_unit_test(bare_code_and_bare_lf),
        cmocka_unit_test(enhanced_must_match_class),
        cmocka_unit_test(malformed),
        cmocka_unit_test(oversized_line),
        cmocka_unit_test(oversized_reply),
        cmocka_unit_test(caps_from_ehlo),
    };
    return cmocka_run_group_tests_name("reply", tests, NULL, NULL);
}
