/* edgeinfer's native decode step: one call runs a token through every layer and the head.
 *
 * It reads the package's own weights (MLX's affine layout: row-major [out, in] values of 4, 5 or 8 bits,
 * others widened to 8, w = scale * q + bias per group of inputs, scales and biases float16 or float32),
 * repacked once at load (see the tiles below), and writes its keys and values into the same KV buffers as the ONNX
 * graph, which does prefill. Nothing is re-quantized, so the step computes the package's model:
 *
 *   y_m = sum_G scale_mG * (q_mG . x_G) + bias_mG * sum(x_G)
 *
 * Activations: ACT_F32 multiplies in float32 (the reference); ACT_I16 rounds each 32-input chunk of x to
 * int16 against the chunk's own max (error <= 2^-16 of that max, against 2^-8 for llama.cpp's int8 and
 * 2^-11 for the float16 activations of a GPU), so q . x is one vpmaddwd per 16 weights, summed exactly in
 * int32 over the chunk. Both accumulate in float32 per chunk.
 *
 * Built twice by setup.py: with -mavx2 -mfma -mf16c on x86-64 (the intrinsics below), and without (plain
 * loops the compiler vectorizes: NEON on aarch64, SSE2 elsewhere); Python picks by the CPU's flags.
 * Threads: a small pool whose caller also takes work items, so a worker the OS has descheduled on a
 * shared core delays nothing but its own item (an OpenMP barrier would wait for it).
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define EI_AVX2 1
#else
#define EI_AVX2 0
#endif

#define EI_ABI 11
#define MAX_THREADS 64

enum { ACT_F32 = 0, ACT_I16 = 1, ACT_I8 = 2 };

typedef struct {
    const uint8_t *q;      /* one stream per block of 8 rows (see the tiles below), m_out padded to a multiple of 8 */
    const float *bias;     /* [m_out] or NULL: the layer's additive bias (Qwen2's q/k/v) */
    int64_t row_bytes;
    int32_t n_in, m_out, bits, group, s32;
    int32_t zero;          /* 0, or symmetric groups: no biases stored, bias = -zero * scale (zero = 2^(bits-1)) */
    int32_t kq;            /* K-quant heads (a GGUF's Q4_K/Q5_K): scale = d * sc, bias = -dmin * m, see below */
    int32_t pad;
} ei_linear;

typedef struct {
    int32_t layers, heads, kv_heads, head_dim, hidden, inter, qk_norm, sandwich, gelu, vocab;
    float eps, attn_scale, attn_cap, final_cap, mscale, pad;
    const float *norms;     /* [layers + 1][4][hidden]: attn, mlp, post-attn, post-mlp; final at [layers][0] */
    const float *qk_norms;  /* [layers][2][head_dim] */
    const double *inv_freq; /* [layers][head_dim / 2] */
    const int64_t *windows; /* [layers]: sliding window, 0 for full attention */
    const ei_linear *lin;   /* [layers * 7 + 1]: q k v o gate up down per layer, then the head */
} ei_model;

/* ---------------------------------------------------------------------------------------------- pool */
typedef void (*task_fn)(void *arg, int item);

typedef struct {
    atomic_int job;  /* the job this slot holds; -1 while it is rewritten */
    task_fn fn;
    void *arg;
    int items;
    atomic_int done;
} slot_t;

typedef struct {
    int n;                 /* threads in all, the caller included */
    pthread_t th[MAX_THREADS];
    atomic_uint_fast64_t work;  /* job << 32 | next item */
    atomic_int gen;        /* the newest job published */
    atomic_int stop, sleepers;
    slot_t slot[2];
    pthread_mutex_t mu;
    pthread_cond_t cv;
} pool_t;

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Takes items of the current job until it runs dry; returns the job id seen. */
static int drain(pool_t *p) {
    for (;;) {
        uint64_t t = atomic_fetch_add(&p->work, 1);
        int j = (int)(t >> 32), i = (int)(t & 0xffffffffu);
        slot_t *s = &p->slot[j & 1];
        if (atomic_load(&s->job) != j) return j;
        int items = s->items;
        task_fn fn = s->fn;
        void *arg = s->arg;
        if (atomic_load(&s->job) != j || i >= items) return j;
        fn(arg, i);  /* an outstanding item keeps its slot from being rewritten */
        atomic_fetch_add(&s->done, 1);
    }
}

static void *worker(void *arg) {
    pool_t *p = arg;
    int seen = atomic_load(&p->gen);
    for (;;) {
        int spins = 0;
        while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) {
            if (++spins < 200000) { relax(); continue; }
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = atomic_load(&p->gen);
        drain(p);
    }
}

static void pool_run(pool_t *p, task_fn fn, void *arg, int items) {
    if (p->n <= 1 || items <= 1) {
        for (int i = 0; i < items; i++) fn(arg, i);
        return;
    }
    int j = atomic_load(&p->gen) + 1;
    slot_t *s = &p->slot[j & 1];
    atomic_store(&s->job, -1);
    s->fn = fn; s->arg = arg; s->items = items;
    atomic_store(&s->done, 0);
    atomic_store(&s->job, j);
    atomic_store(&p->work, (uint64_t)j << 32);
    atomic_store(&p->gen, j);
    if (atomic_load(&p->sleepers)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    drain(p);
    while (atomic_load(&s->done) < items) relax();
}

static pool_t *pool_new(int n) {
    pool_t *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : n);
    atomic_store(&p->slot[0].job, -1);
    atomic_store(&p->slot[1].job, -1);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (int i = 1; i < p->n; i++)
        if (pthread_create(&p->th[i], NULL, worker, p)) { p->n = i; break; }
    return p;
}

static void pool_free(pool_t *p) {
    if (!p) return;
    atomic_store(&p->stop, 1);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}

/* --------------------------------------------------------------------------------------- half floats */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (!man) bits = sign;
        else {  /* subnormal: normalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void to_float(const void *src, int s32, float *dst, int n) {
    if (s32) { memcpy(dst, src, (size_t)n * 4); return; }
    const uint16_t *h = src;
    int i = 0;
#if EI_AVX2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
#if EI_AVX2
    for (; i < n; i++) dst[i] = _cvtsh_ss(h[i]);
#else
    for (; i < n; i++) dst[i] = half_to_float(h[i]);
#endif
}

/* ----------------------------------------------------------------------------------- vector helpers */
#if EI_AVX2
/* exp(x), Cephes' single-precision polynomial (relative error ~1e-7, the same as expf's within float
 * rounding): the step's serial loops (SiLU, softmax) ran scalar expf at ~20 cycles a value. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* g <- act(g) * u: SiLU, or GELU with the tanh approximation (tanh z = 1 - 2 / (exp(2z) + 1)). */
static void gated(float *g, const float *u, int n, int gelu) {
    int i = 0;
#if EI_AVX2
    const __m256 one = _mm256_set1_ps(1.f), half = _mm256_set1_ps(0.5f);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(g + i), r;
        if (gelu) {
            __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                     _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
            __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(exp8(_mm256_add_ps(z, z)), one)));
            r = _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t));
        } else {
            r = _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
        }
        _mm256_storeu_ps(g + i, _mm256_mul_ps(r, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) {
        float v = g[i];
        v = gelu ? 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))) : v / (1.f + expf(-v));
        g[i] = v * u[i];
    }
}

static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
#if EI_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum8(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ------------------------------------------------------------------------------ prepared activations */
/* One input vector, prepared once for every module that reads it. */
typedef struct {
    int n, act;
    const float *x;
    int16_t *xi;          /* ACT_I16: x rounded per 32-input chunk, in the inputs' own order; ACT_I8: its bytes
                           * hold x rounded to int8, each 8 inputs in the order 0 4 1 5 2 6 3 7 (the 4-bit
                           * tiles' byte order, block8_tokens_i8) */
    float *xsc;           /* [n / 32]: the integer step of each chunk (1 for ACT_F32) */
    float *sums;          /* [n / 32]: exact float sum of each chunk; ACT_I8: the sum of the rounded values,
                           * so that the biases' term sees the x the products saw (w = sc q + bias with q up
                           * to 255: the exact sum would leave 128 sc times the chunk's rounding error) */
} act_t;

