/* sp_signq: DKIM signing on worker threads (see sp_signq.h). */
#include "sp_signq.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct node {
    struct node *next;
    sp_sign_job job; /* its strings point into buf, its key is ref */
    char *buf;
    sp_dkim_key *ref;
    sp_sign_result res;
} node;

struct sp_signq {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    node *jobs, *jobs_tail;       /* waiting for a worker */
    node *done, *done_tail;       /* results waiting for the loop */
    int stopping;
    int efd;
    int nthreads;
    pthread_t threads[64];
    size_t pending; /* submitted and not yet taken: only the loop's thread touches it */
};

/* Makes the eventfd readable: results wait. */
static void notify(sp_signq *q)
{
    uint64_t one = 1;
    ssize_t w;
    do
        w = write(q->efd, &one, sizeof one);
    while (w < 0 && errno == EINTR);
}

static void *worker(void *arg)
{
    sp_signq *q = arg;
    for (;;) {
        pthread_mutex_lock(&q->mu);
        while (!q->jobs && !q->stopping)
            pthread_cond_wait(&q->cv, &q->mu);
        if (q->stopping) {
            pthread_mutex_unlock(&q->mu);
            return NULL;
        }
        node *n = q->jobs;
        q->jobs = n->next;
        if (!q->jobs)
            q->jobs_tail = NULL;
        pthread_mutex_unlock(&q->mu);

        const sp_sign_job *j = &n->job;
        sp_buf_init(&n->res.sig);
        sp_error_clear(&n->res.err);
        n->res.id = j->id;
        n->res.ok = sp_dkim_sign(j->key, j->domain, j->selector, j->headers, j->t, j->msg, j->len, &n->res.sig,
                                 &n->res.err) == 0;
        free(n->buf); /* the message copy and the key are not needed any more */
        n->buf = NULL;
        sp_dkim_key_free(n->ref);
        n->ref = NULL;
        n->next = NULL;

        pthread_mutex_lock(&q->mu);
        int was_empty = q->done == NULL;
        if (q->done_tail)
            q->done_tail->next = n;
        else
            q->done = n;
        q->done_tail = n;
        pthread_mutex_unlock(&q->mu);
        /* One wake-up for a run of results: the loop drains the whole list
         * when it takes (a result added after its drain finds the list empty
         * and notifies again). */
        if (was_empty)
            notify(q);
    }
}

static void free_list(node *n)
{
    while (n) {
        node *next = n->next;
        free(n->buf);
        sp_dkim_key_free(n->ref);
        sp_buf_free(&n->res.sig);
        free(n);
        n = next;
    }
}

sp_signq *sp_signq_new(int nthreads, sp_error *err)
{
    if (nthreads < 1 || nthreads > 64) {
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "sign threads must be 1 to 64, got %d", nthreads);
        return NULL;
    }
    sp_signq *q = calloc(1, sizeof *q);
    if (!q) {
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "out of memory");
        return NULL;
    }
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "eventfd: %s", strerror(errno));
        free(q);
        return NULL;
    }
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    for (int i = 0; i < nthreads; i++) {
        int rc = pthread_create(&q->threads[i], NULL, worker, q);
        if (rc != 0) {
            sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "cannot start a signing thread: %s", strerror(rc));
            sp_signq_free(q);
            return NULL;
        }
        q->nthreads = i + 1;
    }
    return q;
}

void sp_signq_free(sp_signq *q)
{
    if (!q)
        return;
    pthread_mutex_lock(&q->mu);
    q->stopping = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
    for (int i = 0; i < q->nthreads; i++)
        pthread_join(q->threads[i], NULL);
    free_list(q->jobs);
    free_list(q->done);
    pthread_cond_destroy(&q->cv);
    pthread_mutex_destroy(&q->mu);
    close(q->efd);
    free(q);
}

int sp_signq_fd(const sp_signq *q) { return q->efd; }

int sp_signq_threads(const sp_signq *q) { return q->nthreads; }

size_t sp_signq_pending(const sp_signq *q) { return q->pending; }

static char *copy_into(char **p, const char *s, size_t n)
{
    char *d = *p;
    memcpy(d, s, n);
    d[n] = '\0';
    *p += n + 1;
    return d;
}

int sp_signq_submit(sp_signq *q, const sp_sign_job *job)
{
    size_t ld = strlen(job->domain), ls = strlen(job->selector), lh = job->headers ? strlen(job->headers) : 0;
    node *n = calloc(1, sizeof *n);
    if (!n)
        return -1;
    n->buf = malloc(ld + ls + lh + job->len + 4);
    if (!n->buf) {
        free(n);
        return -1;
    }
    char *p = n->buf;
    n->job = *job;
    n->ref = sp_dkim_key_ref(job->key);
    n->job.key = n->ref;
    if (!n->ref) {
        free(n->buf);
        free(n);
        return -1;
    }
    n->job.domain = copy_into(&p, job->domain, ld);
    n->job.selector = copy_into(&p, job->selector, ls);
    n->job.headers = job->headers ? copy_into(&p, job->headers, lh) : NULL;
    n->job.msg = copy_into(&p, job->msg, job->len);
    pthread_mutex_lock(&q->mu);
    if (q->jobs_tail)
        q->jobs_tail->next = n;
    else
        q->jobs = n;
    q->jobs_tail = n;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    q->pending++;
    return 0;
}

size_t sp_signq_take(sp_signq *q, sp_sign_result *out, size_t max)
{
    uint64_t v;
    while (read(q->efd, &v, sizeof v) < 0 && errno == EINTR) {
    }
    size_t k = 0;
    pthread_mutex_lock(&q->mu);
    while (k < max && q->done) {
        node *n = q->done;
        q->done = n->next;
        if (!q->done)
            q->done_tail = NULL;
        out[k++] = n->res; /* the caller owns sig now */
        free(n);
    }
    int more = q->done != NULL;
    pthread_mutex_unlock(&q->mu);
    if (more) /* results left behind (max reached): stay readable */
        notify(q);
    q->pending -= k;
    return k;
}
