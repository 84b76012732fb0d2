#include "sp_journal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "sp_buf.h"

enum { Q_GET, Q_MEET, Q_MERGE, Q_LOG, Q_CLEAR, Q_COUNTS, Q_STATES, Q_BEGIN, Q_COMMIT, Q_COUNT_ };

static const char *const queries[Q_COUNT_] = {
    [Q_GET] = "SELECT state, run FROM recipients WHERE address = ?1",
    [Q_MEET] = "UPDATE recipients SET run = ?2 WHERE address = ?1",
    /* the merge: each key's latest record, in the keys' order, read from
     * the pending map itself (see pend_module): about 6,500 instructions a
     * key, where an upsert statement a key cost 9,000 and one statement
     * over a JSON array 18,000 */
    [Q_MERGE] = "INSERT INTO recipients(address, state, info, run, updated)"
                " SELECT address, state, info, run, updated FROM sp_pending WHERE true"
                " ON CONFLICT(address) DO UPDATE SET state = excluded.state, info = excluded.info,"
                " run = excluded.run, updated = excluded.updated",
    /* a commit's records, one row appended to the log */
    [Q_LOG] = "INSERT INTO log(run, records) VALUES (?1, ?2)",
    [Q_CLEAR] = "DELETE FROM log",
    [Q_COUNTS] = "SELECT state, count(*) FROM latest GROUP BY state",
    /* a writer's count, once its log is merged (see sp_journal_counts) */
    [Q_STATES] = "SELECT state, 1 FROM recipients",
    /* prepared too: a transaction per loop turn should not parse SQL */
    [Q_BEGIN] = "BEGIN",
    [Q_COMMIT] = "COMMIT",
};

static const sqlite3_module pend_module; /* sp_pending, the merge's source (below) */

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS recipients(address TEXT PRIMARY KEY, state TEXT NOT NULL,"
    " info TEXT NOT NULL DEFAULT '', run INTEGER NOT NULL, updated REAL NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS runs(id INTEGER PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL,"
    " started REAL NOT NULL, ended REAL);";

/* Version 4: each commit appends its records to the log, one row holding a
 * JSON array of [state, address, info, updated]; the log is merged into
 * recipients in batches (see merge_pending). The view logged is the log a
 * record a row, and latest each recipient's last record across both: what
 * readers count. */
static const char schema_log[] =
    "CREATE TABLE IF NOT EXISTS log(seq INTEGER PRIMARY KEY, run INTEGER NOT NULL, records TEXT NOT NULL);"
    "CREATE VIEW IF NOT EXISTS logged(seq, item, address, state, info, run, updated) AS"
    " SELECT log.seq, r.key, json_extract(r.value, '$[1]'), json_extract(r.value, '$[0]'),"
    "  json_extract(r.value, '$[2]'), log.run, json_extract(r.value, '$[3]')"
    " FROM log, json_each(log.records) AS r;"
    "CREATE VIEW IF NOT EXISTS latest(address, state, info, run, updated) AS"
    " SELECT address, state, info, run, updated FROM"
    "  (SELECT *, row_number() OVER (PARTITION BY address ORDER BY seq DESC, item DESC) AS n FROM logged)"
    "  WHERE n = 1"
    " UNION ALL"
    " SELECT address, state, info, run, updated FROM recipients WHERE address NOT IN (SELECT address FROM logged);";

/* A log left by a run that died before merging it (or a failed merge). */
static const char merge_leftovers[] =
    "INSERT INTO recipients(address, state, info, run, updated)"
    " SELECT address, state, info, run, updated FROM logged WHERE true ORDER BY address, seq, item"
    " ON CONFLICT(address) DO UPDATE SET state = excluded.state, info = excluded.info, run = excluded.run,"
    " updated = excluded.updated;"
    "DELETE FROM log;";

/* The keys a journal holds, as a Bloom filter of fixed size (1 MiB, three
 * bits a key): a key whose bits are not all set has no row, so a new
 * recipient's lookup (most of a list's rows) costs no query. A set bit
 * proves nothing: the query answers then. About 3 % false positives at a
 * million keys, fewer below; past that more lookups reach the table, none
 * is answered wrong. */
#define SEEN_BITS (1u << 23)

/* Why a log: a commit's records are one row appended to the log's last
 * page (a JSON array: one statement, where a row a record cost a
 * statement's work each), where an insert or update in recipients lands
 * on a page anywhere in the tree, rewrites it in the WAL at each commit,
 * and splits it often (each split allocating pages of scratch, which also
 * makes glibc consolidate the small blocks a Lua heap frees). The log is
 * merged every MERGE_RECORDS records (or MERGE_TEXT bytes of keys and
 * reasons), in the open transaction: each key's latest record, in the
 * keys' order, one upsert each, then the log is emptied. Until then the
 * records are kept here (the pending map, at most MERGE_RECORDS keys), so
 * lookups see them without a query, a commit writes the keys recorded
 * since the last (each one's last record), and the merge reads nothing
 * back. */
#define MERGE_RECORDS 2048u
#define MERGE_TEXT (1u << 20)
#define PEND_SLOTS (2 * MERGE_RECORDS) /* open addressing, at most half full */

typedef struct {
    uint32_t key, klen, info, ilen; /* offsets into text */
    double updated;
    char letter;
    char dirty; /* recorded in the open transaction: in the log row of its commit */
} pend_entry;

struct sp_journal {
    sqlite3 *db;
    unsigned char *seen; /* the filter (NULL: every lookup queries) */
    sqlite3_stmt *st[Q_COUNT_];
    int lock_fd; /* holds the flock for the run; closed only after the database */
    int refs;
    int in_tx;
    int dead;                /* a write was lost with its transaction: the map and the log disagree */
    pend_entry *pend;        /* this run's keys recorded since the last merge, their latest record */
    uint32_t npend, nlogged; /* keys pending; records made since the merge */
    uint32_t ndirty;
    uint32_t *pend_slot; /* PEND_SLOTS: an index into pend plus one, 0 free */
    uint32_t *dirty;     /* the entries recorded in the open transaction */
    const struct pend_ref *merge_order; /* while a merge runs: sp_pending's rows, sorted */
    uint32_t nmerge;
    sp_buf json;         /* the log row being made */
    sp_buf text;         /* the pending keys and reasons */
    unsigned long long tx_gen;  /* the open (or last) transaction's number */
    unsigned long long durable; /* the last one committed */
    int readonly;
    long long run;
    char *path;
    int version; /* its schema's, as opened (a reader takes version 3 as it is) */
    char campaign[128];
    sp_journal_status status;
    char err[512];
};

static int write_dirty(sp_journal *j);

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* FNV-1a, mixed (splitmix64's finaliser). */
static uint64_t key_hash(const char *key, size_t klen)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < klen; i++)
        h = (h ^ (unsigned char)key[i]) * 1099511628211ull;
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 31;
    return h;
}