static void prepare(act_t *a, const float *x, int n, int act) {
    a->n = n; a->act = act; a->x = x;
#if EI_AVX2
    if (act == ACT_I16 || act == ACT_I8) {
        const float top = act == ACT_I8 ? 127.f : 32767.f;
        const __m256i order = _mm256_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15,
                                               0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
        const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int c = 0; c < n / 32; c++) {
            const float *v = x + 32 * c;
            __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
            a->sums[c] = hsum8(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
            __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, nosign), _mm256_and_ps(v1, nosign)),
                                     _mm256_max_ps(_mm256_and_ps(v2, nosign), _mm256_and_ps(v3, nosign)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
            float inv = amax > 0.f ? top / amax : 0.f;
            a->xsc[c] = amax / top;
            __m256 iv = _mm256_set1_ps(inv);
            /* cvtps rounds to nearest even, as lrintf; packs works per 128-bit lane, the permute restores the order */
            __m256i p01 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v0, iv)), _mm256_cvtps_epi32(_mm256_mul_ps(v1, iv)));
            __m256i p23 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v2, iv)), _mm256_cvtps_epi32(_mm256_mul_ps(v3, iv)));
            p01 = _mm256_permute4x64_epi64(p01, 0xD8);
            p23 = _mm256_permute4x64_epi64(p23, 0xD8);
            if (act == ACT_I8) {  /* the same rounding, then int16 -> int8 in order, then the tiles' byte order */
                __m256i b = _mm256_permute4x64_epi64(_mm256_packs_epi16(p01, p23), 0xD8);
                _mm256_storeu_si256((__m256i *)((int8_t *)a->xi + 32 * c), _mm256_shuffle_epi8(b, order));
                const __m256i one = _mm256_set1_epi16(1);
                __m256i s8 = _mm256_add_epi32(_mm256_madd_epi16(p01, one), _mm256_madd_epi16(p23, one));
                __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
                s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
                s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
                a->sums[c] = (float)_mm_cvtsi128_si32(s4) * a->xsc[c];
            } else {
                _mm256_storeu_si256((__m256i *)(a->xi + 32 * c), p01);
                _mm256_storeu_si256((__m256i *)(a->xi + 32 * c + 16), p23);
            }
        }
        return;
    }
#endif
    static const int order8[8] = {0, 2, 4, 6, 1, 3, 5, 7};  /* input i of 8 goes to byte order8[i] */
    int8_t *xb = (int8_t *)a->xi;
    for (int c = 0; c < n / 32; c++) {
        const float *v = x + 32 * c;
        float s = 0.f, amax = 0.f;
        for (int i = 0; i < 32; i++) { s += v[i]; float f = fabsf(v[i]); amax = f > amax ? f : amax; }
        a->sums[c] = s;
        if (act == ACT_F32) { a->xsc[c] = 1.f; continue; }
        float top = act == ACT_I8 ? 127.f : 32767.f, step = amax / top, inv = amax > 0.f ? top / amax : 0.f;
        a->xsc[c] = step;
        if (act == ACT_I8) {
            int isum = 0;
            for (int i = 0; i < 32; i++) {
                int r = (int)lrintf(v[i] * inv);
                xb[32 * c + (i & ~7) + order8[i & 7]] = (int8_t)r;
                isum += r;
            }
            a->sums[c] = (float)isum * step;
        } else
            for (int i = 0; i < 32; i++) a->xi[32 * c + i] = (int16_t)lrintf(v[i] * inv);
    }
}

/* ------------------------------------------------------------------------------- tiles of 8 rows */
/* The weights are repacked at load (edgeinfer/native/__init__.py, _stream) into one stream per block of
 * 8 output rows: for each group of inputs, the 8 rows' scales, their 8 biases (float16 or float32; none
 * for a symmetric linear, whose bias is -2^(bits-1) * scale: a GGUF's Q5_0 and Q8_0), then the group's
 * tiles of 8 rows by 32 inputs. K-quant heads (kq, groups of 32 in super-blocks of 8 groups): before
 * each super-block the 8 rows' d and -dmin (float16), and each group's head is the 8 rows' 6-bit sc and
 * m (a byte each): scale = d * sc and bias = -dmin * m, the float32 products the package stores, exactly
 * (0.625 bits a weight where the float32 pairs take 2). A tile is stored as 16-bit words, so that lane pair
 * (2r, 2r+1) of a word vector belongs to row r:
 *
 *   4 bits (128 bytes): 4 vectors of 16 words; vector l, word 2r+j holds in nibble k the value of row r,
 *                       input 8l + 2k + j;
 *   5 bits (160 bytes): the 4-bit tile of the low nibbles, then one vector whose word 2r+j holds in bit
 *                       4l + k the fifth bit of that same value;
 *   8 bits (256 bytes): 8 vectors; vector l, word 2r+j holds row r's inputs 4l + j (low byte) and
 *                       4l + 2 + j (high byte).
 *
 * A shift and a mask turn a vector into 16 int16 weights, and vpmaddwd against a broadcast pair of inputs
 * adds row r's two products into int32 lane r: the 8 rows' dot products end in one vector, with no
 * widening shuffles and no horizontal sums (one row's bytes per 128-bit lane, as before, spent half its
 * uops on vpmovzxbw and vphaddd). Decode reads weights from memory, so the layout is one sequential
 * stream per thread: separate scale and bias arrays, or two blocks read side by side, ran 10-30% slower
 * end to end on Zen 3, though faster with the weights in cache. */
#define RB 8

static inline int tile_bytes(int bits) { return bits == 4 ? 128 : bits == 5 ? 160 : 256; }

/* Bytes of a group's scales and biases, of the whole group, and of a block of 8 rows in the stream. */
static inline size_t head_bytes(const ei_linear *L) { return L->kq ? 2 * RB : (size_t)(L->zero ? 1 : 2) * RB * (L->s32 ? 4 : 2); }
static inline size_t group_bytes(const ei_linear *L) { return head_bytes(L) + (size_t)(L->group / 32) * tile_bytes(L->bits); }
static inline size_t block_bytes(const ei_linear *L) {
    int G = L->n_in / L->group;
    return (size_t)G * group_bytes(L) + (L->kq ? (size_t)(G / 8) * 4 * RB : 0);
}

/* Group g's 8 scales and 8 biases from its head at p (after the super-block's d and -dmin when kq, kept
 * in kd[16] across its 8 groups); returns where the group's tiles start. A symmetric group's biases are
 * -zero * scale, a power of two times it: the stored biases bit for bit. */
static const uint8_t *head8f(const ei_linear *L, const uint8_t *p, int g, float *sc, float *bi, float *kd) {
    if (L->kq) {
        if (g % 8 == 0) { to_float(p, 0, kd, RB); to_float(p + 2 * RB, 0, kd + RB, RB); p += 4 * RB; }
        for (int r = 0; r < RB; r++) { sc[r] = kd[r] * (float)p[r]; bi[r] = kd[RB + r] * (float)p[RB + r]; }
        return p + 2 * RB;
    }
    int es = L->s32 ? 4 : 2;
    to_float(p, L->s32, sc, RB);
    if (L->zero) {
        for (int r = 0; r < RB; r++) bi[r] = sc[r] * (float)-L->zero;
        return p + RB * es;
    }
    to_float(p + RB * es, L->s32, bi, RB);
    return p + 2 * RB * es;
}

/* The value of row r, input i (0..31) of a tile: for the portable path and the float reference. */
static inline int tile_value(const uint8_t *t, int bits, int r, int i) {
    const uint16_t *w = (const uint16_t *)t;
    if (bits == 8) {
        int l = i / 4, h = (i % 4) / 2, j = i % 2;
        return (w[16 * l + 2 * r + j] >> (8 * h)) & 0xff;
    }
    int l = i / 8, k = (i % 8) / 2, j = i % 2;
    int v = (w[16 * l + 2 * r + j] >> (4 * k)) & 15;
    if (bits == 5) v |= ((w[64 + 2 * r + j] >> (4 * l + k)) & 1) << 4;
    return v;
}

/* The 32 values from value c0 (a multiple of 32) of a row packed as MLX stores it: value i at bits
 * [i*bits, (i+1)*bits) of the row's little-endian bit stream, so every 8 values fill ``bits`` whole bytes. */
static inline void unpack32(const uint8_t *row, int bits, int64_t c0, uint8_t *vals) {
    const uint8_t *p = row + c0 / 8 * bits;
    uint64_t mask = (1u << bits) - 1;
    for (int q = 0; q < 4; q++, p += bits) {
        uint64_t u = 0;
        memcpy(&u, p, bits);  /* little-endian hosts (x86-64, aarch64) */
        for (int t = 0; t < 8; t++) vals[8 * q + t] = (uint8_t)((u >> (t * bits)) & mask);
    }
}

