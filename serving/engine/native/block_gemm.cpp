// y = x @ W^T for weights kept in llama.cpp's block formats, dequantized in registers.
//
// Why: the embedded backbone ships as Q4_1 (and a Q8_0 embedding); transformers dequantizes it
// to float32, so a one-row decode step reads 538 MB of weights where the file holds 96 MB. These
// kernels read the blocks themselves (about 0.75 and 1.1 bytes a weight with this layout's
// float32 scales) and rebuild each weight exactly as the float32 copy holds it:
//
//   Q4_1: w = d * q + m, q in 0..15;  Q8_0: w = d * q, q in -128..127
//
// with d and m float16 values (checked when the blocks are made, see block_weights.py), so d * q
// is exact in float32 and a fused multiply-add rounds d * q + m once, as gguf's numpy
// dequantization does in two steps: the weights are the float32 ones to the bit. The sums are
// float32 in another order than torch's kernels, so outputs may differ in the last bits.
//
// Layout: output columns in tiles of 16 (one 512-bit vector of outputs), inputs in groups of 32;
// per (tile, group) one contiguous block, tiles outermost, so a tile's blocks stream in order:
//
//   Q4_1 block (384 bytes): float d[16], float m[16], uint8 codes[16][16]
//                           codes[p][j] = q[j][2p] | q[j][2p+1] << 4   (j: column in the tile)
//   Q8_0 block (576 bytes): float d[16], int8 codes[32][16]            codes[k][j] = q[j][k]
//
// A call may add a low-rank term (x @ a^T) @ b, the factors of a LoRA adapter merged into the
// weight, whose base the blocks hold (see block_weights.py and `Rows` below).
//
// Each call runs M rows (any M; 16 at a time) over all tiles, the tiles split among OpenMP
// threads. The library links libgomp by soname, so inside torch's process it shares torch's
// OpenMP runtime and threads rather than starting a second set that would fight them for cores.
//
// Written with GCC vector extensions rather than intrinsics: the same code compiles to AVX-512
// (one zmm per vector) or AVX2 (two ymm) for the machine it is built on (-march=native).

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

constexpr int64_t TILE = 16;   // output columns per tile
constexpr int64_t GROUP = 32;  // inputs per block
constexpr int64_t Q4_BLOCK = 2 * TILE * 4 + GROUP * TILE / 2;  // 384 bytes
constexpr int64_t Q8_BLOCK = TILE * 4 + GROUP * TILE;          // 576 bytes
constexpr int64_t ROW_STEP = 16;  // rows per kernel call: 16 accumulators and room to spare

