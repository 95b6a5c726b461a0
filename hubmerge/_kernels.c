/* Fused CPU kernels for the merge loop: TIES' magnitude histograms and merge, weighted sums, and the Gram
 * matrices of SLERP's and Model Stock's angles.
 *
 * Why C: in torch each step of a merge (cast, subtract, abs, compare, multiply, add, cast back) is its own
 * pass over the block, and TIES is a dozen such steps per model plus two histogram passes. Here one loop over
 * a chunk of 256 elements does them all while the chunk sits in L1; the arithmetic is the same float32
 * operations, in the same order, as the torch functions in hubmerge/methods, so the results agree bit for bit
 * (tests/test_kernels.py checks it). The one exception is a sum over a whole tensor (gram_sum), whose order no
 * two implementations share: it is float64, so the two paths agree to the last bits of a float64. hubmerge/kernels.py decides when these are used; without this module
 * (no compiler at install time, HUBMERGE_KERNELS=0, a GPU, float64) the torch path runs.
 *
 * Every function takes raw addresses (torch's data_ptr()) and element counts, checks nothing the Python
 * wrapper has checked, and releases the GIL: the engine's worker threads run them in parallel.
 * Element types: 0 = bfloat16, 1 = float32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define CHUNK 256
#define LANES 8
#define MAX_MODELS 16

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef int16_t vs __attribute__((vector_size(16))); /* LANES random 16-bit lanes (DARE) */
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd __attribute__((vector_size(32))); /* half of LANES, widened (Gram sums) */

/* Each kernel is compiled twice: for AVX2 with FMA, which any x86-64 of the last decade has, and for the
 * baseline; the module picks one when it loads. `a + b * c` is contracted to one fused multiply-add
 * (setup.py passes -ffp-contract=fast) exactly where torch's vectorized kernels use one (add and sub with an
 * alpha); everywhere else the product is exact, fused or not. */
#if defined(__x86_64__) && defined(__GNUC__)
#define X86_DISPATCH 1
#define FAST __attribute__((target("avx2,fma")))
#else
#define X86_DISPATCH 0
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

INLINE vf splat(float x) { return (vf){0} + x; }

/* Elements [off, off + n) of src as float32 in dst; the rest of the chunk is zero. */
INLINE void load_chunk(float *restrict dst, const void *src, int type, int64_t off, int n) {
    if (type == 0) {
        const uint16_t *s = (const uint16_t *)src + off;
        uint32_t *d = (uint32_t *)dst;
        for (int j = 0; j < n; j++) d[j] = (uint32_t)s[j] << 16;
    } else {
        memcpy(dst, (const float *)src + off, (size_t)n * 4);
    }
    for (int j = n; j < CHUNK; j++) dst[j] = 0.0f;
}

/* float32 to the output type, rounding to nearest even like torch (NaN stays a quiet NaN). */
INLINE void store_chunk(void *dst, int type, int64_t off, const float *src, int n) {
    if (type == 0) {
        uint16_t *d = (uint16_t *)dst + off;
        const uint32_t *s = (const uint32_t *)src;
        for (int j = 0; j < n; j++) {
            uint32_t u = s[j];
            d[j] = (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u)
                                                                 : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16));
        }
    } else {
        memcpy((float *)dst + off, src, (size_t)n * 4);
    }
}

/* Per model, a histogram over 65536 bins of 16 bits of |x - base| read as an integer (non-negative floats
 * order like their bit patterns). Level 0 counts the top 16 bits of every entry; level 1 the low 16 bits of
 * the entries whose top 16 bits equal the model's prefix. Models with skip[k] are left alone. One model at a
 * time, so only its 512 KiB of bins compete for the cache. */
