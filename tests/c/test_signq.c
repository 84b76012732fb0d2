/* sp_signq: DKIM signing on worker threads. Every job gets its own result,
 * the key may be freed while jobs still hold it, and a queue freed with
 * jobs pending loses nothing but those jobs (no leak, no crash). */
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "sp_signq.h"

/* A fresh Ed25519 key as PEM text. */
static char *ed25519_pem(void)
{
    EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    assert_non_null(pk);
    BIO *b = BIO_new(BIO_s_mem());
    assert_int_equal(PEM_write_bio_PrivateKey(b, pk, NULL, NULL, 0, NULL, NULL), 1);
    char *p;
    long n = BIO_get_mem_data(b, &p);
    char *out = malloc((size_t)n + 1);
    memcpy(out, p, (size_t)n);
    out[n] = 0;
    BIO_free(b);
    EVP_PKEY_free(pk);
    return out;
}

static void every_job_its_result(void **state)
{
    (void)state;
    char *pem = ed25519_pem();
    sp_error e;
    sp_dkim_key *k = sp_dkim_key_new(pem, strlen(pem), SP_DKIM_ED25519_SHA256, &e);
    assert_non_null(k);
    sp_signq *q = sp_signq_new(3, &e);
    assert_non_null(q);
    assert_int_equal(sp_signq_threads(q), 3);
    enum { N = 200 };
    char msg[128];
    for (int i = 0; i < N; i++) {
        snprintf(msg, sizeof msg, "From: a@x.test\r\nSubject: %d\r\n\r\nbody %d\r\n", i, i);
        sp_sign_job j = {.id = (uint64_t)i + 1, .key = k, .domain = "x.test", .selector = "s1",
                         .headers = NULL, .t = 1, .msg = msg, .len = strlen(msg)};
        assert_int_equal(sp_signq_submit(q, &j), 0);
        if (i == N / 2) { /* the loader lets go of the key: the jobs hold their own */
            sp_dkim_key_free(k);
            k = sp_dkim_key_new(pem, strlen(pem), SP_DKIM_ED25519_SHA256, &e);
            assert_non_null(k);
        }
    }
    assert_int_equal(sp_signq_pending(q), N);
    int seen[N + 1] = {0};
    size_t got = 0;
    while (got < N) {
        struct pollfd p = {.fd = sp_signq_fd(q), .events = POLLIN};
        assert_true(poll(&p, 1, 10000) == 1);
        sp_sign_result rs[16];
        size_t n = sp_signq_take(q, rs, 16);
        for (size_t i = 0; i < n; i++) {
            assert_true(rs[i].ok);
            assert_true(rs[i].id >= 1 && rs[i].id <= N);
            assert_int_equal(seen[rs[i].id], 0);
            seen[rs[i].id] = 1;
            assert_non_null(strstr(sp_buf_head(&rs[i].sig), "DKIM-Signature: v=1; a=ed25519-sha256"));
            sp_buf_free(&rs[i].sig);
        }
        got += n;
    }
    assert_int_equal(sp_signq_pending(q), 0);
    sp_signq_free(q);
    sp_dkim_key_free(k);
    free(pem);
}

static void freed_with_jobs_pending(void **state)
{
    (void)state;
    char *pem = ed25519_pem();
    sp_error e;
    sp_dkim_key *k = sp_dkim_key_new(pem, strlen(pem), SP_DKIM_ED25519_SHA256, &e);
    sp_signq *q = sp_signq_new(1, &e);
    assert_non_null(q);
    const char *m = "From: a@x.test\r\n\r\nx\r\n";
    for (int i = 0; i < 50; i++) {
        sp_sign_job j = {.id = (uint64_t)i, .key = k, .domain = "x.test", .selector = "s", .msg = m, .len = strlen(m)};
        assert_int_equal(sp_signq_submit(q, &j), 0);
    }
    sp_dkim_key_free(k);
    sp_signq_free(q); /* workers stop after the job in hand; the rest are dropped */
    free(pem);
}

static void bad_thread_count(void **state)
{
    (void)state;
    sp_error e;
    assert_null(sp_signq_new(0, &e));
    assert_int_equal(e.kind, SP_KIND_CONFIG);
    assert_null(sp_signq_new(65, &e));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_job_its_result),
        cmocka_unit_test(freed_with_jobs_pending),
        cmocka_unit_test(bad_thread_count),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
