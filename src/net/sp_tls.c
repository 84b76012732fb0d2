#include "sp_tls.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* How many of the server's newest tickets are kept for later connections. */
#define SP_TLS_KEEP 8

struct sp_tls_ctx {
    SSL_CTX *ctx;
    BIO_METHOD *sock; /* a socket BIO that writes with MSG_NOSIGNAL */
    SSL_SESSION *kept[SP_TLS_KEEP]; /* resumable sessions, oldest first */
    int nkept;
    int verify;
    unsigned long handshakes, resumed;
};

/* Keeps a copy of each new ticket's session, not the connection's own
 * object: when that connection later ends in a fatal TLS error (a peer
 * that resets after its 421, an EOF without close_notify), OpenSSL marks
 * the connection's session not resumable, though the server's ticket is as
 * good as ever.
 *
 * Several are kept because a TLS 1.3 ticket is good for one connection:
 * OpenSSL retires a session once a handshake has resumed it (RFC 8446 C.4
 * asks clients not to reuse tickets), and the tickets that connection earns
 * arrive only after its handshake. With a single kept session, a connection
 * opened in that gap had nothing to offer (under load, 4 of 10 reconnects
 * at a session cap of 2). Servers send one or two tickets a handshake, so
 * the newest few cover the connections a pool opens at once. */
static void keep_session(sp_tls_ctx *t, SSL_SESSION *s)
{
    if (t->nkept == SP_TLS_KEEP) {
        SSL_SESSION_free(t->kept[0]);
        memmove(t->kept, t->kept + 1, (SP_TLS_KEEP - 1) * sizeof t->kept[0]);
        t->nkept--;
    }
    t->kept[t->nkept++] = s;
}

static int new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
    sp_tls_ctx *t = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    if (!t || !SSL_SESSION_is_resumable(sess))
        return 0;
    SSL_SESSION *copy = SSL_SESSION_dup(sess);
    if (copy) /* else out of memory: this ticket goes unused */
        keep_session(t, copy);
    return 0; /* the connection's own reference is OpenSSL's to drop */
}

/* Offers the newest resumable session to a new connection. A TLS 1.3 one is
 * handed over for good (single use); a TLS 1.2 one serves every connection. */
static void offer_session(sp_tls_ctx *t, SSL *ssl)
{
    while (t->nkept > 0) {
        SSL_SESSION *s = t->kept[t->nkept - 1];
        if (!SSL_SESSION_is_resumable(s)) {
            SSL_SESSION_free(s);
            t->nkept--;
            continue;
        }
        SSL_set_session(ssl, s);
        if (SSL_SESSION_get_protocol_version(s) == TLS1_3_VERSION) {
            SSL_SESSION_free(s); /* the connection holds its own reference */
            t->nkept--;
        }
        return;
    }
}

/* The socket BIO OpenSSL would use (bss_sock.c), except that it writes with
 * MSG_NOSIGNAL: a peer that has gone away (a server that closed after a
 * 421) is an EPIPE for the writer, never a SIGPIPE that ends the process. */
static int sock_fd(BIO *b) { return (int)(intptr_t)BIO_get_data(b); }

static int sock_write(BIO *b, const char *buf, int len)
{
    errno = 0;
    ssize_t w = send(sock_fd(b), buf, (size_t)len, MSG_NOSIGNAL);
    BIO_clear_retry_flags(b);
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        BIO_set_retry_write(b);
    return (int)w;
}

static int sock_read(BIO *b, char *buf, int len)
{
    errno = 0;
    ssize_t r = recv(sock_fd(b), buf, (size_t)len, 0);
    BIO_clear_retry_flags(b);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        BIO_set_retry_read(b);
    else if (r == 0)
        BIO_set_flags(b, BIO_FLAGS_IN_EOF);
    return (int)r;
}

static long sock_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)num;
    switch (cmd) {
    case BIO_C_GET_FD:
        if (ptr)
            *(int *)ptr = sock_fd(b);
        return sock_fd(b);
    case BIO_CTRL_EOF: return BIO_test_flags(b, BIO_FLAGS_IN_EOF) != 0;
    case BIO_CTRL_FLUSH:
    case BIO_CTRL_DUP: return 1;
    default: return 0;
    }
}

static int sock_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

int sp_tls_set_fd(sp_tls_ctx *t, SSL *ssl, int fd)
{
    BIO *b = BIO_new(t->sock);
    if (!b)
        return -1;
    BIO_set_data(b, (void *)(intptr_t)fd);
    SSL_set_bio(ssl, b, b); /* one reference, taken by the SSL */
    return 0;
}

