/* sp_pump: a transaction's body fed into its session (see sp_pump.h). */
#include "sp_pump.h"

void sp_body_pump(sp_session *s, sp_body_src **body, sp_dot_hook *hook, void *hook_ud)
{
    sp_error e;
    while (sp_session_state(s) == SP_ST_BODY && sp_buf_pending(sp_session_output(s)) < SP_BODY_CHUNK) {
        if (!*body) {
            sp_error_set(&e, SP_KIND_INVALID, SP_PHASE_DATA, "no message body was given");
            sp_session_fail(s, &e);
            return;
        }
        const char *p;
        size_t n;
        int r = sp_body_src_next(*body, &p, &n, &e);
        if (r < 0) {
            /* Cannot finish the body: drop the connection before the dot so
             * the server discards the partial message. */
            sp_session_fail(s, &e);
            return;
        }
        if (r == 0) {
            sp_body_src_free(*body);
            *body = NULL;
            if (*hook) {
                sp_dot_hook fn = *hook;
                *hook = NULL;
                if (fn(hook_ud, &e) < 0) {
                    sp_session_fail(s, &e);
                    return;
                }
            }
            sp_session_body_end(s, &e);
            return;
        }
        while (n > 0) { /* bounded bites keep the output buffer near SP_BODY_CHUNK */
            size_t k = n < SP_BODY_CHUNK ? n : SP_BODY_CHUNK;
            if (sp_session_body(s, p, k, &e) < 0)
                return;
            p += k;
            n -= k;
        }
    }
}
