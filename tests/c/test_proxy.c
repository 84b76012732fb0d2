/* The proxy handshake (sp_proxy): SOCKS5 and HTTP CONNECT requests as the
 * RFCs write them, replies fed in any chunking, the target's first bytes
 * left for it, refusals with the right kind, and random bytes never read
 * past a buffer (run under ASan by make sanitize, and valgrind). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "sp_proxy.h"

static void take_out(sp_proxy *p, const char *want, size_t n)
{
    size_t got;
    const char *o = sp_proxy_out(p, &got);
    assert_int_equal(got, n);
    assert_memory_equal(o, want, n);
    sp_proxy_sent(p, got);
}

/* Feeds s in chunks of k: the result of the last call, *used of it. */
static int feed(sp_proxy *p, const char *s, size_t n, size_t k, size_t *used, sp_error *e)
{
    int r = 0;
    for (size_t i = 0; i < n; i += k) {
        size_t len = n - i < k ? n - i : k;
        r = sp_proxy_feed(p, s + i, len, used, e);
        if (r != 0)
            return r;
        assert_int_equal(*used, len);
    }
    return r;
}

static void socks5_with_credentials(void **state)
{
    (void)state;
    for (size_t k = 1; k <= 12; k++) {
        sp_error e;
        sp_proxy *p = sp_proxy_new(SP_PROXY_SOCKS5, "smtp.example.net", "587", "me", "pw", &e);
        assert_non_null(p);
        take_out(p, "\x05\x02\x00\x02", 4);
        size_t used;
        assert_int_equal(feed(p, "\x05\x02", 2, k, &used, &e), 0);
        take_out(p, "\x01\x02me\x02pw", 7);
        assert_int_equal(feed(p, "\x01\x00", 2, k, &used, &e), 0);
        take_out(p, "\x05\x01\x00\x03\x10smtp.example.net\x02\x4b", 23);
        /* the reply (an IPv4 address) and, behind it, the server's greeting */
        const char reply[] = "\x05\x00\x00\x01\x7f\x00\x00\x01\x02\x4b" "220 hi\r\n";
        size_t total = sizeof reply - 1, i = 0;
        int r = 0;
        while (i < total) {
            size_t len = total - i < k ? total - i : k;
            r = sp_proxy_feed(p, reply + i, len, &used, &e);
            if (r == 1) {
                i += used;
                break;
            }
            i += len;
        }
        assert_int_equal(r, 1);
        assert_int_equal(i, 10); /* exactly the reply: the greeting is the target's */
        sp_proxy_free(p);
    }
}

static void socks5_refusals(void **state)
{
    (void)state;
    sp_error e;
    size_t used;
    sp_proxy *p = sp_proxy_new(SP_PROXY_SOCKS5, "h.test", "25", "me", "bad", &e);
    take_out(p, "\x05\x02\x00\x02", 4);
    assert_int_equal(sp_proxy_feed(p, "\x05\x02", 2, &used, &e), 0);
    sp_proxy_sent(p, 9);
    assert_int_equal(sp_proxy_feed(p, "\x01\x01", 2, &used, &e), -1);
    assert_int_equal(e.kind, SP_KIND_CONFIG);
    assert_null(strstr(e.text, "bad"));
    sp_proxy_free(p);
    p = sp_proxy_new(SP_PROXY_SOCKS5, "h.test", "25", NULL, NULL, &e);
    take_out(p, "\x05\x01\x00", 3);
    assert_int_equal(sp_proxy_feed(p, "\x05\x00", 2, &used, &e), 0);
    sp_proxy_sent(p, 100);
    assert_int_equal(sp_proxy_feed(p, "\x05\x05", 2, &used, &e), -1);
    assert_int_equal(e.kind, SP_KIND_CONNECTION);
    assert_non_null(strstr(e.text, "connection refused"));
    sp_proxy_free(p);
    p = sp_proxy_new(SP_PROXY_SOCKS5, "h.test", "25", NULL, NULL, &e);
    sp_proxy_sent(p, 3);
    assert_int_equal(sp_proxy_feed(p, "\x05\xff", 2, &used, &e), -1);
    assert_int_equal(e.kind, SP_KIND_CONFIG);
    sp_proxy_free(p);
    char longname[300];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    assert_null(sp_proxy_new(SP_PROXY_SOCKS5, longname, "25", NULL, NULL, &e));
    assert_int_equal(e.kind, SP_KIND_CONFIG);
}

