/* How much of a skipped read does a decode step get back? Streams a buffer far larger than the caches,
 * once whole and once skipping a random half of it in runs of R bytes (runs in address order, as a
 * sparse kernel would read them), with and without a software prefetch cursor that walks the kept runs
 * D bytes ahead of the reads. Prints one line per repetition:
 *     R threads dense_ms skip_ms skip_prefetch_ms
 * Built and run by benchmarks/skip_bandwidth.py (cc -O2 -fopenmp, AVX2 loads where the CPU has them). */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX2__)
#include <immintrin.h>
typedef __m256i acc_t;
#define ZERO() _mm256_setzero_si256()
#define READ64(a, p) _mm256_xor_si256(_mm256_add_epi8((a), _mm256_load_si256((const __m256i *)(p))), \
                                      _mm256_load_si256((const __m256i *)((p) + 32)))
#define FOLD(a) ((long)_mm256_extract_epi8((a), 3))
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
typedef uint64_t acc_t;
#define ZERO() 0
#define READ64(a, p) ((a) + ((const uint64_t *)(p))[0] + ((const uint64_t *)(p))[7])
#define FOLD(a) ((long)(a))
#define PREFETCH(p) __builtin_prefetch((p))
#endif

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: %s MIB RUN_BYTES THREADS PREFETCH_BYTES REPS\n", argv[0]); return 2; }
    size_t total = (size_t)atol(argv[1]) << 20, R = (size_t)atol(argv[2]), D = (size_t)atol(argv[4]);
    int thr = atoi(argv[3]), reps = atoi(argv[5]);
    if (R < 64 || R % 64 || total < 4 * R) { fprintf(stderr, "RUN_BYTES must be a multiple of 64, well below the buffer\n"); return 2; }
    total -= total % R;
    uint8_t *buf = aligned_alloc(4096, total);
    if (!buf) return 1;
    memset(buf, 1, total);
    size_t nr = total / R, na = 0;
    uint32_t *kept = malloc(nr * sizeof *kept);
    srand(1);
    for (size_t i = 0; i < nr; i++) if (rand() & 1) kept[na++] = (uint32_t)i;
    omp_set_num_threads(thr);
    long sink = 0;
    for (int rep = 0; rep < reps; rep++) {
        double t[3];
        for (int mode = 0; mode < 3; mode++) {
            double t0 = now();
#pragma omp parallel for reduction(+ : sink) schedule(static)
            for (int th = 0; th < thr; th++) {
                acc_t a = ZERO();
                if (mode == 0) {
                    for (size_t o = total / thr * th; o < total / thr * (th + 1); o += 64) a = READ64(a, buf + o);
                } else {
                    size_t i0 = na * th / thr, i1 = na * (th + 1) / thr, pi = i0, po = 0, ahead = 0;
                    for (size_t i = i0; i < i1; i++) {
                        const uint8_t *p = buf + (size_t)kept[i] * R;
                        for (size_t o = 0; o < R; o += 64) {
                            if (mode == 2) {
                                while (ahead < D && pi < i1) {
                                    PREFETCH(buf + (size_t)kept[pi] * R + po);
                                    ahead += 64;
                                    if ((po += 64) >= R) { po = 0; pi++; }
                                }
                                ahead = ahead >= 64 ? ahead - 64 : 0;
                            }
                            a = READ64(a, p + o);
                        }
                    }
                }
                sink += FOLD(a);
            }
            t[mode] = now() - t0;
        }
        printf("%zu %d %.4f %.4f %.4f\n", R, thr, t[0] * 1e3, t[1] * 1e3, t[2] * 1e3);
    }
    return sink == 42 ? 3 : 0;  /* keeps the reads */
}