/* A key's three bits: its hash, then double hashing. */
static void seen_bits(const char *key, size_t klen, uint32_t bit[3])
{
    uint64_t h = key_hash(key, klen);
    uint32_t a = (uint32_t)h, b = (uint32_t)(h >> 32) | 1u;
    for (int i = 0; i < 3; i++)
        bit[i] = (a + (uint32_t)i * b) & (SEEN_BITS - 1);
}

static void seen_add(sp_journal *j, const char *key, size_t klen)
{
    if (!j->seen)
        return;
    uint32_t bit[3];
    seen_bits(key, klen, bit);
    for (int i = 0; i < 3; i++)
        j->seen[bit[i] >> 3] |= (unsigned char)(1u << (bit[i] & 7));
}

static int seen_maybe(const sp_journal *j, const char *key, size_t klen)
{
    if (!j->seen)
        return 1;
    uint32_t bit[3];
    seen_bits(key, klen, bit);
    for (int i = 0; i < 3; i++)
        if (!(j->seen[bit[i] >> 3] & (1u << (bit[i] & 7))))
            return 0;
    return 1;
}

/* Fills the filter with the keys already recorded (a resumed run); on
 * failure the journal goes without one. */
static void seen_load(sp_journal *j)
{
    sqlite3_stmt *st = NULL;
    int rc = SQLITE_NOMEM;
    if ((j->seen = calloc(1, SEEN_BITS / 8)) &&
        (rc = sqlite3_prepare_v2(j->db, "SELECT address FROM recipients", -1, &st, NULL)) == SQLITE_OK)
        while ((rc = sqlite3_step(st)) == SQLITE_ROW)
            seen_add(j, (const char *)sqlite3_column_blob(st, 0), (size_t)sqlite3_column_bytes(st, 0));
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        free(j->seen);
        j->seen = NULL;
    }
}

static int fail(sp_journal *j, sp_journal_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(j->err, sizeof j->err, fmt, ap);
    va_end(ap);
    j->status = st;
    return -1;
}

/* An SQLite failure as the journal's error: a full disk is its own class
 * (the run stops and resumes later), anything else is an I/O failure. */
static int fail_db(sp_journal *j, int rc, const char *what)
{
    int full = rc == SQLITE_FULL || (j->db && (sqlite3_extended_errcode(j->db) & 0xff) == SQLITE_IOERR && sqlite3_system_errno(j->db) == ENOSPC);
    return fail(j, full ? SP_JOURNAL_FULL : SP_JOURNAL_IO, "journal %s: %s: %s", j->path ? j->path : "(temporary)",
                what, full ? "the disk is full" : (j->db ? sqlite3_errmsg(j->db) : sqlite3_errstr(rc)));
}

static int exec(sp_journal *j, const char *sql, const char *what)
{
    int rc = sqlite3_exec(j->db, sql, NULL, NULL, NULL);
    return rc == SQLITE_OK ? 0 : fail_db(j, rc, what);
}

