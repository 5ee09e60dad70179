/*
 * loadsvc._shmfast: the changed-rank loop of ShmReader.read_all in C.
 *
 * Optional: loadsvc/shm.py falls back to the same loop in Python when this
 * module was not built (no compiler at install time), and tests run both.
 * It reads the layout documented in loadsvc/shm.py and keeps its rules:
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
        uint64_t state = __atomic_load_n(&words[0], __ATOMIC_ACQUIRE);
        uint64_t t = __atomic_load_n(&words[1], __ATOMIC_RELAXED);
        uint64_t lc = __atomic_load_n(&words[2], __ATOMIC_RELAXED);
        uint64_t size = lc >> 32;
        if (state != 2 * n || size > capacity || base + BUFFER_HEADER + (Py_ssize_t)size > view.len)
            goto slow_path;
        PyObject *data = PyBytes_FromStringAndSize((const char *)mem + base + BUFFER_HEADER,
                                                   (Py_ssize_t)size);
        if (data == NULL)
            goto error;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&words[0], __ATOMIC_RELAXED) != state ||
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

error:
    Py_XDECREF(slow);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"read_changed", (PyCFunction)(void (*)(void))read_changed, METH_FASTCALL,
     "read_changed(region, seqs, cache, cache_seq, buffers, capacity, decode) -> list[int]\n\n"
     "Read every rank whose sequence in seqs differs from cache_seq into cache and\n"
     "cache_seq; return the ranks that need ShmReader's Python path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "loadsvc._shmfast",
    "The changed-rank loop of ShmReader.read_all in C (optional; see loadsvc/shm.py).", -1, methods,
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
    return PyModule_Create(&module_def);
}
