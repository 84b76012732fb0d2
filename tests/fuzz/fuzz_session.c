/* libFuzzer target: arbitrary server bytes into the protocol machine.
 *
 * The input is split at random points (the first byte seeds the split
 * lengths and the BDAT window, 0-7) and fed to a session that starts a
 * transaction whenever it is ready or offers the next one (up to six), feeds
 * each body and quits at the end. Any crash, leak, sanitizer report or hang
 * is a bug; every outcome must be an event. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "sp_reply.h"
#include "sp_session.h"

static void drain(sp_session *s, int *started)
{
    sp_event e;
    sp_error err;
    while ((e = sp_session_next_event(s)) != SP_EV_NONE) {
        if ((e == SP_EV_READY || e == SP_EV_NEXT) && *started < 6) {
            const char *rc[] = {"b@y.test", "c@y.test"};
            sp_tx_opts o = {.from = "a@x.test", .rcpts = rc, .nrcpt = 2, .size = 10};
            *started += sp_session_start_tx(s, &o, &err) == 0;
        } else if (e == SP_EV_BODY) {
            sp_session_body(s, ".x\n", 3, &err);
            sp_session_body(s, "\r\n..y", 5, &err);
            sp_session_body_end(s, &err);
        } else if (e == SP_EV_TX_DONE) {
            sp_session_tx_done(s);
        }
    }
    sp_session_consume(s, sp_buf_pending(sp_session_output(s)));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    unsigned seed = data[0];
    data++;
    size--;
    sp_session_opts so = {0};
    so.bdat_window = (int)(seed & 7);
    sp_session *s = sp_session_new(&so);
    int started = 0;
    size_t off = 0;
    while (off < size) {
        seed = seed * 1103515245u + 12345u;
        size_t n = 1 + (seed >> 16) % 64;
        if (n > size - off)
            n = size - off;
        sp_session_feed(s, (const char *)data + off, n);
        drain(s, &started);
        off += n;
    }
    sp_session_eof(s);
    drain(s, &started);
    sp_session_free(s);

    /* the reply reader alone, whole input at once */
    sp_reply_reader *r = sp_reply_reader_new();
    sp_reply_reader_feed(r, (const char *)data, size);
    sp_reply rep;
    memset(&rep, 0, sizeof rep);
    while (sp_reply_reader_next(r, &rep) == SP_REPLY_OK)
        sp_reply_clear(&rep);
    sp_reply_reader_free(r);
    return 0;
}