/* Steps a statement with no rows once: SQLITE_OK or the error. */
static int run_stmt(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

static int begin(sp_journal *j)
{
    if (j->in_tx)
        return 0;
    int rc = run_stmt(j->st[Q_BEGIN]);
    if (rc != SQLITE_OK)
        return fail_db(j, rc, "begin");
    j->in_tx = 1;
    j->tx_gen++;
    return 0;
}

/* The first bytes of an SQLite database; an empty file is a new one. */
static int looks_like_sqlite(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return 1; /* absent: it will be created */
    char head[16];
    size_t n = fread(head, 1, sizeof head, f);
    fclose(f);
    return n == 0 || (n == sizeof head && memcmp(head, "SQLite format 3", 16) == 0);
}

static sp_journal *new_journal(const char *path)
{
    sp_journal *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->lock_fd = -1;
    j->refs = 1;
    if (path && !(j->path = strdup(path))) {
        free(j);
        return NULL;
    }
    return j;
}

static void destroy(sp_journal *j)
{
    for (int i = 0; i < Q_COUNT_; i++)
        sqlite3_finalize(j->st[i]);
    memset(j->st, 0, sizeof j->st);
    if (j->db)
        sqlite3_close(j->db);
    j->db = NULL;
    free(j->seen);
    j->seen = NULL;
    free(j->pend);
    free(j->pend_slot);
    free(j->dirty);
    sp_buf_free(&j->json);
    sp_buf_free(&j->text);
    j->pend = NULL;
    j->pend_slot = NULL;
    j->dirty = NULL;
    /* after the database: closing any descriptor of the file drops the
     * process's POSIX locks on it, SQLite's own included */
    if (j->lock_fd >= 0)
        close(j->lock_fd);
    j->lock_fd = -1;
}

static sp_journal *open_failed(sp_journal *j, sp_journal_status *status, char *err, size_t errlen)
{
    if (status)
        *status = j->status;
    if (err && errlen)
        snprintf(err, errlen, "%s", j->err);
    destroy(j);
    free(j->path);
    free(j);
    return NULL;
}

static int read_meta(sp_journal *j)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(j->db, "SELECT value FROM meta WHERE key = 'campaign'", -1, &st, NULL) != SQLITE_OK)
        return fail_db(j, sqlite3_errcode(j->db), "reading its campaign");
    if (sqlite3_step(st) == SQLITE_ROW)
        snprintf(j->campaign, sizeof j->campaign, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    return 0;
}

static int user_version(sp_journal *j, int *v)
{
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(j->db, "PRAGMA user_version", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return rc == SQLITE_NOTADB
                   ? fail(j, SP_JOURNAL_NOT_JOURNAL, "journal %s is not an smtppool journal (not a database)", j->path)
                   : fail_db(j, rc, "reading its version");
    rc = sqlite3_step(st);
    *v = rc == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW)
        return rc == SQLITE_NOTADB
                   ? fail(j, SP_JOURNAL_NOT_JOURNAL, "journal %s is not an smtppool journal (not a database)", j->path)
                   : fail_db(j, rc, "reading its version");
    return 0;
}

/* Versions 3 (no log) and 4; a run migrates a version 3 journal. */
static int check_version(sp_journal *j, int v)
{
    if (v != 3 && v != SP_JOURNAL_VERSION)
        return fail(j, SP_JOURNAL_VERSION_MISMATCH,
                    "journal %s has schema version %d; this smtppool reads versions 3 and %d", j->path, v,
                    SP_JOURNAL_VERSION);
    j->version = v;
    return 0;
}

/* What readers count: each recipient's latest record (version 3 had no log). */
static const char *latest_table(const sp_journal *j) { return j->version == 3 ? "recipients" : "latest"; }

/* Why a journal is busy: the run that holds it, as its runs row says. */
static void describe_holder(sp_journal *j)
{
    long long pid = 0;
    char host[128] = "";
    double started = 0, ended = 0;
    sp_journal *r = sp_journal_open_read(j->path, NULL, NULL, 0);
    int have = r ? sp_journal_last_run(r, &pid, host, sizeof host, &started, &ended) : 0;
    if (r)
        sp_journal_unref(r);
    if (have > 0) {
        char when[64] = "";
        time_t t = (time_t)started;
        struct tm tm;
        if (gmtime_r(&t, &tm))
            strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &tm);
        fail(j, SP_JOURNAL_BUSY,
             "journal %s is in use by another run (pid %lld on %s, started %s): one run at a time; wait "
             "for it to end or stop it first",
             j->path, pid, host, when);
    } else {
        fail(j, SP_JOURNAL_BUSY, "journal %s is in use by another run: one run at a time; wait for it to end or "
                                 "stop it first", j->path);
    }
}

