/* A minimal, fast SMTP sink for benchmarks: accepts every message and
 * forgets it. One poll loop; PIPELINING offered, and CHUNKING (BDAT) when
 * started as `sink chunking`. Prints "PORT n" once it listens on 127.0.0.1.
 * Not for tests of correctness: see tests/support. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 256
typedef struct {
    int fd, in_data;
    size_t skip; /* BDAT bytes still to come */
    char buf[65536];
    size_t len;
    char out[8192];
    size_t olen;
} conn;

static void reply(conn *c, const char *s)
{
    size_t n = strlen(s);
    if (c->olen + n < sizeof c->out) {
        memcpy(c->out + c->olen, s, n);
        c->olen += n;
    }
}

static int chunking;

static int handle_line(conn *c, const char *l, size_t n)
{
    if (c->in_data) {
        if (n == 1 && l[0] == '.') {
            c->in_data = 0;
            reply(c, "250 2.0.0 OK\r\n");
        }
        return 0;
    }
    if (n >= 4 && !strncasecmp(l, "EHLO", 4))
        reply(c, chunking ? "250-sink\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"
                          : "250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n");
    else if (chunking && n >= 5 && !strncasecmp(l, "BDAT ", 5)) {
        c->skip = strtoul(l + 5, NULL, 10);
        if (!c->skip)
            reply(c, "250 2.0.0 OK\r\n");
    }
    else if (n >= 4 && !strncasecmp(l, "HELO", 4))
        reply(c, "250 sink\r\n");
    else if (n >= 4 && !strncasecmp(l, "DATA", 4)) {
        c->in_data = 1;
        reply(c, "354 go\r\n");
    } else if (n >= 4 && !strncasecmp(l, "QUIT", 4)) {
        reply(c, "221 bye\r\n");
        return 1;
    } else
        reply(c, "250 OK\r\n");
    return 0;
}

int main(int argc, char **argv)
{
    chunking = argc > 1 && !strcmp(argv[1], "chunking");
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 128) < 0)
        return perror("listen"), 1;
    getsockname(ls, (struct sockaddr *)&a, &al);
    printf("PORT %d\n", ntohs(a.sin_port));
    fflush(stdout);
    static conn cs[MAXC];
    int nc = 0;
    struct pollfd pf[MAXC + 1];
    for (;;) {
        pf[0].fd = ls;
        pf[0].events = POLLIN;
        for (int i = 0; i < nc; i++) {
            pf[i + 1].fd = cs[i].fd;
            pf[i + 1].events = POLLIN;
        }
        if (poll(pf, (nfds_t)nc + 1, -1) < 0 && errno != EINTR)
            return 1;
        if ((pf[0].revents & POLLIN) && nc < MAXC) {
            int fd = accept(ls, NULL, NULL);
            if (fd >= 0) {
                memset(&cs[nc], 0, sizeof cs[nc]);
                cs[nc].fd = fd;
                reply(&cs[nc], "220 sink ESMTP\r\n");
                write(fd, cs[nc].out, cs[nc].olen);
                cs[nc].olen = 0;
                nc++;
            }
        }
        for (int i = 0; i < nc; i++) {
            if (!(pf[i + 1].revents & (POLLIN | POLLHUP | POLLERR)) || pf[i + 1].fd != cs[i].fd)
                continue;
            conn *c = &cs[i];
            ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
            int quit = r <= 0;
            if (r > 0) {
                c->len += (size_t)r;
                size_t st = 0, k = 0;
                while (k < c->len) {
                    if (c->skip) { /* a BDAT chunk's bytes */
                        size_t m = c->len - st < c->skip ? c->len - st : c->skip;
                        st += m;
                        c->skip -= m;
                        k = st;
                        if (!c->skip)
                            reply(c, "250 2.0.0 OK\r\n");
                        continue;
                    }
                    if (c->buf[k] == '\n') {
                        size_t e = k > st && c->buf[k - 1] == '\r' ? k - 1 : k;
                        quit |= handle_line(c, c->buf + st, e - st);
                        st = k + 1;
                    }
                    k++;
                }
                memmove(c->buf, c->buf + st, c->len - st);
                c->len -= st;
                if (c->len == sizeof c->buf)
                    c->len = 0; /* an overlong line: drop it */
                if (c->olen)
                    write(c->fd, c->out, c->olen);
                c->olen = 0;
            }
            if (quit) {
                close(c->fd);
                cs[i] = cs[--nc];
                i--;
            }
        }
    }
}