/* The stream of one linear (the layout above), from the package's packed values [m, n*bits/32 words]
 * and its scales and biases [m, n/group] (float16, or float32 with s32): per block of 8 rows (rows past m
 * are zeros) and group, the 8 scales, the 8 biases (unless sym), then the group's tiles at tbits (4, 5 or
 * 8 >= bits). */
void ei_pack_stream(const uint8_t *packed, int m, int n, int bits, int tbits, const uint8_t *scales,
                    const uint8_t *biases, int s32, int sym, int group, uint8_t *out) {
    int G = n / group, cpg = group / 32, tb = tile_bytes(tbits), mb = (m + RB - 1) / RB;
    /* kq (scales NULL): biases points at four arrays, d and -dmin [m][G/8] (float16), sc and m [m][G] (bytes) */
    const uint8_t *const *kq = scales ? NULL : (const uint8_t *const *)biases;
    int es = kq ? 1 : s32 ? 4 : 2, heads = kq ? 2 : sym ? 1 : 2;
    size_t row_bytes = (size_t)n * bits / 8;
    uint8_t *o = out;
    for (int b = 0; b < mb; b++) {
        for (int g = 0; g < G; g++) {
            if (kq && g % 8 == 0)
                for (int half = 0; half < 2; half++)
                    for (int r = 0; r < RB; r++, o += 2) {
                        int row = b * RB + r;
                        if (row < m) memcpy(o, kq[half] + ((size_t)row * (G / 8) + g / 8) * 2, 2);
                        else memset(o, 0, 2);
                    }
            for (int half = 0; half < heads; half++) {
                const uint8_t *src = kq ? kq[2 + half] : half ? biases : scales;
                for (int r = 0; r < RB; r++, o += es) {
                    int row = b * RB + r;
                    if (row < m) memcpy(o, src + ((size_t)row * G + g) * es, es);
                    else memset(o, 0, es);
                }
            }
            for (int k = 0; k < cpg; k++, o += tb) {
                uint16_t *w = (uint16_t *)o;
                memset(o, 0, tb);
                int64_t c0 = (int64_t)(g * cpg + k) * 32;
                for (int r = 0; r < RB; r++) {
                    int row = b * RB + r;
                    if (row >= m) continue;
                    uint8_t v[32];
                    unpack32(packed + (size_t)row * row_bytes, bits, c0, v);
                    if (tbits == 8) {  /* word (l, 2r+j): inputs 4l+j (low byte) and 4l+2+j (high byte) */
                        for (int l = 0; l < 8; l++)
                            for (int j = 0; j < 2; j++) w[16 * l + 2 * r + j] = (uint16_t)(v[4 * l + j] | v[4 * l + 2 + j] << 8);
                        continue;
                    }
                    for (int l = 0; l < 4; l++)  /* word (l, 2r+j), nibble k: input 8l+2k+j; fifth bits at 4l+k */
                        for (int j = 0; j < 2; j++) {
                            const uint8_t *x = v + 8 * l + j;
                            w[16 * l + 2 * r + j] = (uint16_t)((x[0] & 15) | (x[2] & 15) << 4 | (x[4] & 15) << 8 | (x[6] & 15) << 12);
                            if (tbits == 5)
                                w[64 + 2 * r + j] |= (uint16_t)((((x[0] >> 4) & 1) | ((x[2] >> 4) & 1) << 1 | ((x[4] >> 4) & 1) << 2 |
                                                                 ((x[6] >> 4) & 1) << 3) << (4 * l));
                        }
                }
            }
        }
    }
}

#if EI_AVX2
/* Inputs 2p and 2p + 1 in every 32-bit lane: vbroadcastss from memory is a load, no shuffle uop. */
static inline __m256i bcast_pair(const int16_t *x, int p) {
    return _mm256_castps_si256(_mm256_broadcast_ss((const float *)(x + 2 * p)));
}

/* The fifth bit of nibble k of vector l sits at bit 4l + k of h: moved to bit 4 of each word. */
#define HI5(h, b) ((b) < 4 ? _mm256_slli_epi16(h, 4 - (b)) : (b) == 4 ? (h) : _mm256_srli_epi16(h, (b) - 4))
#define NIB5(w, h, k, b, m4, m16) \
    _mm256_or_si256((k) == 3 ? _mm256_srli_epi16(w, 12) : _mm256_and_si256((k) ? _mm256_srli_epi16(w, 4 * (k)) : (w), m4), \
                    _mm256_and_si256(HI5(h, b), m16))

/* acc + the int16 pair products of w and x: vpmaddwd + vpaddd, or one vpdpwssd with AVX512-VNNI (the
 * same int32 sums: the weights are small and non-negative, nothing saturates). */
#define MADD_AVX2(acc, w, x) _mm256_add_epi32((acc), _mm256_madd_epi16((w), (x)))
#define MADD_VNNI(acc, w, x) _mm256_dpwssd_epi32((acc), (w), (x))
#define L5(ACC, l) do { \
        __m256i w = _mm256_loadu_si256((const __m256i *)(t + 32 * (l))); \
        acc0 = ACC(acc0, NIB5(w, h, 0, 4 * (l), m4, m16), bcast_pair(x, 4 * (l))); \
        acc1 = ACC(acc1, NIB5(w, h, 1, 4 * (l) + 1, m4, m16), bcast_pair(x, 4 * (l) + 1)); \
        acc0 = ACC(acc0, NIB5(w, h, 2, 4 * (l) + 2, m4, m16), bcast_pair(x, 4 * (l) + 2)); \
        acc1 = ACC(acc1, NIB5(w, h, 3, 4 * (l) + 3, m4, m16), bcast_pair(x, 4 * (l) + 3)); \
    } while (0)

/* int32 lane r = row r's dot product over the tile's 32 inputs, for tiles of 4, 5 and 8 bits. */
#define TILE_DOTS(SUF, ATTR, ACC)                                                                             \
    ATTR static inline __m256i tile_dot_4##SUF(const uint8_t *t, const int16_t *x) {                          \
        const __m256i m4 = _mm256_set1_epi16(15);                                                             \
        __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;                                                   \
        for (int l = 0; l < 4; l++) {                                                                         \
            __m256i w = _mm256_loadu_si256((const __m256i *)(t + 32 * l));                                    \
            acc0 = ACC(acc0, _mm256_and_si256(w, m4), bcast_pair(x, 4 * l));                                  \
            acc1 = ACC(acc1, _mm256_and_si256(_mm256_srli_epi16(w, 4), m4), bcast_pair(x, 4 * l + 1));        \
            acc0 = ACC(acc0, _mm256_and_si256(_mm256_srli_epi16(w, 8), m4), bcast_pair(x, 4 * l + 2));        \
            acc1 = ACC(acc1, _mm256_srli_epi16(w, 12), bcast_pair(x, 4 * l + 3));                             \
        }                                                                                                     \
        return _mm256_add_epi32(acc0, acc1);                                                                  \
    }                                                                                                         \
    ATTR static inline __m256i tile_dot_5##SUF(const uint8_t *t, const int16_t *x) {                          \
        const __m256i m4 = _mm256_set1_epi16(15), m16 = _mm256_set1_epi16(16);                                \
        const __m256i h = _mm256_loadu_si256((const __m256i *)(t + 128));                                     \
        __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;                                                   \
        L5(ACC, 0); L5(ACC, 1); L5(ACC, 2); L5(ACC, 3);                                                       \
        return _mm256_add_epi32(acc0, acc1);                                                                  \
    }                                                                                                         \
    ATTR static inline __m256i tile_dot_8##SUF(const uint8_t *t, const int16_t *x) {                          \
        const __m256i m8 = _mm256_set1_epi16(255);                                                            \
        __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;                                                   \
        for (int l = 0; l < 8; l++) {                                                                         \
            __m256i w = _mm256_loadu_si256((const __m256i *)(t + 32 * l));                                    \
            acc0 = ACC(acc0, _mm256_and_si256(w, m8), bcast_pair(x, 2 * l));                                  \
            acc1 = ACC(acc1, _mm256_srli_epi16(w, 8), bcast_pair(x, 2 * l + 1));                              \
        }                                                                                                     \
        return _mm256_add_epi32(acc0, acc1);                                                                  \
    }
TILE_DOTS(, , MADD_AVX2)

