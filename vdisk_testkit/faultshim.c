/*
 * faultshim: an LD_PRELOAD library that fails the Nth write-side call a
 * process makes on files under one directory (vdisk_testkit/opfaultsim.py, the
 * campaign over restore, convert, check --repair, backup and merge).
 *
 * Intercepted: write, writev, pwrite, pwrite64, pwritev, pwritev64,
 * pwritev2, pwritev64v2, fsync, fdatasync, ftruncate, ftruncate64,
 * fallocate, fallocate64, posix_fallocate, posix_fallocate64,
 * copy_file_range, sendfile, sendfile64.  A call counts when
 * readlink("/proc/self/fd/N") is FAULTSHIM_DIR or lies under it (directory
 * fsyncs included); all other calls pass straight through to the real
 * function (dlsym(RTLD_NEXT)).
 *
 * Environment:
 *   FAULTSHIM_DIR     the directory (an absolute, resolved path); unset: count nothing
 *   FAULTSHIM_FAIL_AT 1-based index of the counted call to fail; 0 or unset: none
 *   FAULTSHIM_ERRNO   the errno to fail with (a number; default EIO)
 *   FAULTSHIM_MODE    "once" (default): only that call fails;
 *                     "short": that call, if a write of more than one byte, writes
 *                     the first half and returns the short count, and every later
 *                     counted write fails with the errno (a file system that just
 *                     filled up); other kinds fail as in "once"
 *   FAULTSHIM_REPORT  a file to which, at exit, "<count>\n" is written
 *   FAULTSHIM_LOG     a file to which every counted call appends "<n> <kind> <path>\n"
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/sendfile.h>
#include <sys/syscall.h>
#include <unistd.h>

static char dir[4096];
static size_t dir_len;
static long fail_at;
static int fail_errno = EIO;
static int short_mode;
static long counter;          /* counted calls so far (atomic) */
static int filled;            /* short mode: the file system "filled up" */
static const char *report_path;
static const char *log_path;

__attribute__((constructor)) static void shim_init(void) {
    const char *d = getenv("FAULTSHIM_DIR");
    if (d && *d) {
        strncpy(dir, d, sizeof dir - 1);
        dir_len = strlen(dir);
        while (dir_len > 1 && dir[dir_len - 1] == '/')
            dir[--dir_len] = 0;
    }
    const char *s = getenv("FAULTSHIM_FAIL_AT");
    fail_at = s ? atol(s) : 0;
    s = getenv("FAULTSHIM_ERRNO");
    if (s && *s)
        fail_errno = atoi(s);
    s = getenv("FAULTSHIM_MODE");
    short_mode = s && strcmp(s, "short") == 0;
    report_path = getenv("FAULTSHIM_REPORT");
    log_path = getenv("FAULTSHIM_LOG");
}

/* Appends text to path with raw system calls (never through the wrappers below). */
static void append_raw(const char *path, const char *text) {
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    syscall(SYS_write, fd, text, strlen(text));
    syscall(SYS_close, fd);
}

__attribute__((destructor)) static void shim_fini(void) {
    if (report_path && *report_path) {
        char buf[32];
        snprintf(buf, sizeof buf, "%ld\n", __atomic_load_n(&counter, __ATOMIC_SEQ_CST));
        append_raw(report_path, buf);
    }
}

/* The path of fd if it is the directory or lies under it, else NULL. */
static int watched(int fd, char *path, size_t size) {
    if (!dir_len || fd < 0)
        return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, size - 1);
    if (n <= 0)
        return 0;
    path[n] = 0;
    return strncmp(path, dir, dir_len) == 0 && (path[dir_len] == 0 || path[dir_len] == '/');
}

enum verdict { PASS, FAIL, SHORT };

/* Counts a call on fd; says whether it passes, fails or (a write in short mode) lands half. */
static enum verdict judge(int fd, const char *kind, int is_write) {
    char path[4096];
    int saved = errno;
    if (!watched(fd, path, sizeof path)) {
        errno = saved;
        return PASS;
    }
    long n = __atomic_add_fetch(&counter, 1, __ATOMIC_SEQ_CST);
    if (log_path && *log_path) {
        char line[4200];
        snprintf(line, sizeof line, "%ld %s %s\n", n, kind, path);
        append_raw(log_path, line);
    }
    errno = saved;
    if (short_mode && is_write && __atomic_load_n(&filled, __ATOMIC_SEQ_CST))
        return FAIL;
    if (fail_at > 0 && n == fail_at) {
        if (short_mode && is_write) {
            __atomic_store_n(&filled, 1, __ATOMIC_SEQ_CST);
            return SHORT;
        }
        return FAIL;
    }
    return PASS;
}

#define REAL(name) \
    static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