sp_tls_ctx *sp_tls_ctx_new(const sp_tls_opts *o, sp_error *err)
{
    char why[256];
    sp_error_clear(err);
    sp_tls_ctx *t = calloc(1, sizeof *t);
    if (!t) {
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "out of memory");
        return NULL;
    }
    t->ctx = SSL_CTX_new(TLS_client_method());
    if (!t->ctx)
        goto fail;
    t->sock = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR, "sp_socket");
    if (!t->sock || !BIO_meth_set_write(t->sock, sock_write) || !BIO_meth_set_read(t->sock, sock_read) ||
        !BIO_meth_set_ctrl(t->sock, sock_ctrl) || !BIO_meth_set_create(t->sock, sock_create))
        goto fail;
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
    SSL_CTX_set_app_data(t->ctx, t);
    SSL_CTX_set_session_cache_mode(t->ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(t->ctx, new_session_cb);
    SSL_CTX_set_mode(t->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    t->verify = !o->insecure_skip_verify;
    if (t->verify) {
        SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
        if (o->ca_file || o->ca_path) {
            if (SSL_CTX_load_verify_locations(t->ctx, o->ca_file, o->ca_path) != 1) {
                sp_openssl_reason(why, sizeof why);
                sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "cannot load CA %s: %s",
                             o->ca_file ? o->ca_file : o->ca_path, why);
                goto fail_set;
            }
        } else if (SSL_CTX_set_default_verify_paths(t->ctx) != 1) {
            sp_openssl_reason(why, sizeof why);
            sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "cannot load the system CA store: %s", why);
            goto fail_set;
        }
    } else {
        SSL_CTX_set_verify(t->ctx, SSL_VERIFY_NONE, NULL);
    }
    if (o->cert_file) {
        const char *key = o->key_file ? o->key_file : o->cert_file;
        if (SSL_CTX_use_certificate_chain_file(t->ctx, o->cert_file) != 1) {
            sp_openssl_reason(why, sizeof why);
            sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "cannot load client certificate %s: %s",
                         o->cert_file, why);
            goto fail_set;
        }
        if (SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(t->ctx) != 1) {
            sp_openssl_reason(why, sizeof why);
            sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "cannot use client key %s: %s", key, why);
            goto fail_set;
        }
    }
    return t;
fail:
    sp_openssl_reason(why, sizeof why);
    sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_NONE, "cannot make a TLS context: %s", why);
fail_set:
    sp_tls_ctx_free(t);
    return NULL;
}

void sp_tls_ctx_free(sp_tls_ctx *t)
{
    if (!t)
        return;
    for (int i = 0; i < t->nkept; i++)
        SSL_SESSION_free(t->kept[i]);
    SSL_CTX_free(t->ctx);
    BIO_meth_free(t->sock);
    free(t);
}

SSL *sp_tls_new_ssl(sp_tls_ctx *t, const char *server_name, sp_error *err)
{
    char why[256];
    SSL *ssl = SSL_new(t->ctx);
    if (!ssl) {
        sp_openssl_reason(why, sizeof why);
        sp_error_set(err, SP_KIND_TLS, SP_PHASE_STARTTLS, "SSL_new: %s", why);
        return NULL;
    }
    if (server_name && *server_name) {
        /* SNI only for names: RFC 6066 forbids IP literals in server_name. */
        int is_ip = 0;
        ASN1_OCTET_STRING *ip = a2i_IPADDRESS(server_name);
        if (ip) {
            is_ip = 1;
            ASN1_OCTET_STRING_free(ip);
        }
        if (!is_ip)
            SSL_set_tlsext_host_name(ssl, server_name);
        if (t->verify) {
            X509_VERIFY_PARAM *vp = SSL_get0_param(ssl);
            X509_VERIFY_PARAM_set_hostflags(vp, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
            int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(vp, server_name) : SSL_set1_host(ssl, server_name);
            if (ok != 1) {
                SSL_free(ssl);
                sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_STARTTLS, "cannot check host name '%s'", server_name);
                return NULL;
            }
        }
    }
    offer_session(t, ssl);
    return ssl;
}

void sp_tls_note_handshake(sp_tls_ctx *t, SSL *ssl)
{
    t->handshakes++;
    if (SSL_session_reused(ssl))
        t->resumed++;
}

unsigned long sp_tls_resumed(const sp_tls_ctx *t) { return t->resumed; }
unsigned long sp_tls_handshakes(const sp_tls_ctx *t) { return t->handshakes; }

void sp_tls_error(sp_error *err, sp_phase phase, const char *what, SSL *ssl, int ret)
{
    char why[256];
    int e = ssl ? SSL_get_error(ssl, ret) : SSL_ERROR_SSL;
    long vr = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    if (vr != X509_V_OK) {
        sp_error_set(err, SP_KIND_TLS, phase, "%s: certificate verification failed: %s", what,
                     X509_verify_cert_error_string(vr));
        ERR_clear_error();
        return;
    }
    if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
        sp_error_set(err, SP_KIND_TLS, phase, "%s: connection closed during the TLS handshake", what);
        return;
    }
    sp_openssl_reason(why, sizeof why);
    sp_error_set(err, SP_KIND_TLS, phase, "%s: %s", what, why);
}