static inline __m256 load8f(const uint8_t *p, int s32) {
    return s32 ? _mm256_loadu_ps((const float *)p) : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* head8f's vector form: sc, bi and the super-block's kd[2] in registers. */
static inline const uint8_t *head8(const ei_linear *L, const uint8_t *p, int g, __m256 *sc, __m256 *bi, __m256 *kd) {
    if (L->kq) {
        if (g % 8 == 0) { kd[0] = load8f(p, 0); kd[1] = load8f(p + 2 * RB, 0); p += 4 * RB; }
        __m128i v = _mm_loadu_si128((const __m128i *)p);  /* sc[8] then m[8] */
        *sc = _mm256_mul_ps(kd[0], _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)));
        *bi = _mm256_mul_ps(kd[1], _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))));
        return p + 2 * RB;
    }
    int es = L->s32 ? 4 : 2;
    *sc = load8f(p, L->s32);
    if (L->zero) {
        *bi = _mm256_mul_ps(*sc, _mm256_set1_ps((float)-L->zero));
        return p + RB * es;
    }
    *bi = load8f(p + RB * es, L->s32);
    return p + 2 * RB * es;
}

/* How far ahead in the stream to ask for: the hardware prefetcher alone left one core at 60-70% of its
 * read bandwidth (benchmarks/native_kernels.py, Zen 3); 2 KiB ahead gave 10-40% more on a 151936-row head. */
#define PREFETCH 2048

/* The 8 outputs of block b (without the layer's additive bias) into out[8], one function per width. */
#define BLOCK8(NAME, ATTR, DOT)                                                                               \
    ATTR static void NAME(const ei_linear *L, const act_t *a, const float *gs, int b, float *out) {           \
        int G = L->n_in / L->group, cpg = L->group / 32, tb = tile_bytes(L->bits);                            \
        size_t gb = group_bytes(L);                                                                            \
        const uint8_t *p = L->q + (size_t)b * block_bytes(L);                                                  \
        const int16_t *x = a->xi;                                                                              \
        const float *st = a->xsc;                                                                              \
        __m256 acc = _mm256_setzero_ps(), off = acc, sc, bi, kd[2];                                            \
        for (int g = 0; g < G; g++) {                                                                          \
            for (size_t o = 0; o < gb; o += 64) _mm_prefetch((const char *)p + PREFETCH + o, _MM_HINT_T0);     \
            const uint8_t *t = head8(L, p, g, &sc, &bi, kd);                                                   \
            off = _mm256_fmadd_ps(bi, _mm256_set1_ps(gs[g]), off);                                             \
            for (int k = 0; k < cpg; k++, t += tb, x += 32, st++)                                              \
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(t, x)), _mm256_mul_ps(sc, _mm256_set1_ps(*st)), acc); \
            p = t;                                                                                             \
        }                                                                                                      \
        _mm256_storeu_ps(out, _mm256_add_ps(acc, off));                                                        \
    }
BLOCK8(block8_4, , tile_dot_4)
BLOCK8(block8_5, , tile_dot_5)
BLOCK8(block8_8, , tile_dot_8)
#if defined(__GNUC__)
/* AVX512-VNNI on 256-bit vectors (picked at run time, has_vnni below): one uop a 16-weight product
 * instead of two, which is what one core's decode is short of (Zen 4: 19 GB/s of 24-28). */
#define VNNI_ATTR __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni")))
TILE_DOTS(_vnni, VNNI_ATTR, MADD_VNNI)
BLOCK8(block8_4_vnni, VNNI_ATTR, tile_dot_4_vnni)
BLOCK8(block8_5_vnni, VNNI_ATTR, tile_dot_5_vnni)
BLOCK8(block8_8_vnni, VNNI_ATTR, tile_dot_8_vnni)
#define EI_VNNI 1

static int has_vnni(void) {
    static atomic_int v = -1;
    if (atomic_load(&v) < 0)
        atomic_store(&v, __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") && !getenv("EDGEINFER_NO_VNNI"));
    return atomic_load(&v);
}
#endif
#endif

/* The 8 outputs of block b (without the layer's additive bias) into out[8]. */
static void block8(const ei_linear *L, const act_t *a, const float *gs, int b, float *out) {
#if EI_AVX2
    if (a->act == ACT_I16) {
#if defined(EI_VNNI)
        if (has_vnni()) {
            (L->bits == 4 ? block8_4_vnni : L->bits == 5 ? block8_5_vnni : block8_8_vnni)(L, a, gs, b, out);
            return;
        }
#endif
        (L->bits == 4 ? block8_4 : L->bits == 5 ? block8_5 : block8_8)(L, a, gs, b, out);
        return;
    }
#endif
    /* Portable, and the float reference: plain loops over the 8 rows. */
    int G = L->n_in / L->group, cpg = L->group / 32, tb = tile_bytes(L->bits);
    const uint8_t *p = L->q + (size_t)b * block_bytes(L);
    float acc[RB] = {0}, off[RB] = {0}, sc[RB], bi[RB], kd[2 * RB];
    for (int g = 0; g < G; g++, p += (size_t)cpg * tb) {
        p = head8f(L, p, g, sc, bi, kd);
        for (int r = 0; r < RB; r++) off[r] += bi[r] * gs[g];
        for (int k = 0; k < cpg; k++) {
            int c = g * cpg + k;
            const uint8_t *t = p + (size_t)k * tb;
            for (int r = 0; r < RB; r++) {
                float d;
                if (a->act == ACT_I16) {
                    int32_t s = 0;
                    for (int i = 0; i < 32; i++) s += tile_value(t, L->bits, r, i) * a->xi[32 * c + i];
                    d = (float)s * a->xsc[c];
                } else {
                    float s = 0.f;
                    for (int i = 0; i < 32; i++) s += (float)tile_value(t, L->bits, r, i) * a->x[32 * c + i];
                    d = s;
                }
                acc[r] += d * sc[r];
            }
        }
    }
    for (int r = 0; r < RB; r++) out[r] = acc[r] + off[r];
}

/* ------------------------------------------------------------------------- several tokens at once */
/* Prefill and verification: T tokens through one block of 8 rows. Each tile is unpacked once into 16
 * vectors of int16 weights (vector p pairs with inputs 2p, 2p+1) and multiplied with every token's
 * inputs, so the weights are read and unpacked once per T tokens instead of once per token. The float
 * operations per token are the one-token kernel's, in the same order: the logits of a token are the
 * same bit for bit whichever path computed them. */
#define TMAX 32
#define MAX_GROUPS 1024  /* groups of one linear; native/__init__.py checks it */

#if EI_AVX2
static inline void unpack_tile(const uint8_t *t, int bits, __m256i *W) {
    const __m256i m4 = _mm256_set1_epi16(15), m8 = _mm256_set1_epi16(255), m16 = _mm256_set1_epi16(16);
    if (bits == 8) {
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(t + 32 * l));
            W[2 * l] = _mm256_and_si256(w, m8);
            W[2 * l + 1] = _mm256_srli_epi16(w, 8);
        }
        return;
    }
    const __m256i h = _mm256_loadu_si256((const __m256i *)(t + 128));
#define U5(l) do { \
        __m256i w = _mm256_loadu_si256((const __m256i *)(t + 32 * (l))); \
        if (bits == 4) { \
            W[4 * (l)] = _mm256_and_si256(w, m4); W[4 * (l) + 1] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4); \
            W[4 * (l) + 2] = _mm256_and_si256(_mm256_srli_epi16(w, 8), m4); W[4 * (l) + 3] = _mm256_srli_epi16(w, 12); \
        } else { \
            W[4 * (l)] = NIB5(w, h, 0, 4 * (l), m4, m16); W[4 * (l) + 1] = NIB5(w, h, 1, 4 * (l) + 1, m4, m16); \
            W[4 * (l) + 2] = NIB5(w, h, 2, 4 * (l) + 2, m4, m16); W[4 * (l) + 3] = NIB5(w, h, 3, 4 * (l) + 3, m4, m16); \
        } \
    } while (0)
    U5(0); U5(1); U5(2); U5(3);
#undef U5
}
#endif

/* The 8 outputs of block b for each of T tokens into out[T][8]; gs [T][groups]: each token's exact sum
 * of x over each weight group. AVX2: one token at a time, vpmaddwd + vpaddd (with 16 registers a
 * two-token loop spilled and gained nothing); block8_tokens_vnni below is the AVX512-VNNI version. */