INLINE void ties_hist(int64_t n, int m, const void *const *xs, const int *types, const void *base, int base_type,
                      int level, const uint32_t *prefix, const uint8_t *skip, int64_t *hist) {
    float b[CHUNK] __attribute__((aligned(32)));
    float x[CHUNK] __attribute__((aligned(32)));
    int32_t key[CHUNK] __attribute__((aligned(32)));
    for (int k = 0; k < m; k++) {
        if (skip[k]) continue;
        int64_t *h = hist + (int64_t)k * 65536;
        const int32_t p = (int32_t)prefix[k];
        for (int64_t off = 0; off < n; off += CHUNK) {
            int c = n - off < CHUNK ? (int)(n - off) : CHUNK;
            load_chunk(b, base, base_type, off, c);
            load_chunk(x, xs[k], types[k], off, c);
            if (level == 0) {
                for (int j = 0; j < CHUNK; j += LANES) {
                    vi d = ((vi)(vload(x + j) - vload(b + j)) & 0x7fffffff) >> 16;
                    memcpy(key + j, &d, sizeof d);
                }
                for (int j = 0; j < c; j++) h[key[j]]++;
                continue;
            }
            /* Few entries carry the prefix: test eight at a time and look closer only where one does. */
            int full = c - c % LANES;
            for (int j = 0; j < full; j += LANES) {
                vi d = (vi)(vload(x + j) - vload(b + j)) & 0x7fffffff;
                vi hit = (d >> 16) == p;
                uint64_t lanes[4];
                memcpy(lanes, &hit, sizeof lanes);
                if ((lanes[0] | lanes[1] | lanes[2] | lanes[3]) == 0) continue;
                memcpy(key + j, &d, sizeof d);
                for (int i = j; i < j + LANES; i++)
                    if ((key[i] >> 16) == p) h[key[i] & 0xffff]++;
            }
            for (int j = full; j < c; j++) {
                float d = x[j] - b[j];
                int32_t bits;
                memcpy(&bits, &d, sizeof bits);
                bits &= 0x7fffffff;
                if ((bits >> 16) == p) h[bits & 0xffff]++;
            }
        }
    }
}

/* Random lanes [off, off + n) of src in dst (DARE); the rest of the chunk is zero. */
INLINE void load_lanes(int16_t *restrict dst, const int16_t *src, int64_t off, int n) {
    memcpy(dst, src + off, (size_t)n * sizeof dst[0]);
    memset(dst + n, 0, (size_t)(CHUNK - n) * sizeof dst[0]);
}

/* All bits set where lane[j + i] < cut: the entries DARE keeps. */
INLINE vi lane_below(const int16_t *lane, int j, vs cut) {
    vs l;
    memcpy(&l, lane + j, sizeof l);
    return __builtin_convertvector(l < cut, vi);
}

/* TIES on n elements, as hubmerge.methods.blocks.ties_block: keep |x - base| >= threshold (NaN: none),
 * multiply by the scale, elect the sign of the sum (+ where it is 0), sum the agreeing entries, divide by the
 * agreeing weights.
 * With lanes[k] (DARE, as hubmerge.methods.task_vectors.dare_ties), model k also keeps only the entries whose
 * random 16-bit lane is below cuts[k]. TIES passes its weights as the scales. */
