/*
 * loadsvc.core._shmfast: the changed-rank loop of ShmReader.read_all in C.
 *
 * Optional: loadsvc/core/region.py falls back to the same loop in Python when this
 * module was not built (no compiler at install time), and tests run both.
 * It reads the layout documented in loadsvc/core/region.py and keeps its rules:
 *
 *   buffer (n & 1) of rank r, at byte offset buffers[2r + (n & 1)]:
 *     word 0 state (2n when publish n is complete), word 1 publish time ns,
 *     word 2 payload length << 32 | crc32, word 3 reserved, then the payload.
 *   A copy is good when state == 2n before and after it, the length fits the
 *   payload capacity, and crc32(payload, seed) == the stored crc, seed being
 *   (n * 0x9E3779B1 ^ publish time) & 0xFFFFFFFF; then the decoded snapshot
 *   must name rank r.
 *
 * Here the state words are read with acquire loads and an acquire fence sits
 * between the copy and the second state load, so the reader's side of the
 * seqlock is ordered on any CPU. The writer is Python, with no release fences:
 * on a weakly ordered CPU its stores may still become visible out of order, so
 * the checksum decides there, as in the Python loop (it is also what catches
 * corrupt files). No lock, no syscall.
 *
 * Anything unusual (torn, wrong length, bad checksum, undecodable, wrong rank)
 * is not handled here: the rank is returned to the caller, whose Python path
 * retries, counts and falls back to the last good copy.
 *
 * Reading a mapping whose file was truncated under it raises SIGBUS, which by
 * default kills the process; any local process allowed to write the file can
 * truncate it at any moment, so checking the size first only narrows the gap.
 * Every access to the mapping here is therefore guarded: the module installs a
 * SIGBUS handler, and each copy out of the mapping runs between a sigsetjmp and
 * the clearing of a thread-local pointer to its jump buffer. A SIGBUS raised
 * while that pointer is set jumps back (siglongjmp) and the copy reports the
 * fault: copy() returns a short (empty) result, as os.pread does at the end of a
 * file, and read_changed() returns None. No Python API is called inside a
 * guarded window (only loads and memcpy), so jumping out of one leaves nothing
 * half done. The pointer is per thread (initial-exec TLS: reading it in the
 * handler allocates nothing), so threads copying at once each get their own
 * jump; the handler uses SA_NODEFER and an empty mask, so nothing stays blocked
 * after the jump and sigsetjmp need not save the mask (no syscall per copy).
 * Any other SIGBUS goes to the disposition that was there before (default:
 * the process dies, as it would without this module). install_guard() puts the
 * handler back on top when something replaced it after import (faulthandler).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

#define BUFFER_HEADER 32
#define CRC_MUL 0x9E3779B1ULL

static uint32_t crc_table[256];

static void
crc_init(void)
{
    /* CRC-32, reflected polynomial 0xEDB88320: the one zlib and binascii use. */
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t
crc32_seeded(uint32_t seed, const unsigned char *p, Py_ssize_t len)
{
    /* Same value as binascii.crc32(data, seed). */
    uint32_t c = ~seed;
    while (len-- > 0)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return ~c;
}


/* -- SIGBUS guard --------------------------------------------------------------- */

/* The jump buffer of the guarded copy this thread is in, or NULL. */
static __thread sigjmp_buf *guard_env __attribute__((tls_model("initial-exec")));
static struct sigaction previous_bus;  /* what SIGBUS did before install_guard() */

static void
on_sigbus(int sig, siginfo_t *info, void *context)
{
    (void)context;
    sigjmp_buf *env = guard_env;
    if (env != NULL) {
        guard_env = NULL;
        siglongjmp(*env, 1);
    }
    /* Not raised by a guarded copy: hand SIGBUS back to what was there before.
       A fault re-runs the faulting access on return and meets it; a signal sent
       by kill() or raise() is sent again. */
    sigaction(SIGBUS, &previous_bus, NULL);
    if (info == NULL || info->si_code <= 0)
        raise(sig);
}

/* Install on_sigbus unless it is already SIGBUS's handler; -1 with errno on failure. */
static int
ensure_handler(void)
{
    struct sigaction current, ours;
    if (sigaction(SIGBUS, NULL, &current) < 0)
        return -1;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus)
        return 0;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_sigbus;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&ours.sa_mask);
    previous_bus = current;
    return sigaction(SIGBUS, &ours, NULL);
}

/* A guarded window: `if (sigsetjmp(env, 0) != 0) return -1; GUARD_ARM(env); ... GUARD_END();`
   (sigsetjmp as the whole controlling expression, as C allows). The compiler
   barriers keep the window's loads between the two pointer stores. */
#define GUARD_ARM(env) \
    do { guard_env = &(env); __atomic_signal_fence(__ATOMIC_SEQ_CST); } while (0)
#define GUARD_END() \
    do { __atomic_signal_fence(__ATOMIC_SEQ_CST); guard_env = NULL; } while (0)