sp_journal *sp_journal_open(const char *path, const char *campaign, sp_journal_status *status, char *err,
                            size_t errlen)
{
    sp_journal *j = new_journal(path);
    if (!j) {
        if (status)
            *status = SP_JOURNAL_IO;
        if (err && errlen)
            snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (path) {
        if (!looks_like_sqlite(path)) {
            fail(j, SP_JOURNAL_NOT_JOURNAL, "journal %s is not an smtppool journal (not a database)", path);
            return open_failed(j, status, err, errlen);
        }
        j->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (j->lock_fd < 0) {
            fail(j, SP_JOURNAL_IO, "cannot open journal %s: %s", path, strerror(errno));
            return open_failed(j, status, err, errlen);
        }
        if (flock(j->lock_fd, LOCK_EX | LOCK_NB) < 0) {
            if (errno == EWOULDBLOCK)
                describe_holder(j);
            else
                fail(j, SP_JOURNAL_IO, "cannot lock journal %s: %s", path, strerror(errno));
            return open_failed(j, status, err, errlen);
        }
    }
    /* path NULL: "" is SQLite's private temporary database, on disk when it grows */
    /* NOMUTEX: one connection, used by one thread (the loop's); SQLite's
     * own mutexes cost more than a statement's work here */
    int rc = sqlite3_open_v2(path ? path : "", &j->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             NULL);
    if (rc != SQLITE_OK) {
        fail_db(j, rc, "open");
        return open_failed(j, status, err, errlen);
    }
    sqlite3_busy_timeout(j->db, 2000); /* a status reader's checkpoint, never another writer */
    int v;
    if (user_version(j, &v) < 0)
        return open_failed(j, status, err, errlen);
    /* secure_delete (on in Debian's build) would zero the log's rows as
     * each merge deletes them, and write the freed pages again: what they
     * held is in recipients by then */
    if (exec(j,
             path ? "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA secure_delete=OFF"
                  : "PRAGMA synchronous=OFF; PRAGMA secure_delete=OFF",
             "setup") < 0)
        return open_failed(j, status, err, errlen);
    if (v == 0) { /* new: its schema and campaign in one transaction */
        char sql[512];
        char *q = sqlite3_mprintf("%q", campaign ? campaign : "campaign");
        snprintf(sql, sizeof sql,
                 "BEGIN; INSERT OR IGNORE INTO meta VALUES('campaign', '%s');"
                 " INSERT OR IGNORE INTO meta VALUES('created', strftime('%%Y-%%m-%%dT%%H:%%M:%%SZ'));"
                 " PRAGMA user_version=%d; COMMIT",
                 q ? q : "campaign", SP_JOURNAL_VERSION);
        sqlite3_free(q);
        if (exec(j, schema, "creating its tables") < 0 || exec(j, schema_log, "creating its tables") < 0 ||
            exec(j, sql, "creating it") < 0)
            return open_failed(j, status, err, errlen);
    } else if (check_version(j, v) < 0) {
        return open_failed(j, status, err, errlen);
    } else if (v == 3) { /* its log and view; the rest is the same */
        char sql[sizeof schema_log + 64];
        snprintf(sql, sizeof sql, "BEGIN; %s PRAGMA user_version=%d; COMMIT", schema_log, SP_JOURNAL_VERSION);
        if (exec(j, sql, "upgrading it to version 4") < 0)
            return open_failed(j, status, err, errlen);
    }
    j->version = SP_JOURNAL_VERSION;
    /* what a run that died left in the log */
    char sql[sizeof merge_leftovers + 32];
    snprintf(sql, sizeof sql, "BEGIN; %s COMMIT", merge_leftovers);
    if (exec(j, sql, "merging what an earlier run left in its log") < 0)
        return open_failed(j, status, err, errlen);
    if (read_meta(j) < 0)
        return open_failed(j, status, err, errlen);
    if (campaign && strcmp(j->campaign, campaign) != 0) {
        fail(j, SP_JOURNAL_CAMPAIGN, "journal %s belongs to campaign '%s', not '%s'", path, j->campaign, campaign);
        return open_failed(j, status, err, errlen);
    }
    if ((rc = sqlite3_create_module_v2(j->db, "sp_pending", &pend_module, j, NULL)) != SQLITE_OK) {
        fail_db(j, rc, "preparing its queries");
        return open_failed(j, status, err, errlen);
    }
    for (int i = 0; i < Q_COUNT_; i++)
        if ((rc = sqlite3_prepare_v3(j->db, queries[i], -1, SQLITE_PREPARE_PERSISTENT, &j->st[i], NULL)) !=
            SQLITE_OK) {
            fail_db(j, rc, "preparing its queries");
            return open_failed(j, status, err, errlen);
        }
    seen_load(j);
    /* this run's row: who holds the journal, for a second run's refusal */
    char host[128] = "?";
    gethostname(host, sizeof host - 1);
    sqlite3_stmt *st;
    rc = sqlite3_prepare_v2(j->db, "INSERT INTO runs(pid, host, started) VALUES (?1, ?2, ?3)", -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(st, 1, (long long)getpid());
        sqlite3_bind_text(st, 2, host, -1, SQLITE_TRANSIENT);
        sqlite3_bind_double(st, 3, wall_now());
        rc = sqlite3_step(st);
        sqlite3_finalize(st);
    }
    if (rc != SQLITE_DONE) {
        fail_db(j, rc, "recording the run");
        return open_failed(j, status, err, errlen);
    }
    j->run = sqlite3_last_insert_rowid(j->db);
    if (status)
        *status = SP_JOURNAL_OK;
    return j;
}

sp_journal *sp_journal_open_read(const char *path, sp_journal_status *status, char *err, size_t errlen)
{
    sp_journal *j = new_journal(path);
    if (!j)
        return NULL;
    j->readonly = 1;
    if (!looks_like_sqlite(path) || access(path, R_OK) < 0) {
        if (access(path, R_OK) < 0)
            fail(j, SP_JOURNAL_IO, "cannot read journal %s: %s", path, strerror(errno));
        else
            fail(j, SP_JOURNAL_NOT_JOURNAL, "journal %s is not an smtppool journal (not a database)", path);
        return open_failed(j, status, err, errlen);
    }
    int rc = sqlite3_open_v2(path, &j->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    int v;
    if (rc != SQLITE_OK) {
        fail_db(j, rc, "open");
        return open_failed(j, status, err, errlen);
    }
    sqlite3_busy_timeout(j->db, 2000);
    if (user_version(j, &v) < 0 || check_version(j, v) < 0 || read_meta(j) < 0)
        return open_failed(j, status, err, errlen);
    char counts[128];
    snprintf(counts, sizeof counts, "SELECT state, count(*) FROM %s GROUP BY state", latest_table(j));
    if ((rc = sqlite3_prepare_v2(j->db, counts, -1, &j->st[Q_COUNTS], NULL)) != SQLITE_OK) {
        fail_db(j, rc, "preparing its queries");
        return open_failed(j, status, err, errlen);
    }
    if (status)
        *status = SP_JOURNAL_OK;
    return j;
}

int sp_journal_running(sp_journal *j)
{
    if (!j->path)
        return 0;
    int fd = open(j->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    int busy = flock(fd, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK;
    if (!busy)
        flock(fd, LOCK_UN);
    /* Closing this descriptor drops the process's POSIX locks on the file:
     * harmless for a reader between statements. */
    close(fd);
    return busy;
}

const char *sp_journal_campaign(const sp_journal *j) { return j->campaign; }

int sp_journal_last_run(sp_journal *j, long long *pid, char *host, size_t hostlen, double *started, double *ended)
{
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(j->db, "SELECT pid, host, started, ended FROM runs ORDER BY id DESC LIMIT 1", -1,
                                &st, NULL);
    if (rc != SQLITE_OK)
        return fail_db(j, rc, "reading its runs");
    rc = sqlite3_step(st);
    int have = rc == SQLITE_ROW;
    if (have) {
        *pid = sqlite3_column_int64(st, 0);
        snprintf(host, hostlen, "%s", (const char *)sqlite3_column_text(st, 1));
        *started = sqlite3_column_double(st, 2);
        *ended = sqlite3_column_double(st, 3);
    }
    sqlite3_finalize(st);
    if (!have && rc != SQLITE_DONE)
        return fail_db(j, rc, "reading its runs");
    return have;
}

int sp_journal_failures(sp_journal *j, int n, sp_journal_row_fn fn, void *ud)
{
    if (j->ndirty && write_dirty(j) < 0) /* the view reads the log */
        return -1;
    sqlite3_stmt *st;
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT state, address, info, updated FROM %s WHERE state IN ('" SP_J_FAILED "','" SP_J_TRANSIENT
             "','" SP_J_AMBIGUOUS "') ORDER BY updated DESC LIMIT ?1",
             latest_table(j));
    int rc = sqlite3_prepare_v2(j->db, sql, -1, &st, NULL);
    if (rc != SQLITE_OK)
        return fail_db(j, rc, "reading its failures");
    sqlite3_bind_int(st, 1, n);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        fn(ud, ((const char *)sqlite3_column_text(st, 0))[0], (const char *)sqlite3_column_text(st, 1),
           (const char *)sqlite3_column_text(st, 2), sqlite3_column_double(st, 3));
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : fail_db(j, rc, "reading its failures");
}

int sp_journal_is_open(const sp_journal *j) { return j->db != NULL; }

static int not_open(sp_journal *j)
{
    if (j->dead)
        return -1; /* its error stands */
    if (j->db && !j->readonly)
        return 0;
    return fail(j, SP_JOURNAL_IO, "journal %s is closed", j->path ? j->path : "(temporary)");
}

/* ===== the pending map and the merge ===== */

static int step_done(sp_journal *j, sqlite3_stmt *st, const char *what)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st); /* its parameters stay bound: every use binds them all again */
    return rc == SQLITE_DONE ? 0 : fail_db(j, rc, what);
}

/* key's slot in pend_slot: the one holding it, or the free one where it
 * goes (there is always one: the map is at most half full). */
static uint32_t *pend_slot_of(sp_journal *j, const char *key, size_t klen)
{
    for (uint32_t i = (uint32_t)key_hash(key, klen);; i++) {
        uint32_t *slot = &j->pend_slot[i & (PEND_SLOTS - 1)];
        if (!*slot)
            return slot;
        const pend_entry *e = &j->pend[*slot - 1];
        if (e->klen == klen && memcmp(j->text.data + e->key, key, klen) == 0)
            return slot;
    }
}

static int pend_text_add(sp_journal *j, const char *s, size_t n, uint32_t *off)
{
    *off = (uint32_t)j->text.len;
    return sp_buf_append(&j->text, s, n);
}

/* key's latest record, kept until the merge. */
static int pend_put(sp_journal *j, char letter, const char *key, size_t klen, const char *info, size_t ilen,
                    double now)
{
    if (!j->pend_slot) {
        if (!(j->pend = malloc(MERGE_RECORDS * sizeof *j->pend)) ||
            !(j->dirty = malloc(MERGE_RECORDS * sizeof *j->dirty)) || !sp_buf_reserve(&j->text, 64 * 1024) ||
            !(j->pend_slot = calloc(PEND_SLOTS, sizeof *j->pend_slot))) {
            free(j->pend);
            free(j->dirty);
            j->pend = NULL;
            j->dirty = NULL;
            return -1;
        }
    }
    uint32_t *slot = pend_slot_of(j, key, klen);
    pend_entry *e = &j->pend[*slot ? *slot - 1 : j->npend];
    if (!*slot) {
        if (pend_text_add(j, key, klen, &e->key) < 0)
            return -1;
        e->klen = (uint32_t)klen;
        e->dirty = 0;
        *slot = ++j->npend;
    }
    if (!e->dirty) {
        e->dirty = 1;
        j->dirty[j->ndirty++] = (uint32_t)(e - j->pend);
    }
    if (pend_text_add(j, info, ilen, &e->info) < 0)
        return -1;
    e->ilen = (uint32_t)ilen;
    e->letter = letter;
    e->updated = now;
    return 0;
}

static void pend_reset(sp_journal *j)
{
    if (j->pend_slot)
        memset(j->pend_slot, 0, PEND_SLOTS * sizeof *j->pend_slot);
    j->npend = j->nlogged = j->ndirty = 0;
    sp_buf_reset(&j->text);
}

/* Once a write is lost with its transaction, the pending map and the log
 * no longer agree: the journal takes nothing more (a later run merges
 * what the log holds). */
static int lost(sp_journal *j)
{
    j->dead = 1;
    return -1;
}

/* s as a JSON string at o (room for 6 * n + 2 bytes): quotes, backslashes
 * and control bytes escaped, the rest as it is. */
static char *json_string(char *o, const char *s, size_t n)
{
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            *o++ = '\\';
            *o++ = (char)c;
        } else if (c < 0x20) {
            memcpy(o, "\\u00", 4);
            o[4] = "0123456789abcdef"[c >> 4];
            o[5] = "0123456789abcdef"[c & 15];
            o += 6;
        } else {
            *o++ = (char)c;
        }
    }
    *o++ = '"';
    return o;
}