#if EI_AVX2
#define DOT2_AVX2(acc, w, x) _mm256_add_epi32((acc), _mm256_madd_epi16((w), (x)))
static void block8_tokens_avx2(const ei_linear *L, const act_t *a, const float *gs, int T, int b, float *out) {
    int G = L->n_in / L->group, cpg = L->group / 32, tb = tile_bytes(L->bits);
    size_t gb = group_bytes(L);
    const uint8_t *p = L->q + (size_t)b * block_bytes(L);
    __m256 acc[TMAX], off[TMAX], sc, bi, kd[2];
    __m256i W[16];
    for (int t = 0; t < T; t++) acc[t] = off[t] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++, p += (size_t)cpg * tb) {
        for (size_t o = 0; o < gb; o += 64) _mm_prefetch((const char *)p + PREFETCH + o, _MM_HINT_T0);
        p = head8(L, p, g, &sc, &bi, kd);
        const uint8_t *tt = p;
        for (int k = 0; k < cpg; k++, tt += tb) {
            int c = g * cpg + k;
            unpack_tile(tt, L->bits, W);
            for (int t = 0; t < T; t++) {
                const int16_t *x = a[t].xi + 32 * c;
                __m256i d0 = _mm256_setzero_si256(), d1 = d0;
                for (int q = 0; q < 16; q += 2) {
                    d0 = DOT2_AVX2(d0, W[q], bcast_pair(x, q));
                    d1 = DOT2_AVX2(d1, W[q + 1], bcast_pair(x, q + 1));
                }
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d0, d1)),
                                         _mm256_mul_ps(sc, _mm256_set1_ps(a[t].xsc[c])), acc[t]);
                if (k == 0) off[t] = _mm256_fmadd_ps(bi, _mm256_set1_ps(gs[(size_t)t * G + g]), off[t]);
            }
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + RB * t, _mm256_add_ps(acc[t], off[t]));
}
#if defined(EI_VNNI)
/* With AVX512VL's 32 registers the 16 unpacked weight vectors stay in registers while four tokens take
 * them in turn, two accumulators each (eight independent vpdpwssd chains). */
VNNI_ATTR static void block8_tokens_vnni(const ei_linear *L, const act_t *a, const float *gs, int T, int b, float *out) {
    int G = L->n_in / L->group, cpg = L->group / 32, tb = tile_bytes(L->bits);
    size_t gb = group_bytes(L);
    const uint8_t *p = L->q + (size_t)b * block_bytes(L);
    __m256 acc[TMAX], off[TMAX], sc, bi, kd[2];
    __m256i W[16];
    for (int t = 0; t < T; t++) acc[t] = off[t] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++, p += (size_t)cpg * tb) {
        for (size_t o = 0; o < gb; o += 64) _mm_prefetch((const char *)p + PREFETCH + o, _MM_HINT_T0);
        p = head8(L, p, g, &sc, &bi, kd);
        const uint8_t *tt = p;
        for (int k = 0; k < cpg; k++, tt += tb) {
            int c = g * cpg + k, t = 0;
            unpack_tile(tt, L->bits, W);
            for (; t + 4 <= T; t += 4) {
                const int16_t *x0 = a[t].xi + 32 * c, *x1 = a[t + 1].xi + 32 * c, *x2 = a[t + 2].xi + 32 * c,
                              *x3 = a[t + 3].xi + 32 * c;
                __m256i d[8];
                for (int i = 0; i < 8; i++) d[i] = _mm256_setzero_si256();
#pragma GCC unroll 8
                for (int q = 0; q < 16; q += 2) {
                    d[0] = _mm256_dpwssd_epi32(d[0], W[q], bcast_pair(x0, q));
                    d[1] = _mm256_dpwssd_epi32(d[1], W[q], bcast_pair(x1, q));
                    d[2] = _mm256_dpwssd_epi32(d[2], W[q], bcast_pair(x2, q));
                    d[3] = _mm256_dpwssd_epi32(d[3], W[q], bcast_pair(x3, q));
                    d[4] = _mm256_dpwssd_epi32(d[4], W[q + 1], bcast_pair(x0, q + 1));
                    d[5] = _mm256_dpwssd_epi32(d[5], W[q + 1], bcast_pair(x1, q + 1));
                    d[6] = _mm256_dpwssd_epi32(d[6], W[q + 1], bcast_pair(x2, q + 1));
                    d[7] = _mm256_dpwssd_epi32(d[7], W[q + 1], bcast_pair(x3, q + 1));
                }
                for (int i = 0; i < 4; i++) {
                    acc[t + i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d[i], d[i + 4])),
                                                 _mm256_mul_ps(sc, _mm256_set1_ps(a[t + i].xsc[c])), acc[t + i]);
                    if (k == 0) off[t + i] = _mm256_fmadd_ps(bi, _mm256_set1_ps(gs[(size_t)(t + i) * G + g]), off[t + i]);
                }
            }
            for (; t < T; t++) {
                const int16_t *x = a[t].xi + 32 * c;
                __m256i d0 = _mm256_setzero_si256(), d1 = d0;
                for (int q = 0; q < 16; q += 2) {
                    d0 = _mm256_dpwssd_epi32(d0, W[q], bcast_pair(x, q));
                    d1 = _mm256_dpwssd_epi32(d1, W[q + 1], bcast_pair(x, q + 1));
                }
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d0, d1)),
                                         _mm256_mul_ps(sc, _mm256_set1_ps(a[t].xsc[c])), acc[t]);
                if (k == 0) off[t] = _mm256_fmadd_ps(bi, _mm256_set1_ps(gs[(size_t)t * G + g]), off[t]);
            }
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + RB * t, _mm256_add_ps(acc[t], off[t]));
}

/* Prefill with int8 inputs (ACT_I8): vpdpbusd multiplies a tile's unsigned weights by signed int8 inputs,
 * four products a lane, 32 an instruction where vpdpwssd makes 16 (llama.cpp's and genai's arithmetic).
 * A tile is unpacked into 8 vectors whose 32-bit lane r holds four of row r's weights, in the order
 * prepare gives the inputs: vector 2l holds inputs 8l + {0, 4, 1, 5}, vector 2l + 1 inputs 8l + {2, 6,
 * 3, 7}: the 4-bit tile's nibbles 0/2 and 1/3 of each word, a mask each; 8-bit tiles interleave the bytes
 * of two vectors; 5-bit tiles add their fifth bits to the nibbles. */
#define SHL16(h, s) ((s) > 0 ? _mm256_slli_epi16(h, (s)) : (s) < 0 ? _mm256_srli_epi16(h, -(s)) : (h))
VNNI_ATTR static inline void unpack_tile_i8(const uint8_t *t, int bits, __m256i *W) {
    if (bits == 8) {
        const __m256i lo = _mm256_set1_epi16(0x00FF), hi = _mm256_set1_epi16((short)0xFF00);
#pragma GCC unroll 4
        for (int l = 0; l < 4; l++) {
            __m256i A = _mm256_loadu_si256((const __m256i *)(t + 64 * l)), B = _mm256_loadu_si256((const __m256i *)(t + 64 * l + 32));
            W[2 * l] = _mm256_or_si256(_mm256_and_si256(A, lo), _mm256_slli_epi16(B, 8));
            W[2 * l + 1] = _mm256_or_si256(_mm256_srli_epi16(A, 8), _mm256_and_si256(B, hi));
        }
        return;
    }
    const __m256i m4 = _mm256_set1_epi8(15);
#pragma GCC unroll 4
    for (int l = 0; l < 4; l++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(t + 32 * l));
        W[2 * l] = _mm256_and_si256(w, m4);
        W[2 * l + 1] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
    }
    if (bits == 5) {  /* the fifth bit of nibble k of vector l is bit 4l + k of h: to bit 4 or 12 of the word */
        const __m256i h = _mm256_loadu_si256((const __m256i *)(t + 128));
        const __m256i b4 = _mm256_set1_epi16(0x0010), b12 = _mm256_set1_epi16(0x1000);
#pragma GCC unroll 4
        for (int l = 0; l < 4; l++) {
            W[2 * l] = _mm256_or_si256(W[2 * l], _mm256_or_si256(_mm256_and_si256(SHL16(h, 4 - 4 * l), b4),
                                                                  _mm256_and_si256(SHL16(h, 10 - 4 * l), b12)));
            W[2 * l + 1] = _mm256_or_si256(W[2 * l + 1], _mm256_or_si256(_mm256_and_si256(SHL16(h, 3 - 4 * l), b4),
                                                                          _mm256_and_si256(SHL16(h, 9 - 4 * l), b12)));
        }
    }
}