INLINE void ties_merge(int64_t n, int m, const void *const *xs, const int *types, const void *base,
                       int base_type, const float *thresholds, const float *scales, const int16_t *const *lanes,
                       const int *cuts, const float *weights, float lambda, int normalize, void *out,
                       int out_type) {
    int16_t lane[CHUNK] __attribute__((aligned(32)));
    float b[CHUNK] __attribute__((aligned(32)));
    float x[CHUNK] __attribute__((aligned(32)));
    float e[MAX_MODELS][CHUNK] __attribute__((aligned(32)));
    float sign[CHUNK] __attribute__((aligned(32)));
    float acc[CHUNK] __attribute__((aligned(32)));
    float div[CHUNK] __attribute__((aligned(32)));
    const vf one = splat(1.0f), lam = splat(lambda);
    for (int64_t off = 0; off < n; off += CHUNK) {
        int c = n - off < CHUNK ? (int)(n - off) : CHUNK;
        load_chunk(b, base, base_type, off, c);
        for (int k = 0; k < m; k++) {
            if (thresholds[k] != thresholds[k]) { /* NaN: the model keeps nothing (torch zero_()s it) */
                memset(e[k], 0, sizeof e[k]);
                continue;
            }
            load_chunk(x, xs[k], types[k], off, c);
            const vf t = splat(thresholds[k]), w = splat(scales[k]);
            if (lanes[k] != NULL) {
                load_lanes(lane, lanes[k], off, c);
                const vs cut = (vs){0} + (int16_t)cuts[k];
                for (int j = 0; j < CHUNK; j += LANES) {
                    vf d = vload(x + j) - vload(b + j);
                    vi keep = ((vf)((vi)d & 0x7fffffff) >= t) & lane_below(lane, j, cut);
                    vstore(e[k] + j, d * (vf)((vi)w & keep));
                }
                continue;
            }
            for (int j = 0; j < CHUNK; j += LANES) {
                vf d = vload(x + j) - vload(b + j);
                vi keep = (vf)((vi)d & 0x7fffffff) >= t;
                vstore(e[k] + j, d * (vf)((vi)w & keep));
            }
        }
        for (int j = 0; j < CHUNK; j += LANES) {
            vf total = vload(e[0] + j);
            for (int k = 1; k < m; k++) total += vload(e[k] + j);
            /* +1 where the sum is >= 0 (a tie elects +, as mergekit and PEFT do), -1 below, 0 for NaN */
            vstore(sign + j, __builtin_convertvector((total < 0) - (total >= 0), vf));
        }
        for (int k = 0; k < m; k++) {
            const vf w = splat(weights[k]);
            for (int j = 0; j < CHUNK; j += LANES) {
                vf ek = vload(e[k] + j);
                vf s = __builtin_convertvector((ek < 0) - (ek > 0), vf);
                vf agree = (vf)((vi)one & (s == vload(sign + j)));
                if (k == 0) {
                    vstore(acc + j, ek * agree);
                    vstore(div + j, agree * w);
                } else {
                    vstore(acc + j, vload(acc + j) + ek * agree);
                    vstore(div + j, vload(div + j) + agree * w);
                }
            }
        }
        for (int j = 0; j < CHUNK; j += LANES) {
            vf r = vload(acc + j);
            if (normalize) {
                vf d = vload(div + j);
                r = r / (d + (vf)((vi)one & (d == 0)));
            }
            vstore(acc + j, vload(b + j) + lam * r);
        }
        store_chunk(out, out_type, off, acc, c);
    }
}

/* DARE-linear on n elements, as hubmerge.methods.task_vectors.dare_linear: out = base, then per model
 * out = out + (value * (x - base)) * keep, as torch's addcmul computes it; keep is 1 where the entry's random
 * lane is below cuts[k], else 0, or keeps[k] everywhere where lanes[k] is NULL. */
INLINE void dare_sum(int64_t n, int m, const void *const *xs, const int *types, const void *base, int base_type,
                     const int16_t *const *lanes, const int *cuts, const float *keeps, const float *values,
                     void *out, int out_type) {
    float b[CHUNK] __attribute__((aligned(32)));
    float x[CHUNK] __attribute__((aligned(32)));
    float acc[CHUNK] __attribute__((aligned(32)));
    int16_t lane[CHUNK] __attribute__((aligned(32)));
    const vf one = splat(1.0f);
    for (int64_t off = 0; off < n; off += CHUNK) {
        int c = n - off < CHUNK ? (int)(n - off) : CHUNK;
        load_chunk(b, base, base_type, off, c);
        memcpy(acc, b, sizeof acc);
        for (int k = 0; k < m; k++) {
            load_chunk(x, xs[k], types[k], off, c);
            const vf v = splat(values[k]), all = splat(keeps[k]);
            const vs cut = (vs){0} + (int16_t)cuts[k];
            if (lanes[k] != NULL) load_lanes(lane, lanes[k], off, c);
            for (int j = 0; j < CHUNK; j += LANES) {
                vf keep = lanes[k] != NULL ? (vf)((vi)one & lane_below(lane, j, cut)) : all;
                /* keep is 0 or 1: fused or not, the product is exact and the add rounds once, as in torch */
                vstore(acc + j, vload(acc + j) + (v * (vload(x + j) - vload(b + j))) * keep);
            }
        }
        store_chunk(out, out_type, off, acc, c);
    }
}

/* sum_k coefficients[k] * x_k, accumulated left to right (acc = c0 * x0, then acc = acc + ck * xk, fused as
 * torch's add with an alpha), then divided by divisor unless it is 1. */