/* ",<seconds>.<milliseconds>]" at o (at most 26 bytes): printf's %f costs
 * more than the rest of a record. */
static char *json_time(char *o, double t)
{
    unsigned long long ms = t > 0 ? (unsigned long long)(t * 1000.0 + 0.5) : 0;
    char d[24];
    int n = 0;
    for (unsigned long long s = ms / 1000; n == 0 || s; s /= 10)
        d[n++] = (char)('0' + s % 10);
    *o++ = ',';
    while (n)
        *o++ = d[--n];
    *o++ = '.';
    *o++ = (char)('0' + ms / 100 % 10);
    *o++ = (char)('0' + ms / 10 % 10);
    *o++ = (char)('0' + ms % 10);
    *o++ = ']';
    return o;
}

/* The open transaction's records as one JSON array of [state, address,
 * info, updated], in j->json; its length, or 0 out of memory. */
static size_t json_records(sp_journal *j)
{
    sp_buf_reset(&j->json);
    const uint32_t n = j->ndirty;
    for (uint32_t k = 0; k < n; k++) {
        const pend_entry *e = &j->pend[j->dirty[k]];
        char *o = sp_buf_reserve(&j->json, 40 + 6 * ((size_t)e->klen + e->ilen)), *start = o;
        if (!o)
            return 0;
        *o++ = k ? ',' : '[';
        memcpy(o, "[\"?\",", 5);
        o[2] = e->letter;
        o = json_string(o + 5, j->text.data + e->key, e->klen);
        *o++ = ',';
        o = json_string(o, j->text.data + e->info, e->ilen);
        o = json_time(o, e->updated);
        j->json.len += (size_t)(o - start);
    }
    char *o = sp_buf_reserve(&j->json, 2);
    if (!o)
        return 0;
    if (!n)
        *o++ = '[', j->json.len++;
    *o = ']';
    return ++j->json.len;
}