static void http_connect(void **state)
{
    (void)state;
    sp_error e;
    size_t used;
    sp_proxy *p = sp_proxy_new(SP_PROXY_HTTP, "smtp.example.net", "587", "u", "p", &e);
    const char want[] = "CONNECT smtp.example.net:587 HTTP/1.1\r\nHost: smtp.example.net:587\r\n"
                        "Proxy-Authorization: Basic dTpw\r\n\r\n";
    take_out(p, want, sizeof want - 1);
    const char reply[] = "HTTP/1.1 200 Connection established\r\nX: y\r\n\r\n220 hi\r\n";
    assert_int_equal(sp_proxy_feed(p, reply, sizeof reply - 1, &used, &e), 1);
    assert_int_equal(used, sizeof reply - 1 - 8);
    sp_proxy_free(p);
    p = sp_proxy_new(SP_PROXY_HTTP, "h.test", "25", NULL, NULL, &e);
    sp_proxy_sent(p, 1000);
    const char no[] = "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n";
    assert_int_equal(feed(p, no, sizeof no - 1, 3, &used, &e), -1);
    assert_int_equal(e.kind, SP_KIND_CONFIG);
    assert_non_null(strstr(e.text, "407"));
    sp_proxy_free(p);
    p = sp_proxy_new(SP_PROXY_HTTP, "h.test", "25", NULL, NULL, &e);
    sp_proxy_sent(p, 1000);
    assert_int_equal(sp_proxy_feed(p, "SSH-2.0-x\r\n\r\n", 13, &used, &e), -1);
    assert_int_equal(e.kind, SP_KIND_CONNECTION);
    sp_proxy_free(p);
    /* a header that never ends is refused, not buffered without end */
    p = sp_proxy_new(SP_PROXY_HTTP, "h.test", "25", NULL, NULL, &e);
    sp_proxy_sent(p, 1000);
    char junk[1000];
    memset(junk, 'x', sizeof junk);
    int r = 0;
    for (int i = 0; i < 20 && r == 0; i++)
        r = sp_proxy_feed(p, junk, sizeof junk, &used, &e);
    assert_int_equal(r, -1);
    sp_proxy_free(p);
}

static void random_replies(void **state)
{
    (void)state;
    srand(7);
    for (int round = 0; round < 20000; round++) {
        sp_error e;
        sp_proxy *p = sp_proxy_new(round % 2 ? SP_PROXY_SOCKS5 : SP_PROXY_HTTP, "h.test", "25",
                                   round % 3 ? "u" : NULL, round % 3 ? "p" : NULL, &e);
        assert_non_null(p);
        for (int step = 0; step < 8; step++) {
            size_t n;
            sp_proxy_out(p, &n);
            sp_proxy_sent(p, n);
            char buf[64];
            size_t len = (size_t)(rand() % (int)sizeof buf);
            for (size_t i = 0; i < len; i++)
                buf[i] = (char)(rand() % 4 == 0 ? 5 : rand() % 256);
            size_t used = 0;
            int r = sp_proxy_feed(p, buf, len, &used, &e);
            assert_true(used <= len);
            if (r != 0)
                break;
        }
        sp_proxy_free(p);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(socks5_with_credentials),
        cmocka_unit_test(socks5_refusals),
        cmocka_unit_test(http_connect),
        cmocka_unit_test(random_replies),
    };
    return cmocka_run_group_tests_name("proxy", tests, NULL, NULL);
}