INLINE void weighted_sum(int64_t n, int m, const void *const *xs, const int *types, const float *coefficients,
                         float divisor, void *out, int out_type) {
    float x[CHUNK] __attribute__((aligned(32)));
    float acc[CHUNK] __attribute__((aligned(32)));
    const vf by = splat(divisor);
    for (int64_t off = 0; off < n; off += CHUNK) {
        int c = n - off < CHUNK ? (int)(n - off) : CHUNK;
        for (int k = 0; k < m; k++) {
            load_chunk(x, xs[k], types[k], off, c);
            const vf w = splat(coefficients[k]);
            for (int j = 0; j < CHUNK; j += LANES)
                vstore(acc + j, k == 0 ? vload(x + j) * w : vload(acc + j) + vload(x + j) * w);
        }
        if (divisor != 1.0f)
            for (int j = 0; j < CHUNK; j += LANES) vstore(acc + j, vload(acc + j) / by);
        store_chunk(out, out_type, off, acc, c);
    }
}

INLINE vd vload_wide(const float *p) {
    vf4 v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, vd);
}

INLINE vd vload_double(const double *p) {
    vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void vstore_double(double *p, vd v) { memcpy(p, &v, sizeof v); }

#define GRAM_ACCS 4 /* independent sums per pair, to keep the FMA units busy */

/* Adds to gram (m x m, row-major) the dot products d_i . d_j, i <= j, of d_k = x_k - base (float32, as torch
 * subtracts) or d_k = x_k without a base. Each product of two float32 values is exact in float64 and the sums
 * are float64, so the result differs from any other float64 summation (the torch path's) only in the last
 * bits of the sum, never by the float32 roundings a float32 dot product accumulates. Each chunk of d_k is
 * widened once; every pair then reads the widened chunks. */
INLINE void gram_sum(int64_t n, int m, const void *const *xs, const int *types, const void *base, int base_type,
                     double *gram) {
    float b[CHUNK] __attribute__((aligned(32)));
    float x[CHUNK] __attribute__((aligned(32)));
    double d[MAX_MODELS][CHUNK] __attribute__((aligned(32)));
    vd acc[MAX_MODELS * (MAX_MODELS + 1) / 2][GRAM_ACCS];
    memset(acc, 0, sizeof acc);
    for (int64_t off = 0; off < n; off += CHUNK) {
        int c = n - off < CHUNK ? (int)(n - off) : CHUNK;
        if (base != NULL) load_chunk(b, base, base_type, off, c);
        for (int k = 0; k < m; k++) {
            load_chunk(x, xs[k], types[k], off, c);
            if (base != NULL)
                for (int j = 0; j < CHUNK; j += LANES) vstore(x + j, vload(x + j) - vload(b + j));
            /* past c the chunk is zero (load_chunk), so the padding adds nothing */
            for (int j = 0; j < CHUNK; j += 4) vstore_double(d[k] + j, vload_wide(x + j));
        }
        for (int i = 0, p = 0; i < m; i++)
            for (int k = i; k < m; k++, p++) {
                vd a0 = acc[p][0], a1 = acc[p][1], a2 = acc[p][2], a3 = acc[p][3];
                for (int j = 0; j < CHUNK; j += 4 * GRAM_ACCS) {
                    a0 += vload_double(d[i] + j) * vload_double(d[k] + j);
                    a1 += vload_double(d[i] + j + 4) * vload_double(d[k] + j + 4);
                    a2 += vload_double(d[i] + j + 8) * vload_double(d[k] + j + 8);
                    a3 += vload_double(d[i] + j + 12) * vload_double(d[k] + j + 12);
                }
                acc[p][0] = a0;
                acc[p][1] = a1;
                acc[p][2] = a2;
                acc[p][3] = a3;
            }
    }
    for (int i = 0, p = 0; i < m; i++)
        for (int k = i; k < m; k++, p++) {
            vd v = (acc[p][0] + acc[p][1]) + (acc[p][2] + acc[p][3]);
            gram[i * m + k] += (v[0] + v[1]) + (v[2] + v[3]);
        }
}

/* The two compiled copies of each kernel, and the one this CPU runs. */
#define HIST_ARGS int64_t n, int m, const void *const *xs, const int *types, const void *base, int base_type, \
    int level, const uint32_t *prefix, const uint8_t *skip, int64_t *hist
#define HIST_CALL n, m, xs, types, base, base_type, level, prefix, skip, hist
#define MERGE_ARGS int64_t n, int m, const void *const *xs, const int *types, const void *base, int base_type, \
    const float *thresholds, const float *scales, const int16_t *const *lanes, const int *cuts, \
    const float *weights, float lambda, int normalize, void *out, int out_type
#define MERGE_CALL n, m, xs, types, base, base_type, thresholds, scales, lanes, cuts, weights, lambda, normalize, \
    out, out_type
#define SUM_ARGS int64_t n, int m, const void *const *xs, const int *types, const float *coefficients, \
    float divisor, void *out, int out_type
#define SUM_CALL n, m, xs, types, coefficients, divisor, out, out_type
#define DARE_ARGS int64_t n, int m, const void *const *xs, const int *types, const void *base, int base_type, \
    const int16_t *const *lanes, const int *cuts, const float *keeps, const float *values, void *out, int out_type
#define DARE_CALL n, m, xs, types, base, base_type, lanes, cuts, keeps, values, out, out_type
#define GRAM_ARGS int64_t n, int m, const void *const *xs, const int *types, const void *base, int base_type, \
    double *gram
#define GRAM_CALL n, m, xs, types, base, base_type, gram

static void hist_base(HIST_ARGS) { ties_hist(HIST_CALL); }
static void merge_base(MERGE_ARGS) { ties_merge(MERGE_CALL); }
static void sum_base(SUM_ARGS) { weighted_sum(SUM_CALL); }
static void dare_base(DARE_ARGS) { dare_sum(DARE_CALL); }
static void gram_base(GRAM_ARGS) { gram_sum(GRAM_CALL); }
static void (*run_hist)(HIST_ARGS) = hist_base;
static void (*run_merge)(MERGE_ARGS) = merge_base;
static void (*run_sum)(SUM_ARGS) = sum_base;
static void (*run_dare)(DARE_ARGS) = dare_base;
static void (*run_gram)(GRAM_ARGS) = gram_base;
static const char *variant = "baseline";

#if X86_DISPATCH
FAST static void hist_fast(HIST_ARGS) { ties_hist(HIST_CALL); }
FAST static void merge_fast(MERGE_ARGS) { ties_merge(MERGE_CALL); }
FAST static void sum_fast(SUM_ARGS) { weighted_sum(SUM_CALL); }
FAST static void dare_fast(DARE_ARGS) { dare_sum(DARE_CALL); }
FAST static void gram_fast(GRAM_ARGS) { gram_sum(GRAM_CALL); }
#endif

static void choose_variant(void) {
#if X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        run_hist = hist_fast;
        run_merge = merge_fast;
        run_sum = sum_fast;
        run_dare = dare_fast;
        run_gram = gram_fast;
        variant = "avx2+fma";
    }
#endif
}

