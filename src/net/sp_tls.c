#include "sp_tls.h"

#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct sp_tls_ctx {
    SSL_CTX *ctx;
    SSL_SESSION *session; /* newest resumable session, or NULL */
    int verify;
    unsigned long handshakes, resumed;
};

static int new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
    sp_tls_ctx *t = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    if (!t || !SSL_SESSION_is_resumable(sess))
        return 0;
    if (t->session)
        SSL_SESSION_free(t->session);
    t->session = sess;
    return 1; /* we keep the reference */
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
    if (t->session)
        SSL_SESSION_free(t->session);
    SSL_CTX_free(t->ctx);
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
    if (t->session && SSL_SESSION_is_resumable(t->session))
        SSL_set_session(ssl, t->session);
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