#define FAILED() do { errno = fail_errno; return -1; } while (0)

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    switch (judge(fd, "write", 1)) {
    case FAIL: FAILED();
    case SHORT: if (count > 1) return real_write(fd, buf, count / 2); FAILED();
    default: return real_write(fd, buf, count);
    }
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite);
    switch (judge(fd, "pwrite", 1)) {
    case FAIL: FAILED();
    case SHORT: if (count > 1) return real_pwrite(fd, buf, count / 2, offset); FAILED();
    default: return real_pwrite(fd, buf, count, offset);
    }
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    REAL(pwrite64);
    switch (judge(fd, "pwrite", 1)) {
    case FAIL: FAILED();
    case SHORT: if (count > 1) return real_pwrite64(fd, buf, count / 2, offset); FAILED();
    default: return real_pwrite64(fd, buf, count, offset);
    }
}

/* The first iovcnt' buffers holding half of the bytes (at least one byte short of all). */
static int half_iov(const struct iovec *iov, int iovcnt, struct iovec *out) {
    size_t total = 0, want, got = 0;
    int i, k = 0;
    for (i = 0; i < iovcnt; i++)
        total += iov[i].iov_len;
    if (total <= 1)
        return -1;
    want = total / 2;
    for (i = 0; i < iovcnt && got < want && k < 1024; i++) {
        out[k] = iov[i];
        if (got + out[k].iov_len > want)
            out[k].iov_len = want - got;
        got += out[k].iov_len;
        k++;
    }
    return k;
}

#define VEC_BODY(call_full, call_half) \
    switch (judge(fd, kind, 1)) { \
    case FAIL: FAILED(); \
    case SHORT: { \
        struct iovec half[1024]; \
        int k = half_iov(iov, iovcnt > 1024 ? 1024 : iovcnt, half); \
        if (k <= 0) FAILED(); \
        return call_half; \
    } \
    default: return call_full; \
    }

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev);
    const char *kind = "writev";
    VEC_BODY(real_writev(fd, iov, iovcnt), real_writev(fd, half, k))
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    REAL(pwritev);
    const char *kind = "pwritev";
    VEC_BODY(real_pwritev(fd, iov, iovcnt, offset), real_pwritev(fd, half, k, offset))
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off64_t offset) {
    REAL(pwritev64);
    const char *kind = "pwritev";
    VEC_BODY(real_pwritev64(fd, iov, iovcnt, offset), real_pwritev64(fd, half, k, offset))
}

ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) {
    REAL(pwritev2);
    const char *kind = "pwritev";
    VEC_BODY(real_pwritev2(fd, iov, iovcnt, offset, flags), real_pwritev2(fd, half, k, offset, flags))
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int iovcnt, off64_t offset, int flags) {
    REAL(pwritev64v2);
    const char *kind = "pwritev";
    VEC_BODY(real_pwritev64v2(fd, iov, iovcnt, offset, flags), real_pwritev64v2(fd, half, k, offset, flags))
}

int fsync(int fd) {
    REAL(fsync);
    if (judge(fd, "fsync", 0) == FAIL) FAILED();
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (judge(fd, "fdatasync", 0) == FAIL) FAILED();
    return real_fdatasync(fd);
}

int ftruncate(int fd, off_t length) {
    REAL(ftruncate);
    if (judge(fd, "ftruncate", 0) == FAIL) FAILED();
    return real_ftruncate(fd, length);
}

int ftruncate64(int fd, off64_t length) {
    REAL(ftruncate64);
    if (judge(fd, "ftruncate", 0) == FAIL) FAILED();
    return real_ftruncate64(fd, length);
}

int fallocate(int fd, int mode, off_t offset, off_t len) {
    REAL(fallocate);
    if (judge(fd, "fallocate", 0) == FAIL) FAILED();
    return real_fallocate(fd, mode, offset, len);
}

int fallocate64(int fd, int mode, off64_t offset, off64_t len) {
    REAL(fallocate64);
    if (judge(fd, "fallocate", 0) == FAIL) FAILED();
    return real_fallocate64(fd, mode, offset, len);
}

/* posix_fallocate returns the error instead of setting errno */
int posix_fallocate(int fd, off_t offset, off_t len) {
    REAL(posix_fallocate);
    if (judge(fd, "posix_fallocate", 0) == FAIL) return fail_errno;
    return real_posix_fallocate(fd, offset, len);
}

int posix_fallocate64(int fd, off64_t offset, off64_t len) {
    REAL(posix_fallocate64);
    if (judge(fd, "posix_fallocate", 0) == FAIL) return fail_errno;
    return real_posix_fallocate64(fd, offset, len);
}

ssize_t copy_file_range(int fd_in, off64_t *off_in, int fd_out, off64_t *off_out, size_t len, unsigned int flags) {
    REAL(copy_file_range);
    if (judge(fd_out, "copy_file_range", 1) != PASS) FAILED();
    return real_copy_file_range(fd_in, off_in, fd_out, off_out, len, flags);
}

ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count) {
    REAL(sendfile);
    if (judge(out_fd, "sendfile", 1) != PASS) FAILED();
    return real_sendfile(out_fd, in_fd, offset, count);
}

ssize_t sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count) {
    REAL(sendfile64);
    if (judge(out_fd, "sendfile", 1) != PASS) FAILED();
    return real_sendfile64(out_fd, in_fd, offset, count);
}