static int out_of_memory(sp_journal *j)
{
    lost(j);
    return fail(j, SP_JOURNAL_IO, "journal %s: out of memory", j->path ? j->path : "(temporary)");
}

/* The open transaction's records (each key's last) as one log row. */
static int write_dirty(sp_journal *j)
{
    size_t len = json_records(j);
    for (uint32_t k = 0; k < j->ndirty; k++)
        j->pend[j->dirty[k]].dirty = 0;
    j->ndirty = 0;
    if (!len)
        return out_of_memory(j);
    sqlite3_stmt *st = j->st[Q_LOG];
    sqlite3_bind_int64(st, 1, j->run);
    sqlite3_bind_text(st, 2, j->json.data, (int)len, SQLITE_STATIC);
    return step_done(j, st, "writing its log") < 0 ? lost(j) : 0;
}

typedef struct pend_ref {
    const char *key;
    uint32_t klen, i;
} pend_ref;

/* sp_pending: the pending map, sorted, as a table the merge reads in one
 * statement. An eponymous virtual table of the journal's own connection
 * (never in the schema, so the sqlite3 shell and other readers never meet
 * it), direct-only (no view or trigger can use it), and empty outside a
 * merge. Its text columns point into the map's buffer, which stands while
 * the statement runs. */
typedef struct {
    sqlite3_vtab base;
    sp_journal *j;
} pend_vtab;

typedef struct {
    sqlite3_vtab_cursor base;
    uint32_t at;
} pend_cursor;

static int pv_connect(sqlite3 *db, void *aux, int argc, const char *const *argv, sqlite3_vtab **out, char **err)
{
    (void)argc;
    (void)argv;
    (void)err;
    int rc = sqlite3_declare_vtab(db, "CREATE TABLE x(address TEXT, state TEXT, info TEXT, run INTEGER, updated REAL)");
    if (rc != SQLITE_OK)
        return rc;
#ifdef SQLITE_VTAB_DIRECTONLY
    sqlite3_vtab_config(db, SQLITE_VTAB_DIRECTONLY);
#endif
    pend_vtab *v = sqlite3_malloc(sizeof *v);
    if (!v)
        return SQLITE_NOMEM;
    memset(v, 0, sizeof *v);
    v->j = aux;
    *out = &v->base;
    return SQLITE_OK;
}

static int pv_disconnect(sqlite3_vtab *v)
{
    sqlite3_free(v);
    return SQLITE_OK;
}

static int pv_best_index(sqlite3_vtab *v, sqlite3_index_info *info)
{
    (void)v;
    info->estimatedCost = MERGE_RECORDS;
    info->estimatedRows = MERGE_RECORDS;
    return SQLITE_OK;
}

static int pv_open(sqlite3_vtab *v, sqlite3_vtab_cursor **out)
{
    (void)v;
    pend_cursor *c = sqlite3_malloc(sizeof *c);
    if (!c)
        return SQLITE_NOMEM;
    memset(c, 0, sizeof *c);
    *out = &c->base;
    return SQLITE_OK;
}