VNNI_ATTR static void block8_tokens_i8(const ei_linear *L, const act_t *a, const float *gs, int T, int b, float *out) {
    int G = L->n_in / L->group, cpg = L->group / 32, tb = tile_bytes(L->bits);
    size_t gb = group_bytes(L);
    const uint8_t *p = L->q + (size_t)b * block_bytes(L);
    __m256 acc[TMAX], off[TMAX], sc, bi, kd[2];
    __m256i W[8];
    for (int t = 0; t < T; t++) acc[t] = off[t] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++, p += (size_t)cpg * tb) {
        for (size_t o = 0; o < gb; o += 64) _mm_prefetch((const char *)p + PREFETCH + o, _MM_HINT_T0);
        p = head8(L, p, g, &sc, &bi, kd);
        for (int t = 0; t < T; t++) off[t] = _mm256_fmadd_ps(bi, _mm256_set1_ps(gs[(size_t)t * G + g]), off[t]);
        const uint8_t *tt = p;
        for (int k = 0; k < cpg; k++, tt += tb) {
            int c = g * cpg + k, t = 0;
            unpack_tile_i8(tt, L->bits, W);
            for (; t + 4 <= T; t += 4) {
                const int16_t *x0 = (const int16_t *)((const int8_t *)a[t].xi + 32 * c), *x1 = (const int16_t *)((const int8_t *)a[t + 1].xi + 32 * c),
                              *x2 = (const int16_t *)((const int8_t *)a[t + 2].xi + 32 * c), *x3 = (const int16_t *)((const int8_t *)a[t + 3].xi + 32 * c);
                __m256i d[8];
                for (int i = 0; i < 8; i++) d[i] = _mm256_setzero_si256();
#pragma GCC unroll 4
                for (int q = 0; q < 8; q += 2) {  /* bcast_pair(x, q) is bytes 4q .. 4q + 3 of the chunk */
                    d[0] = _mm256_dpbusd_epi32(d[0], W[q], bcast_pair(x0, q));
                    d[1] = _mm256_dpbusd_epi32(d[1], W[q], bcast_pair(x1, q));
                    d[2] = _mm256_dpbusd_epi32(d[2], W[q], bcast_pair(x2, q));
                    d[3] = _mm256_dpbusd_epi32(d[3], W[q], bcast_pair(x3, q));
                    d[4] = _mm256_dpbusd_epi32(d[4], W[q + 1], bcast_pair(x0, q + 1));
                    d[5] = _mm256_dpbusd_epi32(d[5], W[q + 1], bcast_pair(x1, q + 1));
                    d[6] = _mm256_dpbusd_epi32(d[6], W[q + 1], bcast_pair(x2, q + 1));
                    d[7] = _mm256_dpbusd_epi32(d[7], W[q + 1], bcast_pair(x3, q + 1));
                }
                for (int i = 0; i < 4; i++)
                    acc[t + i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d[i], d[i + 4])),
                                                 _mm256_mul_ps(sc, _mm256_set1_ps(a[t + i].xsc[c])), acc[t + i]);
            }
            for (; t < T; t++) {
                const int16_t *x = (const int16_t *)((const int8_t *)a[t].xi + 32 * c);
                __m256i d0 = _mm256_setzero_si256(), d1 = d0;
                for (int q = 0; q < 8; q += 2) {
                    d0 = _mm256_dpbusd_epi32(d0, W[q], bcast_pair(x, q));
                    d1 = _mm256_dpbusd_epi32(d1, W[q + 1], bcast_pair(x, q + 1));
                }
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d0, d1)),
                                         _mm256_mul_ps(sc, _mm256_set1_ps(a[t].xsc[c])), acc[t]);
            }
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(out + RB * t, _mm256_add_ps(acc[t], off[t]));
}
#endif
#endif

static void block8_tokens(const ei_linear *L, const act_t *a, const float *gs, int T, int b, float *out) {
    int G = L->n_in / L->group;
#if EI_AVX2
#if defined(EI_VNNI)
    if (a[0].act == ACT_I8) { block8_tokens_i8(L, a, gs, T, b, out); return; }  /* only where has_vnni */
#endif
    if (a[0].act == ACT_I16) {
#if defined(EI_VNNI)
        if (has_vnni()) { block8_tokens_vnni(L, a, gs, T, b, out); return; }
#endif
        block8_tokens_avx2(L, a, gs, T, b, out);
        return;
    }
#endif
    for (int t = 0; t < T; t++) block8(L, a + t, gs + (size_t)t * G, b, out + RB * t);
}

/* Rows [r0, r1) of one linear into y; r0 is a multiple of 8. */
static void linear_rows(const ei_linear *L, const act_t *a, int r0, int r1, float *y) {
    int G = L->n_in / L->group, cpg = L->group / 32;
    float gs[1024], out[RB];
    for (int g = 0; g < G; g++) {  /* the exact sum of x over each weight group */
        float s = 0.f;
        for (int k = 0; k < cpg; k++) s += a->sums[g * cpg + k];
        gs[g] = s;
    }
    for (int r = r0; r < r1; r += RB) {
        block8(L, a, gs, r / RB, out);
        int n = r1 - r < RB ? r1 - r : RB;
        for (int i = 0; i < n; i++) y[r + i] = L->bias ? out[i] + L->bias[r + i] : out[i];
    }
}

/* Several linears reading one input, as one parallel region over blocks of rows. */
typedef struct {
    const ei_linear *lin[3];
    float *out[3];      /* [T][m_out] each */
    int nmod, block, first[4], T;
    const act_t *a;     /* [T] */
    const float *gs[3]; /* T > 1: [T][groups] per module, each token's sum of x over each weight group */
} lin_job;

/* Rows [r0, r1) of one linear for T tokens into y [T][m_out]. */
static void linear_rows_tokens(const ei_linear *L, const act_t *a, const float *gs, int T, int r0, int r1, float *y) {
    float out[RB * TMAX];
    for (int r = r0; r < r1; r += RB) {
        block8_tokens(L, a, gs, T, r / RB, out);
        int n = r1 - r < RB ? r1 - r : RB;
        for (int t = 0; t < T; t++)
            for (int i = 0; i < n; i++)
                y[(size_t)t * L->m_out + r + i] = L->bias ? out[RB * t + i] + L->bias[r + i] : out[RB * t + i];
    }
}

static void lin_task(void *arg, int item) {
    lin_job *j = arg;
    int k = 0;
    while (k + 1 < j->nmod && item >= j->first[k + 1]) k++;
    int r0 = (item - j->first[k]) * j->block, r1 = r0 + j->block;
    if (r1 > j->lin[k]->m_out) r1 = j->lin[k]->m_out;
    if (j->T == 1) linear_rows(j->lin[k], j->a, r0, r1, j->out[k]);
    else linear_rows_tokens(j->lin[k], j->a, j->gs[k], j->T, r0, r1, j->out[k]);
}

/* ---------------------------------------------------------------------------------------- the step */
typedef struct {
    const ei_model *m;
    pool_t *pool;
    int act, bact;  /* the step's activations, and those of several tokens (ei_set_batch_act) */
    int64_t cap;
    float *h, *q, *k, *v, *att, *o, *g, *u, *d, *probs, *cosb, *sinb;
    act_t a;
    /* attention task state */
    int layer;
    float *kc, *vc;
    /* several tokens (ei_forward): buffers [TMAX][...], allocated at the first call */
    int T, bt_ready;
    int64_t pos0;
    float *bh, *bq, *bk, *bv, *batt, *bo, *bg, *bu, *bd, *bgs;
    float *cq, *catt;  /* the queries and attention outputs of the current call (the step's or the batch's) */
    act_t ba[TMAX];
} ei_ctx;