/* ---- Python bindings: addresses and numbers in, nothing out; the wrapper in kernels.py checks them. ---- */

static int parse_addresses(PyObject *seq, int m, const void **addresses, int *types, PyObject *type_seq) {
    for (int k = 0; k < m; k++) {
        PyObject *a = PySequence_GetItem(seq, k), *t = PySequence_GetItem(type_seq, k);
        if (a == NULL || t == NULL) {
            Py_XDECREF(a);
            Py_XDECREF(t);
            return -1;
        }
        addresses[k] = PyLong_AsVoidPtr(a);
        types[k] = (int)PyLong_AsLong(t);
        Py_DECREF(a);
        Py_DECREF(t);
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

static int parse_floats(PyObject *seq, int m, float *values) {
    for (int k = 0; k < m; k++) {
        PyObject *v = PySequence_GetItem(seq, k);
        if (v == NULL) return -1;
        values[k] = (float)PyFloat_AsDouble(v);
        Py_DECREF(v);
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

static int model_count(PyObject *seq) {
    Py_ssize_t m = PySequence_Size(seq);
    if (m < 1 || m > MAX_MODELS) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "1 to %d models, got %zd", MAX_MODELS, m);
        return -1;
    }
    return (int)m;
}

static PyObject *py_ties_hist(PyObject *self, PyObject *args) {
    Py_ssize_t n;
    PyObject *xs_obj, *types_obj, *prefix_obj, *skip_obj, *base_obj, *hist_obj;
    int base_type, level;
    if (!PyArg_ParseTuple(args, "nOOOiiOOO", &n, &xs_obj, &types_obj, &base_obj, &base_type, &level,
                          &prefix_obj, &skip_obj, &hist_obj))
        return NULL;
    int m = model_count(xs_obj);
    if (m < 0) return NULL;
    const void *xs[MAX_MODELS];
    int types[MAX_MODELS];
    uint32_t prefix[MAX_MODELS];
    uint8_t skip[MAX_MODELS];
    if (parse_addresses(xs_obj, m, xs, types, types_obj) < 0) return NULL;
    for (int k = 0; k < m; k++) {
        PyObject *p = PySequence_GetItem(prefix_obj, k), *s = PySequence_GetItem(skip_obj, k);
        if (p == NULL || s == NULL) {
            Py_XDECREF(p);
            Py_XDECREF(s);
            return NULL;
        }
        prefix[k] = (uint32_t)PyLong_AsUnsignedLong(p);
        skip[k] = (uint8_t)PyObject_IsTrue(s);
        Py_DECREF(p);
        Py_DECREF(s);
        if (PyErr_Occurred()) return NULL;
    }
    const void *base = PyLong_AsVoidPtr(base_obj);
    int64_t *hist = (int64_t *)PyLong_AsVoidPtr(hist_obj);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS run_hist(n, m, xs, types, base, base_type, level, prefix, skip, hist);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_ties_merge(PyObject *self, PyObject *args) {
    Py_ssize_t n;
    PyObject *xs_obj, *types_obj, *base_obj, *th_obj, *sc_obj, *lanes_obj, *cuts_obj, *w_obj, *out_obj;
    int base_type, normalize, out_type;
    float lambda;
    if (!PyArg_ParseTuple(args, "nOOOiOOOOOfpOi", &n, &xs_obj, &types_obj, &base_obj, &base_type, &th_obj,
                          &sc_obj, &lanes_obj, &cuts_obj, &w_obj, &lambda, &normalize, &out_obj, &out_type))
        return NULL;
    int m = model_count(xs_obj);
    if (m < 0) return NULL;
    const void *xs[MAX_MODELS], *lanes[MAX_MODELS];
    int types[MAX_MODELS], cuts[MAX_MODELS];
    float thresholds[MAX_MODELS], scales[MAX_MODELS], weights[MAX_MODELS];
    /* lanes: addresses of int16 arrays (0: no lanes); cuts: their bounds, read with the same parser. */
    if (parse_addresses(xs_obj, m, xs, types, types_obj) < 0 || parse_floats(th_obj, m, thresholds) < 0 ||
        parse_floats(sc_obj, m, scales) < 0 || parse_addresses(lanes_obj, m, lanes, cuts, cuts_obj) < 0 ||
        parse_floats(w_obj, m, weights) < 0)
        return NULL;
    const void *base = PyLong_AsVoidPtr(base_obj);
    void *out = PyLong_AsVoidPtr(out_obj);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS run_merge(n, m, xs, types, base, base_type, thresholds, scales,
                                      (const int16_t *const *)lanes, cuts, weights, lambda, normalize, out,
                                      out_type);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_weighted_sum(PyObject *self, PyObject *args) {
    Py_ssize_t n;
    PyObject *xs_obj, *types_obj, *c_obj, *out_obj;
    int out_type;
    float divisor;
    if (!PyArg_ParseTuple(args, "nOOOfOi", &n, &xs_obj, &types_obj, &c_obj, &divisor, &out_obj, &out_type))
        return NULL;
    int m = model_count(xs_obj);
    if (m < 0) return NULL;
    const void *xs[MAX_MODELS];
    int types[MAX_MODELS];
    float coefficients[MAX_MODELS];
    if (parse_addresses(xs_obj, m, xs, types, types_obj) < 0 || parse_floats(c_obj, m, coefficients) < 0)
        return NULL;
    void *out = PyLong_AsVoidPtr(out_obj);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS run_sum(n, m, xs, types, coefficients, divisor, out, out_type);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_dare_sum(PyObject *self, PyObject *args) {
    Py_ssize_t n;
    PyObject *xs_obj, *types_obj, *base_obj, *lanes_obj, *cuts_obj, *keeps_obj, *values_obj, *out_obj;
    int base_type, out_type;
    if (!PyArg_ParseTuple(args, "nOOOiOOOOOi", &n, &xs_obj, &types_obj, &base_obj, &base_type, &lanes_obj,
                          &cuts_obj, &keeps_obj, &values_obj, &out_obj, &out_type))
        return NULL;
    int m = model_count(xs_obj);
    if (m < 0) return NULL;
    const void *xs[MAX_MODELS], *lanes[MAX_MODELS];
    int types[MAX_MODELS], cuts[MAX_MODELS];
    float keeps[MAX_MODELS], values[MAX_MODELS];
    if (parse_addresses(xs_obj, m, xs, types, types_obj) < 0 ||
        parse_addresses(lanes_obj, m, lanes, cuts, cuts_obj) < 0 || parse_floats(keeps_obj, m, keeps) < 0 ||
        parse_floats(values_obj, m, values) < 0)
        return NULL;
    const void *base = PyLong_AsVoidPtr(base_obj);
    void *out = PyLong_AsVoidPtr(out_obj);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS run_dare(n, m, xs, types, base, base_type, (const int16_t *const *)lanes, cuts, keeps,
                                     values, out, out_type);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_gram(PyObject *self, PyObject *args) {
    Py_ssize_t n;
    PyObject *xs_obj, *types_obj, *base_obj, *gram_obj;
    int base_type;
    if (!PyArg_ParseTuple(args, "nOOOiO", &n, &xs_obj, &types_obj, &base_obj, &base_type, &gram_obj)) return NULL;
    int m = model_count(xs_obj);
    if (m < 0) return NULL;
    const void *xs[MAX_MODELS];
    int types[MAX_MODELS];
    if (parse_addresses(xs_obj, m, xs, types, types_obj) < 0) return NULL;
    const void *base = PyLong_AsVoidPtr(base_obj); /* 0: no base */
    double *gram = (double *)PyLong_AsVoidPtr(gram_obj);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS run_gram(n, m, xs, types, base, base_type, gram);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* A memory-mapped input that shrinks under the merge (rewritten, truncated, a network disk that lost it) makes
 * the next read of a mapped page raise SIGBUS, which no Python handler can catch: the process would end with
 * "Bus error" alone. The command installs this handler instead: one line saying what happened, then the
 * usual exit status of a signal. Only async-signal-safe calls. */
static void on_sigbus(int sig) {
    static const char message[] =
        "error: an input file changed (shrank) while the merge read it (bus error) "
        "(hint: the finished tensors are kept: restore the inputs with their times, as `cp -p` does, and rerun "
        "with --resume, or rerun with --force)\n";
    ssize_t written = write(2, message, sizeof message - 1);
    (void)written;
    _exit(128 + sig);
}

static PyObject *py_catch_sigbus(PyObject *self, PyObject *args) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigbus;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, NULL) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"catch_sigbus", py_catch_sigbus, METH_NOARGS, "Report a bus error (an input that shrank) in one line."},
    {"dare_sum", py_dare_sum, METH_VARARGS, "DARE-linear sum of one span (see hubmerge/kernels.py)."},
    {"gram", py_gram, METH_VARARGS, "Gram matrix of one span, added in float64 (see hubmerge/kernels.py)."},
    {"ties_hist", py_ties_hist, METH_VARARGS, "TIES magnitude histogram (see hubmerge/kernels.py)."},
    {"ties_merge", py_ties_merge, METH_VARARGS, "TIES merge of one span (see hubmerge/kernels.py)."},
    {"weighted_sum", py_weighted_sum, METH_VARARGS, "Weighted sum of one span (see hubmerge/kernels.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU merge kernels.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    choose_variant();
    PyObject *mod = PyModule_Create(&module);
    if (mod != NULL) {
        PyModule_AddStringConstant(mod, "VARIANT", variant);
        PyModule_AddIntConstant(mod, "ABI", 4); /* bump with any change of the functions' arguments */
        PyModule_AddIntConstant(mod, "MAX_MODELS", MAX_MODELS);
        PyModule_AddIntConstant(mod, "CHUNK", CHUNK);
    }
    return mod;
}