static int pv_close(sqlite3_vtab_cursor *c)
{
    sqlite3_free(c);
    return SQLITE_OK;
}

static int pv_filter(sqlite3_vtab_cursor *c, int idx, const char *idxstr, int argc, sqlite3_value **argv)
{
    (void)idx;
    (void)idxstr;
    (void)argc;
    (void)argv;
    ((pend_cursor *)c)->at = 0;
    return SQLITE_OK;
}

static int pv_next(sqlite3_vtab_cursor *c)
{
    ((pend_cursor *)c)->at++;
    return SQLITE_OK;
}

static int pv_eof(sqlite3_vtab_cursor *c)
{
    const sp_journal *j = ((pend_vtab *)c->pVtab)->j;
    return ((pend_cursor *)c)->at >= j->nmerge;
}

static int pv_column(sqlite3_vtab_cursor *c, sqlite3_context *ctx, int col)
{
    const sp_journal *j = ((pend_vtab *)c->pVtab)->j;
    const pend_ref *r = &j->merge_order[((pend_cursor *)c)->at];
    const pend_entry *e = &j->pend[r->i];
    switch (col) {
    case 0:
        sqlite3_result_text(ctx, r->key, (int)r->klen, SQLITE_STATIC);
        break;
    case 1:
        sqlite3_result_text(ctx, &e->letter, 1, SQLITE_STATIC);
        break;
    case 2:
        sqlite3_result_text(ctx, j->text.data + e->info, (int)e->ilen, SQLITE_STATIC);
        break;
    case 3:
        sqlite3_result_int64(ctx, j->run);
        break;
    default:
        sqlite3_result_double(ctx, e->updated);
        break;
    }
    return SQLITE_OK;
}

static int pv_rowid(sqlite3_vtab_cursor *c, sqlite3_int64 *rowid)
{
    *rowid = ((pend_cursor *)c)->at;
    return SQLITE_OK;
}

static const sqlite3_module pend_module = {
    .iVersion = 0,
    .xCreate = NULL, /* eponymous-only */
    .xConnect = pv_connect,
    .xBestIndex = pv_best_index,
    .xDisconnect = pv_disconnect,
    .xDestroy = pv_disconnect,
    .xOpen = pv_open,
    .xClose = pv_close,
    .xFilter = pv_filter,
    .xNext = pv_next,
    .xEof = pv_eof,
    .xColumn = pv_column,
    .xRowid = pv_rowid,
};

/* SQLite's BINARY order: the bytes, then the length. */
static int pend_cmp(const void *a, const void *b)
{
    const pend_ref *x = a, *y = b;
    int c = memcmp(x->key, y->key, x->klen < y->klen ? x->klen : y->klen);
    return c ? c : (x->klen > y->klen) - (x->klen < y->klen);
}

/* Merges the pending records into recipients, in the open transaction:
 * each key's latest record, in the keys' order, then the log emptied. */
static int merge_pending(sp_journal *j)
{
    if (!j->nlogged)
        return 0;
    pend_ref *order = malloc(j->npend * sizeof *order);
    if (!order)
        return out_of_memory(j);
    for (uint32_t i = 0; i < j->npend; i++)
        order[i] = (pend_ref){j->text.data + j->pend[i].key, j->pend[i].klen, i};
    qsort(order, j->npend, sizeof *order, pend_cmp);
    /* the records not in the log yet go to recipients with the rest, all
     * read through sp_pending by one statement */
    j->merge_order = order;
    j->nmerge = j->npend;
    int rc = step_done(j, j->st[Q_MERGE], "merging its log");
    j->merge_order = NULL;
    j->nmerge = 0;
    free(order);
    if (rc == 0)
        rc = step_done(j, j->st[Q_CLEAR], "merging its log");
    pend_reset(j);
    return rc < 0 ? lost(j) : 0;
}