/* memcpy from a mapping; 0, or -1 when the mapping faulted (file truncated). */
static int
guarded_copy(void *dst, const void *src, size_t len)
{
    sigjmp_buf env;
    if (sigsetjmp(env, 0) != 0)
        return -1;
    GUARD_ARM(env);
    memcpy(dst, src, len);
    GUARD_END();
    return 0;
}

/* The first three words of a buffer (state with acquire); 0, or -1 on a fault. */
static int
guarded_head(const uint64_t *words, uint64_t *state, uint64_t *t, uint64_t *lc)
{
    sigjmp_buf env;
    if (sigsetjmp(env, 0) != 0)
        return -1;
    GUARD_ARM(env);
    *state = __atomic_load_n(&words[0], __ATOMIC_ACQUIRE);
    *t = __atomic_load_n(&words[1], __ATOMIC_RELAXED);
    *lc = __atomic_load_n(&words[2], __ATOMIC_RELAXED);
    GUARD_END();
    return 0;
}

/* Copy a payload, then (after an acquire fence) load the state word again; 0 or -1. */
static int
guarded_payload(char *dst, const unsigned char *src, size_t len, const uint64_t *state_word,
                uint64_t *state_after)
{
    sigjmp_buf env;
    if (sigsetjmp(env, 0) != 0)
        return -1;
    GUARD_ARM(env);
    memcpy(dst, src, len);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    *state_after = __atomic_load_n(state_word, __ATOMIC_RELAXED);
    GUARD_END();
    return 0;
}

static PyObject *str_dp_rank, *str_seq, *str_publish_time_ns;

/* Read the changed ranks into the cache; return the ranks left to the slow path. */
static PyObject *
read_changed(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "read_changed(region, seqs, cache, cache_seq, buffers, capacity, decode)");
        return NULL;
    }
    PyObject *region = args[0], *seqs = args[1], *cache = args[2], *cache_seq = args[3];
    PyObject *buffers = args[4], *decode = args[6];
    if (!PyTuple_Check(seqs) || !PyList_Check(cache) || !PyList_Check(cache_seq) ||
        !PyList_Check(buffers)) {
        PyErr_SetString(PyExc_TypeError, "seqs must be a tuple; cache, cache_seq, buffers lists");
        return NULL;
    }
    Py_ssize_t ranks = PyTuple_GET_SIZE(seqs);
    if (PyList_GET_SIZE(cache) != ranks || PyList_GET_SIZE(cache_seq) != ranks ||
        PyList_GET_SIZE(buffers) != 2 * ranks) {
        PyErr_SetString(PyExc_ValueError, "seqs, cache, cache_seq and buffers disagree on the rank count");
        return NULL;
    }
    unsigned long long capacity = PyLong_AsUnsignedLongLong(args[5]);
    if (capacity == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;

    Py_buffer view;
    if (PyObject_GetBuffer(region, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *mem = view.buf;
    PyObject *slow = PyList_New(0);
    if (slow == NULL)
        goto error;

    for (Py_ssize_t r = 0; r < ranks; r++) {
        /* decode is a Python callable: never trust the lists' sizes across a call. */
        if (PyList_GET_SIZE(cache) != ranks || PyList_GET_SIZE(cache_seq) != ranks ||
            PyList_GET_SIZE(buffers) != 2 * ranks) {
            PyErr_SetString(PyExc_RuntimeError, "read_changed: a list changed size during the read");
            goto error;
        }
        unsigned long long n = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(seqs, r));
        unsigned long long cached = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(cache_seq, r));
        if (PyErr_Occurred())
            goto error;
        if (n == cached)
            continue;
        Py_ssize_t base = PyLong_AsSsize_t(PyList_GET_ITEM(buffers, 2 * r + (Py_ssize_t)(n & 1)));
        if (base == -1 && PyErr_Occurred())
            goto error;
        /* n > 2**63 - 1: 2n does not fit the state word (Python compares exactly). */
        if (n >> 63 || base < 0 || base % 8 != 0 || base + BUFFER_HEADER > view.len)
            goto slow_path;
        const uint64_t *words = (const uint64_t *)(mem + base);
        uint64_t state, t, lc, state_after;
        if (guarded_head(words, &state, &t, &lc) < 0)
            goto truncated;
        uint64_t size = lc >> 32;
        if (state != 2 * n || size > capacity || base + BUFFER_HEADER + (Py_ssize_t)size > view.len)
            goto slow_path;
        PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
        if (data == NULL)
            goto error;
        if (guarded_payload(PyBytes_AS_STRING(data), mem + base + BUFFER_HEADER, (size_t)size, &words[0],
                            &state_after) < 0) {
            Py_DECREF(data);
            goto truncated;
        }
        if (state_after != state ||
            crc32_seeded((uint32_t)((n * CRC_MUL) ^ t), (const unsigned char *)PyBytes_AS_STRING(data),
                         (Py_ssize_t)size) != (uint32_t)lc) {
            Py_DECREF(data);
            goto slow_path;
        }
        PyObject *snap = PyObject_CallOneArg(decode, data);
        Py_DECREF(data);
        if (snap == NULL) {
            /* Malformed payload behind a good checksum: the slow path counts it. */
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                goto error;
            PyErr_Clear();
            goto slow_path;
        }
        PyObject *rank_obj = PyObject_GetAttr(snap, str_dp_rank);
        if (rank_obj == NULL) {
            Py_DECREF(snap);
            goto error;
        }
        Py_ssize_t named = PyLong_Check(rank_obj) ? PyLong_AsSsize_t(rank_obj) : -1;
        Py_DECREF(rank_obj);
        PyErr_Clear();
        if (named != r) {
            Py_DECREF(snap);
            goto slow_path;
        }
        PyObject *n_obj = PyLong_FromUnsignedLongLong(n);
        PyObject *t_obj = PyLong_FromUnsignedLongLong(t);
        if (n_obj == NULL || t_obj == NULL ||
            PyObject_SetAttr(snap, str_seq, n_obj) < 0 ||
            PyObject_SetAttr(snap, str_publish_time_ns, t_obj) < 0) {
            Py_XDECREF(n_obj);
            Py_XDECREF(t_obj);
            Py_DECREF(snap);
            goto error;
        }
        Py_DECREF(t_obj);
        /* Both steal the reference (also on failure); the old entries are released. */
        if (PyList_SetItem(cache, r, snap) < 0) {
            Py_DECREF(n_obj);
            goto error;
        }
        if (PyList_SetItem(cache_seq, r, n_obj) < 0)
            goto error;
        continue;
    slow_path:;
        PyObject *rank_index = PyLong_FromSsize_t(r);
        if (rank_index == NULL || PyList_Append(slow, rank_index) < 0) {
            Py_XDECREF(rank_index);
            goto error;
        }
        Py_DECREF(rank_index);
    }
    PyBuffer_Release(&view);
    return slow;

truncated:  /* the file shrank under the mapping: the caller detaches */
    Py_DECREF(slow);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;

error:
    Py_XDECREF(slow);
    PyBuffer_Release(&view);
    return NULL;
}