static void rmsnorm(const float *x, const float *w, float eps, int n, float *out) {
    float s = 0.f;
    for (int i = 0; i < n; i++) s += x[i] * x[i];
    float inv = 1.f / sqrtf(s / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

static void rope(float *v, const float *cs, const float *sn, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[half + i];
        v[i] = a * cs[i] - b * sn[i];
        v[half + i] = b * cs[i] + a * sn[i];
    }
}

/* Several linears reading one input, T tokens of it (x [T][n], outs [T][m_out]). */
static void linears_tokens(ei_ctx *c, const float *x, int T, int n, const ei_linear **mods, float **outs, int nmod) {
    act_t *a = T == 1 ? &c->a : c->ba;
    for (int t = 0; t < T; t++) prepare(a + t, x + (size_t)t * n, n, T == 1 ? c->act : c->bact);
    lin_job j = {.nmod = nmod, .a = a, .T = T};
    for (int k = 0; T > 1 && k < nmod; k++) {  /* as linear_rows computes them, once for every block */
        int G = mods[k]->n_in / mods[k]->group, cpg = mods[k]->group / 32;
        float *gs = c->bgs + (size_t)k * TMAX * MAX_GROUPS;
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++) {
                float s = 0.f;
                for (int q = 0; q < cpg; q++) s += a[t].sums[g * cpg + q];
                gs[(size_t)t * G + g] = s;
            }
        j.gs[k] = gs;
    }
    int total_rows = 0;
    for (int k = 0; k < nmod; k++) total_rows += mods[k]->m_out;
    /* about 4 items a thread per region, at least 16 rows an item */
    int block = total_rows / (c->pool->n * 4);
    block = block < 16 ? 16 : (block + 15) / 16 * 16;
    j.block = block;
    int items = 0;
    for (int k = 0; k < nmod; k++) {
        j.lin[k] = mods[k]; j.out[k] = outs[k]; j.first[k] = items;
        items += (mods[k]->m_out + block - 1) / block;
    }
    j.first[nmod] = items;
    pool_run(c->pool, lin_task, &j, items);
}

static void linears(ei_ctx *c, const float *x, int n, const ei_linear **mods, float **outs, int nmod) {
    linears_tokens(c, x, 1, n, mods, outs, nmod);
}

/* Head hh's attention output o for query qv at position pos over the cached [start, pos]. */
static void attn_head(const ei_ctx *c, int hh, const float *qv, int64_t start, int64_t pos, float *o) {
    const ei_model *m = c->m;
    int hd = m->head_dim, kv = hh / (m->heads / m->kv_heads);
    const float *K = c->kc + (size_t)kv * c->cap * hd, *V = c->vc + (size_t)kv * c->cap * hd;
    float *probs = c->probs + (size_t)hh * c->cap;
    for (int64_t s = start; s <= pos; s++) {
        float acc = dot(qv, K + s * hd, hd) * m->attn_scale;
        if (m->attn_cap > 0.f) acc = tanhf(acc / m->attn_cap) * m->attn_cap;
        probs[s] = acc;
    }
    float mx = -INFINITY, tot = 0.f;
    int64_t s = start;
#if EI_AVX2
    /* the max and the sum as vectors: a compare-and-branch per position was a tenth of a long prompt */
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; s + 8 <= pos + 1; s += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(probs + s));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; s <= pos; s++) mx = probs[s] > mx ? probs[s] : mx;
    s = start;
#if EI_AVX2
    __m256 vt = _mm256_setzero_ps();
    vm = _mm256_set1_ps(mx);
    for (; s + 8 <= pos + 1; s += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(probs + s), vm));
        _mm256_storeu_ps(probs + s, e);
        vt = _mm256_add_ps(vt, e);
    }
    tot = hsum8(vt);
#endif
    for (; s <= pos; s++) { float e = expf(probs[s] - mx); probs[s] = e; tot += e; }
    float inv = 1.f / tot;
    int d0 = 0;
#if EI_AVX2
    /* 64 output dimensions at a time in 8 registers over every position, not a store per position */
    for (; d0 + 64 <= hd; d0 += 64) {
        __m256 a[8];
        for (int q = 0; q < 8; q++) a[q] = _mm256_setzero_ps();
        for (int64_t t = start; t <= pos; t++) {
            const float *vr = V + t * hd + d0;
            __m256 p = _mm256_set1_ps(probs[t] * inv);
            for (int q = 0; q < 8; q++) a[q] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * q), a[q]);
        }
        for (int q = 0; q < 8; q++) _mm256_storeu_ps(o + d0 + 8 * q, a[q]);
    }
#endif
    for (int d = d0; d < hd; d++) o[d] = 0.f;
    for (int64_t t = start; t <= pos && d0 < hd; t++) {
        const float *vr = V + t * hd;
        float p = probs[t] * inv;
        for (int d = d0; d < hd; d++) o[d] += p * vr[d];
    }
}

/* Head hh for each of the call's tokens in turn, each seeing the positions up to its own. */
static void attn_task(void *arg, int hh) {
    ei_ctx *c = arg;
    const ei_model *m = c->m;
    int hd = m->head_dim;
    int64_t w = m->windows[c->layer];
    for (int t = 0; t < c->T; t++) {
        int64_t pos = c->pos0 + t, start = (w > 0 && pos - w + 1 > 0) ? pos - w + 1 : 0;
        size_t at = ((size_t)t * m->heads + hh) * hd;
        attn_head(c, hh, c->cq + at, start, pos, c->catt + at);
    }
}

int ei_abi(void) { return EI_ABI; }

int ei_simd(void) { return EI_AVX2; }

void ei_free(ei_ctx *c) {
    if (!c) return;
    pool_free(c->pool);
    float **bufs[] = {&c->h, &c->q, &c->k, &c->v, &c->att, &c->o, &c->g, &c->u, &c->d, &c->probs, &c->cosb, &c->sinb,
                      &c->a.xsc, &c->a.sums, &c->bh, &c->bq, &c->bk, &c->bv, &c->batt, &c->bo, &c->bg, &c->bu, &c->bd, &c->bgs};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(*bufs[i]);
    free(c->a.xi);
    for (int t = 0; t < TMAX; t++) { free(c->ba[t].xsc); free(c->ba[t].sums); free(c->ba[t].xi); }
    free(c);
}

ei_ctx *ei_new(const ei_model *m, int threads, int act) {
    ei_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->m = m; c->act = c->bact = act;
    int H = m->hidden, I = m->inter, D = m->head_dim, nmax = H > I ? H : I;
    for (int i = 0; i < m->layers * 7 + 1; i++) if (m->lin[i].n_in > nmax) nmax = m->lin[i].n_in;
    c->h = calloc(H, 4); c->q = calloc((size_t)m->heads * D, 4); c->k = calloc((size_t)m->kv_heads * D, 4);
    c->v = calloc((size_t)m->kv_heads * D, 4); c->att = calloc((size_t)m->heads * D, 4); c->o = calloc(H, 4);
    c->g = calloc(I, 4); c->u = calloc(I, 4); c->d = calloc(H, 4); c->cosb = calloc(D, 4); c->sinb = calloc(D, 4);
    c->a.xsc = calloc(nmax / 32 + 1, 4);
    c->a.sums = calloc(nmax / 32 + 1, 4);
    c->a.xi = calloc(nmax, 2);
    c->pool = pool_new(threads);
    if (!c->h || !c->q || !c->k || !c->v || !c->att || !c->o || !c->g || !c->u || !c->d || !c->cosb || !c->sinb ||
        !c->a.xsc || !c->a.sums || !c->a.xi || !c->pool) {
        ei_free(c);
        return NULL;
    }
    return c;
}

static int batch_alloc(ei_ctx *c) {
    if (c->bt_ready) return 0;
    const ei_model *m = c->m;
    int H = m->hidden, I = m->inter, D = m->head_dim, nmax = H > I ? H : I;
    for (int i = 0; i < m->layers * 7 + 1; i++) if (m->lin[i].n_in > nmax) nmax = m->lin[i].n_in;
    size_t T = TMAX;
    c->bh = calloc(T * H, 4); c->bq = calloc(T * m->heads * D, 4); c->bk = calloc(T * m->kv_heads * D, 4);
    c->bv = calloc(T * m->kv_heads * D, 4); c->batt = calloc(T * m->heads * D, 4); c->bo = calloc(T * H, 4);
    c->bg = calloc(T * I, 4); c->bu = calloc(T * I, 4); c->bd = calloc(T * H, 4);
    c->bgs = calloc(3 * T * MAX_GROUPS, 4);
    int ok = c->bh && c->bq && c->bk && c->bv && c->batt && c->bo && c->bg && c->bu && c->bd && c->bgs;
    for (int t = 0; t < TMAX && ok; t++) {
        c->ba[t].xsc = calloc(nmax / 32 + 1, 4);
        c->ba[t].sums = calloc(nmax / 32 + 1, 4);
        c->ba[t].xi = calloc(nmax, 2);
        ok = c->ba[t].xsc && c->ba[t].sums && c->ba[t].xi;
    }
    c->bt_ready = 1;  /* ei_free releases whatever was allocated */
    return ok ? 0 : -1;
}