int sp_journal_get(sp_journal *j, const char *key, size_t klen, char *letter, int *this_run)
{
    /* inside the open transaction: a read outside one takes and drops the
     * database's locks each time (four times the cost) */
    if (not_open(j) < 0)
        return -1;
    if (!seen_maybe(j, key, klen))
        return 0;
    if (j->npend) {
        const uint32_t *slot = pend_slot_of(j, key, klen);
        if (*slot) {
            *letter = j->pend[*slot - 1].letter;
            *this_run = 1;
            return 1;
        }
    }
    if (begin(j) < 0)
        return -1;
    sqlite3_stmt *st = j->st[Q_GET];
    sqlite3_bind_text(st, 1, key, (int)klen, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    int found = rc == SQLITE_ROW;
    if (found) {
        const unsigned char *s = sqlite3_column_text(st, 0);
        *letter = s ? (char)s[0] : 0;
        *this_run = sqlite3_column_int64(st, 1) == j->run;
    }
    sqlite3_reset(st); /* its parameters stay bound: every use binds them all again */
    if (!found && rc != SQLITE_DONE)
        return fail_db(j, rc, "reading a recipient");
    return found;
}

int sp_journal_meet(sp_journal *j, const char *key, size_t klen)
{
    if (not_open(j) < 0 || begin(j) < 0)
        return -1;
    sqlite3_stmt *st = j->st[Q_MEET];
    sqlite3_bind_text(st, 1, key, (int)klen, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, j->run);
    return step_done(j, st, "writing a recipient");
}

int sp_journal_record(sp_journal *j, char letter, const char *key, size_t klen, const char *info, size_t ilen)
{
    if (not_open(j) < 0 || begin(j) < 0)
        return -1;
    if ((j->nlogged >= MERGE_RECORDS || j->text.len >= MERGE_TEXT) && merge_pending(j) < 0)
        return -1;
    if (pend_put(j, letter, key, klen, info ? info : "", info ? ilen : 0, wall_now()) < 0)
        return out_of_memory(j);
    j->nlogged++;
    seen_add(j, key, klen);
    return 0;
}

/* Flushes the WAL to the disk, for power loss: synchronous=NORMAL writes
 * a commit to the WAL before COMMIT returns, so kill -9 keeps it, but does
 * not sync it (the pragma cannot change inside a transaction). */
static int sync_wal(sp_journal *j)
{
    if (!j->path)
        return 0;
    sqlite3_file *f = NULL;
    int rc;
    if (sqlite3_file_control(j->db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &f) == SQLITE_OK && f && f->pMethods &&
        (rc = f->pMethods->xSync(f, SQLITE_SYNC_NORMAL)) != SQLITE_OK)
        return fail_db(j, rc, "sync");
    return 0;
}

int sp_journal_commit(sp_journal *j, int sync)
{
    if (not_open(j) < 0)
        return -1;
    if (!j->in_tx) /* committed already (before a connection wrote): still synced when asked */
        return sync ? sync_wal(j) : 0;
    if (j->ndirty && write_dirty(j) < 0)
        return -1;
    int rc = run_stmt(j->st[Q_COMMIT]);
    if (rc != SQLITE_OK) {
        fail_db(j, rc, "commit");
        /* a failed COMMIT may leave the transaction open: end it, losing
         * only what it held (never an L whose dot then left) */
        if (!sqlite3_get_autocommit(j->db))
            sqlite3_exec(j->db, "ROLLBACK", NULL, NULL, NULL);
        j->in_tx = 0;
        return lost(j);
    }
    j->in_tx = 0;
    j->durable = j->tx_gen;
    return sync ? sync_wal(j) : 0;
}

int sp_journal_mark(sp_journal *j, const char *key, size_t klen)
{
    if (sp_journal_record(j, SP_J_LEAVING[0], key, klen, "", 0) < 0)
        return -1;
    return sp_journal_commit(j, 0);
}

int sp_journal_mark_deferred(sp_journal *j, const char *key, size_t klen, unsigned long long *gen)
{
    if (sp_journal_record(j, SP_J_LEAVING[0], key, klen, "", 0) < 0)
        return -1;
    *gen = j->tx_gen;
    return 0;
}

int sp_journal_sync_to(sp_journal *j, unsigned long long gen)
{
    if (j->durable >= gen)
        return 0;
    if (j->in_tx && j->tx_gen == gen)
        return sp_journal_commit(j, 0);
    /* its transaction ended without a commit (the commit failed) */
    if (!j->err[0])
        snprintf(j->err, sizeof j->err, "an earlier commit failed");
    return -1;
}

int sp_journal_counts(sp_journal *j, long long counts[26])
{
    memset(counts, 0, 26 * sizeof *counts);
    if (!j->db)
        return fail(j, SP_JOURNAL_IO, "journal is closed");
    sqlite3_stmt *st;
    if (!j->readonly && !j->dead) {
        /* A writer merges its log first, and counts recipients alone, a
         * row at a time: through the view (its window over the log, its
         * anti-join for every recipient, its grouping) the count at a run's
         * end cost about as much again as the run's merges. */
        if (j->nlogged && (begin(j) < 0 || merge_pending(j) < 0))
            return -1;
        st = j->st[Q_STATES];
    } else {
        if (j->ndirty && write_dirty(j) < 0) /* the view reads the log */
            return -1;
        st = j->st[Q_COUNTS];
    }
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const unsigned char *s = sqlite3_column_text(st, 0);
        if (s && s[0] >= 'A' && s[0] <= 'Z')
            counts[s[0] - 'A'] += sqlite3_column_int64(st, 1);
    }
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? 0 : fail_db(j, rc, "counting");
}

int sp_journal_close(sp_journal *j)
{
    if (!j->db)
        return 0;
    int r = 0;
    if (!j->readonly) {
        /* merged at the end, so the next run opens a journal with an empty log */
        r = j->nlogged && !j->dead && begin(j) == 0 ? merge_pending(j) : 0;
        r = r < 0 ? r : sp_journal_commit(j, 1);
        if (j->dead && !sqlite3_get_autocommit(j->db)) {
            sqlite3_exec(j->db, "ROLLBACK", NULL, NULL, NULL);
            j->in_tx = 0;
        }
        sqlite3_stmt *st;
        if (sqlite3_prepare_v2(j->db, "UPDATE runs SET ended = ?1 WHERE id = ?2", -1, &st, NULL) == SQLITE_OK) {
            sqlite3_bind_double(st, 1, wall_now());
            sqlite3_bind_int64(st, 2, j->run);
            sqlite3_step(st);
            sqlite3_finalize(st);
        }
    }
    destroy(j);
    return r;
}

void sp_journal_ref(sp_journal *j) { j->refs++; }

void sp_journal_unref(sp_journal *j)
{
    if (--j->refs > 0)
        return;
    sp_journal_close(j);
    free(j->path);
    free(j);
}

const char *sp_journal_error(const sp_journal *j) { return j->err; }
sp_journal_status sp_journal_last_status(const sp_journal *j) { return j->status; }
