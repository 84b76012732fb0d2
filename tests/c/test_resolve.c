/* Resolving without blocking (sp_resolve): an address and a name in
 * /etc/hosts known at once, a bad server list refused as configuration, and
 * a lookup whose DNS server refuses it ending, through the sockets it gives
 * to poll, as a connection error (run under ASan by make sanitize, and
 * valgrind). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <unistd.h>

#include "sp_resolve.h"

static void an_address_is_known_at_once(void **state)
{
    (void)state;
    sp_error e;
    sp_resolve *r = sp_resolve_new("127.0.0.1", "25", NULL, &e);
    assert_non_null(r);
    assert_true(sp_resolve_done(r));
    assert_int_equal(sp_resolve_result(r, &e), 0);
    assert_int_equal(sp_resolve_count(r), 1);
    socklen_t len;
    const struct sockaddr_in *sa = (const struct sockaddr_in *)sp_resolve_addr(r, 0, &len);
    assert_non_null(sa);
    assert_int_equal(sa->sin_family, AF_INET);
    assert_int_equal(ntohs(sa->sin_port), 25);
    assert_null(sp_resolve_addr(r, 1, &len));
    struct pollfd p[SP_RESOLVE_MAX_FDS];
    assert_int_equal(sp_resolve_pollfds(r, p, SP_RESOLVE_MAX_FDS), 0);
    assert_true(sp_resolve_timeout(r) < 0);
    sp_resolve_free(r);
    r = sp_resolve_new("::1", "587", NULL, &e);
    assert_non_null(r);
    assert_int_equal(sp_resolve_result(r, &e), 0);
    assert_int_equal(sp_resolve_addr(r, 0, &len)->sa_family, AF_INET6);
    sp_resolve_free(r);
}

static void localhost_comes_from_etc_hosts(void **state)
{
    (void)state;
    sp_error e;
    /* a server nobody answers on: /etc/hosts must answer first */
    sp_resolve *r = sp_resolve_new("localhost", "6379", "127.0.0.1:9", &e);
    assert_non_null(r);
    assert_true(sp_resolve_done(r));
    assert_int_equal(sp_resolve_result(r, &e), 0);
    assert_true(sp_resolve_count(r) >= 1);
    sp_resolve_free(r);
}

static void a_bad_server_list_is_configuration(void **state)
{
    (void)state;
    sp_error e;
    assert_null(sp_resolve_new("mail.example.test", "25", "not an address", &e));
    assert_int_equal(e.kind, SP_KIND_CONFIG);
    assert_non_null(strstr(e.text, "resolver"));
}

/* A DNS server port with nobody on it: the lookup's UDP query is refused,
 * which the sockets to poll and the retransmit time must bring to an end. */
static void a_refused_lookup_ends_as_a_connection_error(void **state)
{
    (void)state;
    sp_error e;
    sp_resolve *r = sp_resolve_new("mail.example.test", "25", "127.0.0.1:9", &e);
    assert_non_null(r);
    for (int turn = 0; turn < 200 && !sp_resolve_done(r); turn++) {
        struct pollfd p[SP_RESOLVE_MAX_FDS];
        int n = sp_resolve_pollfds(r, p, SP_RESOLVE_MAX_FDS);
        double t = sp_resolve_timeout(r);
        int ms = t < 0 || t > 0.05 ? 50 : (int)(t * 1000) + 1;
        if (poll(p, (nfds_t)n, ms) > 0) {
            for (int k = 0; k < n; k++)
                if (p[k].revents)
                    sp_resolve_process(r, p[k].fd, p[k].revents);
        } else {
            sp_resolve_process(r, -1, 0);
        }
    }
    assert_true(sp_resolve_done(r));
    assert_int_equal(sp_resolve_result(r, &e), -1);
    assert_int_equal(e.kind, SP_KIND_CONNECTION);
    assert_non_null(strstr(e.text, "cannot resolve mail.example.test port 25"));
    sp_resolve_free(r);
}

/* Freed while under way: the lookup is cancelled, nothing leaks. */
static void a_lookup_under_way_can_be_freed(void **state)
{
    (void)state;
    sp_error e;
    sp_resolve *r = sp_resolve_new("mail.example.test", "25", "127.0.0.1:9", &e);
    assert_non_null(r);
    sp_resolve_free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(an_address_is_known_at_once),
        cmocka_unit_test(localhost_comes_from_etc_hosts),
        cmocka_unit_test(a_bad_server_list_is_configuration),
        cmocka_unit_test(a_refused_lookup_ends_as_a_connection_error),
        cmocka_unit_test(a_lookup_under_way_can_be_freed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