/* T tokens (x: their scaled embeddings [T][hidden], overwritten) at positions pos0 .. pos0+T-1, each
 * seeing the cache and the tokens before it; keys and values written at those positions of
 * kblock/vblock [layers][kv_heads][cap][head_dim]; logits [T - start][vocab] of the tokens from start
 * (none when start >= T). One token runs on the step's own buffers, several on the batch's. */
static int forward(ei_ctx *c, float *x, int T, int64_t pos0, float *kblock, float *vblock, int64_t cap, int start,
                   float *logits) {
    const ei_model *m = c->m;
    int L = m->layers, H = m->hidden, I = m->inter, D = m->head_dim, half = D / 2;
    int QD = m->heads * D, KD = m->kv_heads * D;
    if (T < 1 || T > TMAX) return -2;
    if (T > 1 && batch_alloc(c)) return -1;
    if (cap > c->cap) {
        float *p = realloc(c->probs, (size_t)cap * m->heads * 4);
        if (!p) return -1;
        c->probs = p;
    }
    c->cap = cap;
    c->T = T;
    c->pos0 = pos0;
    float *h = T == 1 ? c->h : c->bh, *q = T == 1 ? c->q : c->bq, *k = T == 1 ? c->k : c->bk, *v = T == 1 ? c->v : c->bv;
    float *att = T == 1 ? c->att : c->batt, *o = T == 1 ? c->o : c->bo, *g = T == 1 ? c->g : c->bg;
    float *u = T == 1 ? c->u : c->bu, *d = T == 1 ? c->d : c->bd;
    c->cq = q; c->catt = att;
    for (int li = 0; li < L; li++) {
        const ei_linear *lin = m->lin + (size_t)li * 7;
        const float *nw = m->norms + (size_t)li * 4 * H;
        for (int t = 0; t < T; t++) rmsnorm(x + (size_t)t * H, nw, m->eps, H, h + (size_t)t * H);
        const ei_linear *qkv[3] = {lin, lin + 1, lin + 2};
        float *qkv_out[3] = {q, k, v};
        linears_tokens(c, h, T, H, qkv, qkv_out, 3);
        c->kc = kblock + (size_t)li * m->kv_heads * cap * D;
        c->vc = vblock + (size_t)li * m->kv_heads * cap * D;
        const double *f = m->inv_freq + (size_t)li * half;
        for (int t = 0; t < T; t++) {
            float *qt = q + (size_t)t * QD, *kt = k + (size_t)t * KD, *vt = v + (size_t)t * KD;
            int64_t pos = pos0 + t;
            if (m->qk_norm) {
                const float *qn = m->qk_norms + (size_t)li * 2 * D;
                float tmp[1024];
                for (int hh = 0; hh < m->heads; hh++) { memcpy(tmp, qt + hh * D, D * 4); rmsnorm(tmp, qn, m->eps, D, qt + hh * D); }
                for (int hh = 0; hh < m->kv_heads; hh++) { memcpy(tmp, kt + hh * D, D * 4); rmsnorm(tmp, qn + D, m->eps, D, kt + hh * D); }
            }
            for (int i = 0; i < half; i++) {
                double ang = (double)pos * f[i];
                c->cosb[i] = (float)(cos(ang) * m->mscale);
                c->sinb[i] = (float)(sin(ang) * m->mscale);
            }
            for (int hh = 0; hh < m->heads; hh++) rope(qt + hh * D, c->cosb, c->sinb, half);
            for (int hh = 0; hh < m->kv_heads; hh++) {
                rope(kt + hh * D, c->cosb, c->sinb, half);
                memcpy(c->kc + ((size_t)hh * cap + pos) * D, kt + hh * D, D * 4);
                memcpy(c->vc + ((size_t)hh * cap + pos) * D, vt + hh * D, D * 4);
            }
        }
        c->layer = li;
        pool_run(c->pool, attn_task, c, m->heads);
        const ei_linear *o1[1] = {lin + 3};
        float *o_out[1] = {o};
        linears_tokens(c, att, T, QD, o1, o_out, 1);
        for (int t = 0; t < T; t++) {
            float *xt = x + (size_t)t * H, *ot = o + (size_t)t * H;
            if (m->sandwich) { memcpy(d, ot, H * 4); rmsnorm(d, nw + 2 * H, m->eps, H, ot); }
            for (int i = 0; i < H; i++) xt[i] += ot[i];
            rmsnorm(xt, nw + H, m->eps, H, h + (size_t)t * H);
        }
        const ei_linear *gu[2] = {lin + 4, lin + 5};
        float *gu_out[2] = {g, u};
        linears_tokens(c, h, T, H, gu, gu_out, 2);
        gated(g, u, T * I, m->gelu);
        const ei_linear *dn[1] = {lin + 6};
        float *d_out[1] = {d};
        linears_tokens(c, g, T, I, dn, d_out, 1);
        for (int t = 0; t < T; t++) {
            float *xt = x + (size_t)t * H, *dt = d + (size_t)t * H;
            if (m->sandwich) { memcpy(o, dt, H * 4); rmsnorm(o, nw + 3 * H, m->eps, H, dt); }
            for (int i = 0; i < H; i++) xt[i] += dt[i];
        }
    }
    if (start >= T) return 0;
    int n = T - start;
    for (int t = 0; t < n; t++) rmsnorm(x + (size_t)(start + t) * H, m->norms + (size_t)L * 4 * H, m->eps, H, h + (size_t)t * H);
    const ei_linear *hd1[1] = {m->lin + (size_t)L * 7};
    float *h_out[1] = {logits};
    linears_tokens(c, h, n, H, hd1, h_out, 1);
    if (m->final_cap > 0.f)
        for (size_t i = 0; i < (size_t)n * m->vocab; i++) logits[i] = tanhf(logits[i] / m->final_cap) * m->final_cap;
    return 0;
}

/* One token: x (its scaled embedding, overwritten) at position pos; keys and values written at pos of
 * kblock/vblock [layers][kv_heads][cap][head_dim]; logits [vocab]. Returns 0, or -1 when out of memory. */
int ei_step(ei_ctx *c, float *x, int64_t pos, float *kblock, float *vblock, int64_t cap, float *logits) {
    return forward(c, x, 1, pos, kblock, vblock, cap, 0, logits);
}

/* Up to TMAX tokens at once (prefill, verification): see forward. Returns 0, -1 when out of memory, -2
 * for a T outside [1, TMAX]. */
int ei_forward(ei_ctx *c, float *x, int T, int64_t pos0, float *kblock, float *vblock, int64_t cap, int start,
               float *logits) {
    return forward(c, x, T, pos0, kblock, vblock, cap, start, logits);
}

int ei_max_tokens(void) { return TMAX; }

/* The activations of ei_forward's calls of several tokens from now on: ACT_I8 (the prompt's) only where
 * the CPU has AVX512-VNNI; -1 otherwise, and nothing changes. */
int ei_set_batch_act(ei_ctx *c, int act) {
#if defined(EI_VNNI)
    int i8 = has_vnni();
#else
    int i8 = 0;
#endif
    if (act < ACT_F32 || act > ACT_I8 || (act == ACT_I8 && !i8)) return -1;
    c->bact = act;
    return 0;
}

/* One linear alone (tests and benchmarks): y = W x for the rows [0, m_out). */
int ei_linear_apply(ei_ctx *c, const ei_linear *L, const float *x, float *y) {
    const ei_linear *mods[1] = {L};
    float *outs[1] = {y};
    linears(c, x, L->n_in, mods, outs, 1);
    return 0;
}

/* The same for T tokens (x [T][n_in], y [T][m_out]) with the batch's activations; -1 when out of memory. */
int ei_linear_apply_tokens(ei_ctx *c, const ei_linear *L, const float *x, int T, float *y) {
    if (T < 1 || T > TMAX) return -2;
    if (T > 1 && batch_alloc(c)) return -1;
    const ei_linear *mods[1] = {L};
    float *outs[1] = {y};
    linears_tokens(c, x, T, L->n_in, mods, outs, 1);
    return 0;
}

#ifdef EI_PYMODULE
/* Built as a Python extension only so that pip builds and installs it; Python loads it with ctypes. */
#include <Python.h>
#define EI_CAT2(a, b) a##b
#define EI_CAT(a, b) EI_CAT2(a, b)
static struct PyModuleDef ei_moddef = {PyModuleDef_HEAD_INIT, "edgeinfer native decode", NULL, -1, NULL};
PyMODINIT_FUNC EI_CAT(PyInit_, EI_PYMODULE)(void) { return PyModule_Create(&ei_moddef); }
#endif