/* copy(region, length, offset) -> bytes: like os.pread on the mapping, SIGBUS-safe. */
static PyObject *
copy(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy(region, length, offset)");
        return NULL;
    }
    Py_ssize_t length = PyLong_AsSsize_t(args[1]);
    if (length == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t offset = PyLong_AsSsize_t(args[2]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    if (length < 0 || offset < 0) {
        PyErr_SetString(PyExc_ValueError, "copy: length and offset must be >= 0");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    /* Past the end of the mapping: short, as pread is past the end of a file. */
    if (offset > view.len)
        offset = view.len;
    if (length > view.len - offset)
        length = view.len - offset;
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    if (out != NULL && length > 0 &&
        guarded_copy(PyBytes_AS_STRING(out), (const char *)view.buf + offset, (size_t)length) < 0) {
        Py_DECREF(out);
        out = PyBytes_FromStringAndSize(NULL, 0);  /* the file shrank: a short read */
    }
    PyBuffer_Release(&view);
    return out;
}

static PyObject *
install_guard(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(arg))
{
    if (ensure_handler() < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy", (PyCFunction)(void (*)(void))copy, METH_FASTCALL,
     "copy(region, length, offset) -> bytes\n\n"
     "length bytes of the mapping from offset, as os.pread(fd, length, offset) reads the\n"
     "file: shorter (empty) when the file was truncated under the mapping, never SIGBUS."},
    {"install_guard", install_guard, METH_NOARGS,
     "install_guard()\n\n"
     "Make the module's SIGBUS handler SIGBUS's handler again if something replaced it\n"
     "(it is installed at import); the replaced handler gets every SIGBUS not raised by\n"
     "a guarded copy."},
    {"read_changed", (PyCFunction)(void (*)(void))read_changed, METH_FASTCALL,
     "read_changed(region, seqs, cache, cache_seq, buffers, capacity, decode) -> list[int]\n\n"
     "Read every rank whose sequence in seqs differs from cache_seq into cache and\n"
     "cache_seq; return the ranks that need ShmReader's Python path, or None when the\n"
     "file was truncated under the mapping (SIGBUS caught; see copy)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "loadsvc.core._shmfast",
    "The changed-rank loop of ShmReader.read_all in C (optional; see loadsvc/core/region.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__shmfast(void)
{
    crc_init();
    str_dp_rank = PyUnicode_InternFromString("dp_rank");
    str_seq = PyUnicode_InternFromString("seq");
    str_publish_time_ns = PyUnicode_InternFromString("publish_time_ns");
    if (str_dp_rank == NULL || str_seq == NULL || str_publish_time_ns == NULL)
        return NULL;
    if (ensure_handler() < 0)  /* ImportError: loadsvc/core/region.py then reads with os.pread */
        return PyErr_Format(PyExc_ImportError, "loadsvc.core._shmfast: cannot install a SIGBUS handler: %s",
                            strerror(errno));
    return PyModule_Create(&module_def);
}
