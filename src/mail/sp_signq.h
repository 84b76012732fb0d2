/* sp_signq: DKIM signing on a small pool of worker threads, off the loop.
 *
 * The loop submits jobs (a message, a key, the signature's fields) and goes
 * on serving sockets; workers sign and post results; an eventfd becomes
 * readable when results wait, so the loop's poll wakes for them. Workers
 * touch only the job they hold (a private copy of the message) and the key,
 * which signing only reads: no Lua state, no socket, no session.
 *
 * A job holds its own reference on its key (sp_dkim_key_ref), so whoever
 * loaded the key may free it while the job waits or runs. */
#ifndef SP_SIGNQ_H
#define SP_SIGNQ_H

#include <stddef.h>
#include <stdint.h>

#include "sp_buf.h"
#include "sp_dkim.h"
#include "sp_error.h"

typedef struct sp_signq sp_signq;

/* Starts nthreads workers (1..64). NULL with *err (kind config) when a
 * thread or the eventfd cannot be made. */
sp_signq *sp_signq_new(int nthreads, sp_error *err);
/* Stops the workers (each finishes the job it holds) and drops every job
 * and result not taken. */
void sp_signq_free(sp_signq *q);

/* The eventfd: readable while results wait to be taken. */
int sp_signq_fd(const sp_signq *q);
int sp_signq_threads(const sp_signq *q);

typedef struct sp_sign_job {
    uint64_t id;
    const sp_dkim_key *key;
    const char *domain, *selector;
    const char *headers; /* colon-separated names, or NULL for the default set */
    long long t;         /* signing time, 0 for none */
    const char *msg;     /* the whole message: copied */
    size_t len;
} sp_sign_job;

/* Queues a job (its strings are copied, its key referenced). -1 when
 * memory runs out. */
int sp_signq_submit(sp_signq *q, const sp_sign_job *job);

typedef struct sp_sign_result {
    uint64_t id;
    int ok;      /* 1: sig holds "DKIM-Signature: ..." CRLF; 0: err says why */
    sp_buf sig;
    sp_error err;
} sp_sign_result;

/* Takes up to max finished results, oldest first, without blocking; the
 * caller frees each one's sig (sp_buf_free). Returns how many. */
size_t sp_signq_take(sp_signq *q, sp_sign_result *out, size_t max);
/* Jobs submitted and not yet taken as results. */
size_t sp_signq_pending(const sp_signq *q);

#endif
