/* sp_pump: feeds a transaction's body into its session, in bounded bites,
 * and runs the dot hook at the last moment before the final dot is queued.
 * Used by sp_conn (the native driver) and by the binding's socketless
 * session (the OpenResty driver): one rule for both. */
#ifndef SP_PUMP_H
#define SP_PUMP_H

#include "sp_body.h"
#include "sp_error.h"
#include "sp_session.h"

/* Body bytes stuffed per step: bounds a session's output buffer. */
#define SP_BODY_CHUNK 65536

/* Called once per transaction when the whole body has been fed, just
 * before the final dot is queued: the last moment the message certainly has
 * not been committed (a campaign journals "leaving" here). A hook that
 * returns -1 with *err set ends the connection before the dot leaves. */
typedef int (*sp_dot_hook)(void *ud, sp_error *err);

/* Feeds the body from *body into the session while its output holds less
 * than 64 KB; when the body ends, runs *hook once (cleared first) and queues
 * the final dot. On a failure (an unreadable file, a hook that fails) the
 * session is failed before the dot. sp_conn's pump, and the binding's
 * socketless session's (the OpenResty driver). */
void sp_body_pump(sp_session *s, sp_body_src **body, sp_dot_hook *hook, void *hook_ud);

#endif