inline f32x16 load_f32x16(const uint8_t* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// 16 bytes -> 16 int32 lanes, zero- or sign-extended. GCC 12 lowers __builtin_convertvector of
// bytes to one insert per byte, so the x86 widening instructions are named where the target has
// them.
template <bool Signed>
inline i32x16 widen(const uint8_t* p) {
#if defined(__AVX512F__)
    const __m128i bytes = _mm_loadu_si128((const __m128i*)p);
    return (i32x16)(Signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
#elif defined(__AVX2__)
    const __m128i bytes = _mm_loadu_si128((const __m128i*)p), rest = _mm_srli_si128(bytes, 8);
    const __m256i low = Signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
    const __m256i high = Signed ? _mm256_cvtepi8_epi32(rest) : _mm256_cvtepu8_epi32(rest);
    i32x16 v;
    std::memcpy(&v, &low, 32);
    std::memcpy((char*)&v + 32, &high, 32);
    return v;
#else
    typedef std::conditional_t<Signed, i8x16, u8x16> bytes16;
    bytes16 bytes;
    std::memcpy(&bytes, p, sizeof bytes);
    return __builtin_convertvector(bytes, i32x16);
#endif
}

inline f32x16 fma(f32x16 a, f32x16 b, f32x16 c) {
    // One instruction and one rounding under -ffp-contract=fast (block_kernels.py builds with
    // it); two roundings without. Where a * b is exact, as in the dequantization, both agree.
    return a * b + c;
}

// One call's operands, for rows [row, row + M) of x: pointers already at that row.
struct Rows {
    const float* x;           // (M, k) at stride k
    int64_t k;
    const uint8_t* w;         // all tiles' blocks
    int64_t groups;           // k / 32
    float* y;                 // (M, n) at stride n
    int64_t n;
    const float* u;           // (M, rank) at stride rank: x @ a^T of the low-rank term, or null
    int64_t rank;
    const int64_t* tile_low;  // per tile: its layer's first column of u, its rank, its b's offset
    const float* lora_b;      // per tile, (its rank, 16): its layer's b^T times the scale
};

// y = acc + u @ b for the tile's 16 outputs: the low-rank term added after the product, as
// torch's addmm_ on the product would add it. Each tile belongs to one stacked layer and reads
// only that layer's columns of u and its own b, stored contiguously.
template <int M, int NB>
inline void store(const Rows& a, int64_t tile0, f32x16 (&acc)[M][NB]) {
    if (a.u != nullptr)
        for (int b = 0; b < NB; ++b) {
            const int64_t* low = a.tile_low + 3 * (tile0 + b);
            const float* u = a.u + low[0];
            const float* bt = a.lora_b + low[2];
            for (int64_t j = 0; j < low[1]; ++j) {
                const f32x16 bj = load_f32x16((const uint8_t*)(bt + j * TILE));
                for (int r = 0; r < M; ++r) acc[r][b] = fma(bj, u[r * a.rank + j] - f32x16{}, acc[r][b]);
            }
        }
    for (int r = 0; r < M; ++r)
        for (int b = 0; b < NB; ++b)
            std::memcpy(a.y + r * a.n + (tile0 + b) * TILE, &acc[r][b], sizeof(f32x16));
}

// The two formats: how many float32 scales a block starts with (d, or d and m), and how its
// codes give the weights of `STEP` consecutive inputs for the tile's 16 outputs.
struct Q4_1 {
    static constexpr int64_t BLOCK = Q4_BLOCK;
    static constexpr int SCALES = 2;  // d, m
    static constexpr int STEP = 2;    // one byte holds inputs 2p (low nibble) and 2p + 1
    static inline void decode(const uint8_t* codes, int p, f32x16 d, f32x16 m, f32x16 (&w)[STEP]) {
        const i32x16 v = widen<false>(codes + p * TILE);
        w[0] = fma(__builtin_convertvector(v & 15, f32x16), d, m);
        w[1] = fma(__builtin_convertvector(v >> 4, f32x16), d, m);
    }
};

struct Q8_0 {
    static constexpr int64_t BLOCK = Q8_BLOCK;
    static constexpr int SCALES = 1;  // d
    static constexpr int STEP = 1;
    static inline void decode(const uint8_t* codes, int k, f32x16 d, f32x16, f32x16 (&w)[STEP]) {
        w[0] = __builtin_convertvector(widen<true>(codes + k * TILE), f32x16) * d;  // exact
    }
};

// M rows by NB column tiles side by side, so small M still has M * NB independent accumulator
// chains (a fused multiply-add has 4 cycles of latency and two of them issue per cycle).
template <class Format, int M, int NB>
void tiles(const Rows& a, int64_t tile0) {
    constexpr int STEP = Format::STEP;
    f32x16 acc[M][NB];
    for (int r = 0; r < M; ++r)
        for (int b = 0; b < NB; ++b) acc[r][b] = f32x16{};
    const uint8_t* first[NB];
    for (int b = 0; b < NB; ++b) first[b] = a.w + (tile0 + b) * a.groups * Format::BLOCK;
    for (int64_t g = 0; g < a.groups; ++g) {
        f32x16 d[NB], m[NB];
        const uint8_t* codes[NB];
        for (int b = 0; b < NB; ++b) {
            const uint8_t* block = first[b] + g * Format::BLOCK;
            d[b] = load_f32x16(block);
            m[b] = Format::SCALES > 1 ? load_f32x16(block + 64) : f32x16{};
            codes[b] = block + 64 * Format::SCALES;
        }
        const float* xg = a.x + g * GROUP;
#pragma GCC unroll 4
        for (int p = 0; p < GROUP / STEP; ++p) {
            for (int b = 0; b < NB; ++b) {
                f32x16 w[STEP];
                Format::decode(codes[b], p, d[b], m[b], w);
                for (int s = 0; s < STEP; ++s)
                    for (int r = 0; r < M; ++r)
                        acc[r][b] = fma(w[s], xg[r * a.k + STEP * p + s] - f32x16{}, acc[r][b]);
            }
        }
    }
    store<M, NB>(a, tile0, acc);
}

// Tiles side by side by row count: enough independent chains at 1-2 rows, registers at 16. One
// row takes 8: eight blocks streamed at once kept the memory busier than four (one pass over
// the embedded default's products, 1 row: 0.93x the time in an interleaved A/B, host B).
constexpr int tiles_side_by_side(int rows) { return rows <= 1 ? 8 : rows <= 2 ? 4 : rows <= 8 ? 2 : 1; }
constexpr int64_t RUN = 8;  // tiles whose blocks a thread reads for every row step in turn

// Tiles [first, last) for M rows: NB tiles at a time, the rest one by one.
template <class Format, int M>
void rows_over_tiles(const Rows& a, int64_t first, int64_t last) {
    constexpr int NB = tiles_side_by_side(M);
    int64_t tile = first;
    for (; tile + NB <= last; tile += NB) tiles<Format, M, NB>(a, tile);
    if constexpr (NB > 4)
        for (; tile + 4 <= last; tile += 4) tiles<Format, M, 4>(a, tile);
    if constexpr (NB > 2)
        for (; tile + 2 <= last; tile += 2) tiles<Format, M, 2>(a, tile);
    for (; tile < last; ++tile) tiles<Format, M, 1>(a, tile);
}

template <class Format>
void step_over_tiles(int64_t rows, const Rows& a, int64_t first, int64_t last) {
#define VC_ROWS(M) \
    case M: rows_over_tiles<Format, M>(a, first, last); break;
    switch (rows) {
        VC_ROWS(1) VC_ROWS(2) VC_ROWS(3) VC_ROWS(4) VC_ROWS(5) VC_ROWS(6) VC_ROWS(7) VC_ROWS(8)
        VC_ROWS(9) VC_ROWS(10) VC_ROWS(11) VC_ROWS(12) VC_ROWS(13) VC_ROWS(14) VC_ROWS(15)
        default: rows_over_tiles<Format, 16>(a, first, last); break;
    }
#undef VC_ROWS
}

// u = x @ a^T: (m, k) by (rank, k), rank small (16 per LoRA layer, 48 for stacked q/k/v); each
// u[row][j] one dot product along k in two chains (k is whole groups of 32). Called by every
// thread of the product's parallel region, which shares the dot products out and waits for all
// of them at the loop's end. (Run by one thread while the other waited, a's reads cost one
// row's pass over the embedded default's products ~5% more.)
void low_rank_input(const float* x, int64_t m, int64_t k, const float* lora_a, int64_t rank,
                    float* u) {
#pragma omp for schedule(static)
    for (int64_t job = 0; job < m * rank; ++job) {
        const int64_t row = job / rank, j = job % rank;
        const float* xr = x + row * k;
        const float* aj = lora_a + j * k;
        f32x16 s0{}, s1{};
        for (int64_t i = 0; i < k; i += 2 * TILE) {
            s0 = fma(load_f32x16((const uint8_t*)(xr + i)), load_f32x16((const uint8_t*)(aj + i)), s0);
            s1 = fma(load_f32x16((const uint8_t*)(xr + i + TILE)),
                     load_f32x16((const uint8_t*)(aj + i + TILE)), s1);
        }
        s0 += s1;
        float total = 0.0f;
        for (int lane = 0; lane < TILE; ++lane) total += s0[lane];
        u[row * rank + j] = total;
    }
}

// Every tile of the weight for all m rows, in one parallel region: the low-rank input first, then
// each thread an even share of the tiles (shared out in whole runs of 4, a 576-output weight
// gave one thread 20 tiles and the other 16), in runs of RUN tiles whose blocks the row steps
// of 16 reuse from cache.
template <class Format>
void gemm(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, float* y,
          const float* lora_a, int64_t rank, const int64_t* tile_low, const float* lora_b) {
    std::vector<float> u(rank > 0 ? m * rank : 0);
    const int64_t tiles = n / TILE;
#pragma omp parallel
    {
        if (rank > 0) low_rank_input(x, m, k, lora_a, rank, u.data());
        const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t share_end = tiles * (thread + 1) / threads;
        for (int64_t first = tiles * thread / threads; first < share_end; first += RUN) {
            const int64_t last = first + RUN < share_end ? first + RUN : share_end;
            for (int64_t row = 0; row < m; row += ROW_STEP) {
                const int64_t rows = m - row < ROW_STEP ? m - row : ROW_STEP;
                const Rows a{x + row * k,
                             k,
                             w,
                             k / GROUP,
                             y + row * n,
                             n,
                             rank > 0 ? u.data() + row * rank : nullptr,
                             rank,
                             tile_low,
                             lora_b};
                step_over_tiles<Format>(rows, a, first, last);
            }
        }
    }
}

}  // namespace

extern "C" {

// x: (m, k) float32 rows; w: n / 16 tiles of k / 32 Q4_1 blocks; y: (m, n) float32.
// k a multiple of 32, n a multiple of 16 (the caller checks). With rank > 0 the low-rank term
// (x @ a^T) @ b is added: lora_a (rank, k); tile_low (n / 16, 3) and lora_b as `Rows` says.
void vc_q4_1_gemm(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, float* y,
                  const float* lora_a, int64_t rank, const int64_t* tile_low, const float* lora_b) {
    gemm<Q4_1>(x, m, k, w, n, y, lora_a, rank, tile_low, lora_b);
}

void vc_q8_0_gemm(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, float* y,
                  const float* lora_a, int64_t rank, const int64_t* tile_low, const float* lora_b) {
    gemm<Q8_0>(x, m, k, w, n, y, lora_a, rank, tile_low, lora_b);
}

int64_t vc_q4_1_block_bytes() { return Q4_BLOCK; }
int64_t vc_q8_0_block_bytes() { return Q8_BLOCK; }
}
