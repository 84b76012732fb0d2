#include "sp_body.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sp_buf.h"
#include "sp_mime.h"

#define FILE_CHUNK 49152 /* a multiple of 3: whole base64 quads per read */

struct sp_body_src {
    sp_body_seg *segs;
    size_t nseg, i;
    int fd;
    int done_seg; /* the current memory segment was returned */
    sp_b64_stream b64;
    sp_buf tmp;
    unsigned char *rbuf;
};

sp_body_src *sp_body_src_new(const sp_body_seg *segs, size_t nseg)
{
    sp_body_src *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->fd = -1;
    s->segs = calloc(nseg ? nseg : 1, sizeof *s->segs);
    if (!s->segs) {
        free(s);
        return NULL;
    }
    s->nseg = nseg;
    for (size_t i = 0; i < nseg; i++) {
        s->segs[i] = segs[i];
        if (segs[i].path && !(s->segs[i].path = strdup(segs[i].path))) {
            s->nseg = i;
            sp_body_src_free(s);
            return NULL;
        }
    }
    sp_buf_init(&s->tmp);
    return s;
}

void sp_body_src_free(sp_body_src *s)
{
    if (!s)
        return;
    if (s->fd >= 0)
        close(s->fd);
    for (size_t i = 0; i < s->nseg; i++)
        free((char *)s->segs[i].path);
    free(s->segs);
    free(s->rbuf);
    sp_buf_free(&s->tmp);
    free(s);
}

static int file_error(sp_error *err, const char *path, const char *what)
{
    sp_error_set(err, SP_KIND_INVALID, SP_PHASE_DATA, "attachment %s: %s: %s", path, what, strerror(errno));
    return -1;
}

int sp_body_src_next(sp_body_src *s, const char **p, size_t *n, sp_error *err)
{
    while (s->i < s->nseg) {
        sp_body_seg *g = &s->segs[s->i];
        if (!g->path) {
            if (s->done_seg || g->n == 0) {
                s->done_seg = 0;
                s->i++;
                continue;
            }
            s->done_seg = 1;
            *p = g->p;
            *n = g->n;
            return 1;
        }
        if (s->fd < 0) {
            s->fd = open(g->path, O_RDONLY | O_CLOEXEC);
            if (s->fd < 0)
                return file_error(err, g->path, "open");
            sp_b64_stream_init(&s->b64);
            if (!s->rbuf && !(s->rbuf = malloc(FILE_CHUNK))) {
                sp_error_set(err, SP_KIND_INVALID, SP_PHASE_DATA, "out of memory");
                return -1;
            }
        }
        sp_buf_reset(&s->tmp);
        ssize_t r;
        do
            r = read(s->fd, s->rbuf, FILE_CHUNK);
        while (r < 0 && errno == EINTR);
        if (r < 0)
            return file_error(err, g->path, "read");
        int rc = r > 0 ? sp_b64_stream_feed(&s->b64, s->rbuf, (size_t)r, &s->tmp)
                       : sp_b64_stream_finish(&s->b64, &s->tmp);
        if (rc < 0) {
            sp_error_set(err, SP_KIND_INVALID, SP_PHASE_DATA, "out of memory");
            return -1;
        }
        if (r == 0) {
            close(s->fd);
            s->fd = -1;
            s->i++;
        }
        if (sp_buf_pending(&s->tmp)) {
            *p = sp_buf_head(&s->tmp);
            *n = sp_buf_pending(&s->tmp);
            return 1;
        }
    }
    return 0;
}

int sp_body_segs_size(const sp_body_seg *segs, size_t nseg, unsigned long long *size, sp_error *err)
{
    unsigned long long t = 0;
    for (size_t i = 0; i < nseg; i++) {
        if (!segs[i].path) {
            t += segs[i].n;
            continue;
        }
        struct stat st;
        if (stat(segs[i].path, &st) < 0)
            return file_error(err, segs[i].path, "stat");
        unsigned long long chars = ((unsigned long long)st.st_size + 2) / 3 * 4;
        t += chars + (chars + 75) / 76 * 2;
    }
    *size = t;
    return 0;
}
