// One decode pass of a Llama-family decoder through all its layers in native code: the norms,
// the block-format products (block_gemm.cpp), rotary embedding, the paged KV cache's writes and
// MMCA attention over it, the MLP and the residuals, for m rows of one new token each.
//
// Why: on the 2-core CPU a one-row decode step of the embedded default spent ~12 ms in its
// block products and ~13 ms more in the Python and the ~50 small torch ops per layer around them
// (serving/engine/native_decode.py has the figures). Here the glue costs microseconds, so a
// step is close to its weight reads. The arithmetic is the lean forward's (lean_forward.py),
// written out in float32, with sums in another order than torch's: outputs may differ from it
// in the last bits, as the block products already do.
//
// What it reads, per layer, is a row of a table the Python side builds once (layout below):
// pointers to the norm weights, to the layer's key and value stores, and to each product's
// blocks and low-rank factors. Per pass: the rows' hidden states (updated in place), their
// rotary cos/sin, each row's new cache slot and the slots of its positions 0..p, and which
// softmax each of those keys enters.
//
// MMCA (visualchat/model/attention.py): a text query attends with one softmax over the earlier
// text keys plus one over the earlier image keys, the two outputs added (an empty part adds
// nothing); an image query attends to the keys of its own image only. Which key enters which
// part is worked out in Python (paged_attention.key_parts, from MMCA's masks), so the rule is
// written once; here a key's part is a code (NONE, TEXT_PART, IMAGE_PART).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {
void vc_q4_1_gemm(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, float* y,
                  const float* lora_a, int64_t rank, const int64_t* tile_low, const float* lora_b);
void vc_q8_0_gemm(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, float* y,
                  const float* lora_a, int64_t rank, const int64_t* tile_low, const float* lora_b);
}

namespace {

// A product's entries in the table, in this order (native_decode.py writes them): its format
// (0 Q4_1, 1 Q8_0), blocks, outputs, inputs, low-rank a, rank, tile_low, b, bias (0: none).
constexpr int64_t PRODUCT = 9;
// A layer's row: input norm weight, post-attention norm weight, key store, value store, then the
// q/k/v, o, gate/up and down products.
constexpr int64_t LAYER_HEAD = 4;
constexpr int64_t LAYER = LAYER_HEAD + 4 * PRODUCT;

struct Shape {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scaling;
};

template <class T>
inline T* ptr(int64_t address) {
    return reinterpret_cast<T*>(address);
}

// y (m, n) = x (m, k) @ W^T (+ bias) through the block kernels.
void multiply(const int64_t* p, const float* x, int64_t m, float* y) {
    const auto kernel = p[0] == 0 ? vc_q4_1_gemm : vc_q8_0_gemm;
    const int64_t n = p[2];
    kernel(x, m, p[3], ptr<const uint8_t>(p[1]), n, y, ptr<const float>(p[4]), p[5],
           ptr<const int64_t>(p[6]), ptr<const float>(p[7]));
    if (p[8] != 0) {
        const float* bias = ptr<const float>(p[8]);
        for (int64_t r = 0; r < m; ++r)
            for (int64_t j = 0; j < n; ++j) y[r * n + j] += bias[j];
    }
}

// LlamaRMSNorm: w * (x * rsqrt(mean(x^2) + eps)), in float32.
void rms_norm(const float* x, const float* w, int64_t m, int64_t h, float eps, float* out) {
    for (int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * h;
        float lanes[16] = {};
        for (int64_t i = 0; i < h; ++i) lanes[i % 16] += xr[i] * xr[i];
        float sum = 0.0f;
        for (float lane : lanes) sum += lane;
        const float scale = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
        for (int64_t i = 0; i < h; ++i) out[r * h + i] = w[i] * (xr[i] * scale);
    }
}

// transformers' rotate-half rotary embedding of one head's d values, in place.
void rotate(float* x, const float* cos, const float* sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t j = 0; j < half; ++j) {
        const float a = x[j], b = x[j + half];
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// a . b over d values, in 8 lanes (GCC vectorizes the fixed-width inner loop; a plain sum is one
// dependent chain, which it may not reorder).
inline float dot(const float* a, const float* b, int64_t d) {
    float lanes[8] = {};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += a[j + l] * b[j + l];
    float total = 0.0f;
    for (float lane : lanes) total += lane;
    for (; j < d; ++j) total += a[j] * b[j];
    return total;
}

// Which softmax a key enters for a query: NONE, or one of the two MMCA parts (causal attention
// uses TEXT_PART alone; an image query's keys are all IMAGE_PART). paged_attention.py has the
// same codes.
enum Part : uint8_t { NONE = 0, TEXT_PART = 1, IMAGE_PART = 2 };

inline f32x16 load16(const float* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// The sum of 16 lanes, pairwise: 4 dependent adds instead of 15 in a row (a one-row step at
// 1,520 cached positions: 0.89-0.90x the time, interleaved in a scratch script).
inline float hsum(f32x16 v) {
    typedef float f32x8 __attribute__((vector_size(32)));
    typedef float f32x4 __attribute__((vector_size(16)));
    const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const f32x4 b =
        __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// e^x for 16 values, as Cephes' expf computes it: n = round(x / ln 2), r = x - n ln 2 (ln 2 in
// two parts, so r keeps float32 accuracy), e^r by a degree-7 polynomial, times 2^n through the
// exponent bits. For x up to 88, within 2 ulp of torch's exp where that is a normal float
// (tested), and 0 below -87.3, where it is denormal or 0 (an attention weight that small adds
// nothing to float32 sums of at least 1). Vectorized because one scalar expf per key and head
// was a large part of the pass's attention at long contexts.
inline f32x16 exp16(f32x16 x) {
    const auto underflow = x < -87.33654f;  // lanes of -1 where true
    x = underflow ? f32x16{} : x;
    x = x > 88.0f ? f32x16{} + 88.0f : x;  // (attention's x is <= 0; 2^128 would overflow)
    const f32x16 half = x < 0.0f ? f32x16{} - 0.5f : f32x16{} + 0.5f;
    const i32x16 n = __builtin_convertvector(x * 1.44269504088896341f + half, i32x16);  // rounded
    const f32x16 nf = __builtin_convertvector(n, f32x16);
    const f32x16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    f32x16 p = f32x16{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const i32x16 bits = (n + 127) << 23;  // 2^n, n in -126..127 after the clamps
    f32x16 scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return underflow ? f32x16{} : p * scale;
}

// One query head of one row: the sum over parts of the softmax-weighted values of the part's
// keys, into out (d). Each key's weight is exp(score - its part's max) / its part's total, so
// both softmaxes are one pass over the values; a part with no key adds nothing. V = d / 16 when
// d is a multiple of 16 up to 128 (the query and both parts' sums then live in registers), else
// 0: any d, through memory.
template <int V>
void attend(const float* q, int64_t count, const float* keys, const float* values,
            const int64_t* slots, int64_t stride, int64_t d, float scaling, const uint8_t* part,
            float* scores, float* out) {
    f32x16 query[V > 0 ? V : 1];
    for (int i = 0; i < V; ++i) query[i] = load16(q + 16 * i);
    float top[3] = {-INFINITY, -INFINITY, -INFINITY};
    for (int64_t t = 0; t < count; ++t) {
        if (part[t] == NONE) continue;
        const float* k = keys + slots[t] * stride;
        float score;
        if constexpr (V > 0) {
            f32x16 acc = query[0] * load16(k);
            for (int i = 1; i < V; ++i) acc += query[i] * load16(k + 16 * i);
            score = hsum(acc);
        } else {
            score = dot(q, k, d);
        }
        scores[t] = score * scaling;
        if (scores[t] > top[part[t]]) top[part[t]] = scores[t];
    }
    // exp(score - its part's max): 16 keys at a time where the head width allows (keys of no
    // part get exp(-inf) = 0 there), the rest one by one
    for (int64_t t = 0; t < count; ++t)
        scores[t] = part[t] == NONE ? -INFINITY : scores[t] - top[part[t]];
    float total[3] = {0.0f, 0.0f, 0.0f};
    int64_t next = 0;  // the first key the vector loop leaves
    if constexpr (V > 0) {
        f32x16 sums[2] = {f32x16{}, f32x16{}};
        for (; next + 16 <= count; next += 16) {
            const f32x16 e = exp16(load16(scores + next));
            std::memcpy(scores + next, &e, sizeof e);
            f32x16 text, image;
            for (int lane = 0; lane < 16; ++lane) {
                text[lane] = part[next + lane] == TEXT_PART ? e[lane] : 0.0f;
                image[lane] = part[next + lane] == IMAGE_PART ? e[lane] : 0.0f;
            }
            sums[0] += text;
            sums[1] += image;
        }
        for (int lane = 0; lane < 16; ++lane) {
            total[TEXT_PART] += sums[0][lane];
            total[IMAGE_PART] += sums[1][lane];
        }
    }
    for (int64_t t = next; t < count; ++t) {
        if (part[t] == NONE) continue;
        scores[t] = std::exp(scores[t]);
        total[part[t]] += scores[t];
    }
    if constexpr (V > 0) {  // per part: the sum of exp-weighted values, divided once at the end
        f32x16 sum[2][V];
        for (int p = 0; p < 2; ++p)
            for (int i = 0; i < V; ++i) sum[p][i] = f32x16{};
        for (int64_t t = 0; t < count; ++t) {
            if (part[t] == NONE) continue;
            const float* v = values + slots[t] * stride;
            const int p = part[t] - 1;
            for (int i = 0; i < V; ++i) sum[p][i] += scores[t] * load16(v + 16 * i);
        }
        for (int i = 0; i < V; ++i) {
            f32x16 o{};
            for (int p = 0; p < 2; ++p)
                if (total[p + 1] > 0.0f) o += sum[p][i] / total[p + 1];
            std::memcpy(out + 16 * i, &o, sizeof o);
        }
    } else {
        std::memset(out, 0, d * sizeof(float));
        for (int64_t t = 0; t < count; ++t) {
            if (part[t] == NONE) continue;
            const float weight = scores[t] / total[part[t]];
            const float* v = values + slots[t] * stride;
            for (int64_t j = 0; j < d; ++j) out[j] += weight * v[j];
        }
    }
}

// Attention of m rows of one query each: row r's query heads at q + (rows ? rows[r] : r) *
// q_stride, its keys and values at key_slots[r][0..counts[r]) of the layer's stores, each key
// entering the softmax parts[r][t] names (NONE, TEXT_PART or IMAGE_PART; parts is laid out
// like key_slots). out: (m, heads, d).
struct Queries {
    const float* q;
    const int64_t* rows;  // nullptr: row r is query row r
    int64_t q_stride;
    int64_t m;
    const int64_t* key_slots;
    int64_t key_stride;
    const int64_t* counts;
    const uint8_t* parts;
};

void attention(const Queries& in, int64_t heads, int64_t kv_heads, int64_t d, float scaling,
               const float* keys, const float* values, float* out) {
    const int64_t shared = heads / kv_heads, kv_stride = kv_heads * d;
    const auto run = d == 64 ? attend<4> : d == 128 ? attend<8> : d == 32 ? attend<2>
                     : d == 16 ? attend<1> : attend<0>;
#pragma omp parallel for schedule(dynamic)
    for (int64_t job = 0; job < in.m * heads; ++job) {
        const int64_t r = job / heads, h = job % heads, g = h / shared;
        const int64_t count = in.counts[r];
        const int64_t row = in.rows ? in.rows[r] : r;
        std::vector<float> scores(count);
        run(in.q + row * in.q_stride + h * d, count, keys + g * d, values + g * d,
            in.key_slots + r * in.key_stride, kv_stride, d, scaling, in.parts + r * in.key_stride,
            scores.data(), out + r * heads * d + h * d);
    }
}

}  // namespace

extern "C" {

// hidden (m, hidden) float32: the rows' embeddings in, their last layer's output out (before
// the final norm). layers: (num_layers, LAYER) int64, see above. cos, sin: (m, head_dim) for
// each row's position. new_slots (m,), positions (m,), key_slots (m, key_stride): row r's keys
// are at key_slots[r][0..positions[r]], its own new slot last. parts (m, key_stride) uint8:
// the softmax each of those keys enters (0 none, 1 text, 2 image).
void vc_decode_pass(float* hidden, int64_t m, const int64_t* layers, int64_t num_layers,
                    const int64_t* shape_ints, const float* shape_floats, const float* cos,
                    const float* sin, const int64_t* new_slots, const int64_t* positions,
                    const int64_t* key_slots, int64_t key_stride, const uint8_t* parts) {
    const Shape s{shape_ints[0], shape_ints[1], shape_ints[2], shape_ints[3], shape_ints[4],
                  shape_floats[0], shape_floats[1]};
    const int64_t h = s.hidden, d = s.head_dim;
    const int64_t qkv_width = (s.heads + 2 * s.kv_heads) * d, kv_stride = s.kv_heads * d;
    std::vector<float> x(m * h), qkv(m * qkv_width), attended(m * s.heads * d), residual(m * h);
    std::vector<float> gate_up(m * 2 * s.intermediate), act(m * s.intermediate);
    std::vector<int64_t> counts(m);
    for (int64_t r = 0; r < m; ++r) counts[r] = positions[r] + 1;  // keys 0..p, its own included
    const Queries queries{qkv.data(), nullptr, qkv_width, m, key_slots, key_stride, counts.data(),
                          parts};
    for (int64_t l = 0; l < num_layers; ++l) {
        const int64_t* layer = layers + l * LAYER;
        const int64_t* products = layer + LAYER_HEAD;
        float* keys = ptr<float>(layer[2]);
        float* values = ptr<float>(layer[3]);
        rms_norm(hidden, ptr<const float>(layer[0]), m, h, s.eps, x.data());
        multiply(products, x.data(), m, qkv.data());
        for (int64_t r = 0; r < m; ++r) {
            float* row = qkv.data() + r * qkv_width;
            for (int64_t head = 0; head < s.heads + s.kv_heads; ++head)  // queries, then keys
                rotate(row + head * d, cos + r * d, sin + r * d, d);
            const float* k = row + s.heads * d;
            std::memcpy(keys + new_slots[r] * kv_stride, k, kv_stride * sizeof(float));
            std::memcpy(values + new_slots[r] * kv_stride, k + kv_stride, kv_stride * sizeof(float));
        }
        attention(queries, s.heads, s.kv_heads, d, s.scaling, keys, values, attended.data());
        multiply(products + PRODUCT, attended.data(), m, residual.data());
        for (int64_t i = 0; i < m * h; ++i) hidden[i] += residual[i];
        rms_norm(hidden, ptr<const float>(layer[1]), m, h, s.eps, x.data());
        multiply(products + 2 * PRODUCT, x.data(), m, gate_up.data());
        const int64_t inter = s.intermediate;
        for (int64_t r = 0; r < m; ++r)
            for (int64_t j = 0; j < inter; ++j) {
                const float g = gate_up[r * 2 * inter + j], u = gate_up[r * 2 * inter + inter + j];
                act[r * inter + j] = g / (1.0f + std::exp(-g)) * u;  // silu(gate) * up
            }
        multiply(products + 3 * PRODUCT, act.data(), m, residual.data());
        for (int64_t i = 0; i < m * h; ++i) hidden[i] += residual[i];
    }
}

int64_t vc_decode_layer_entries() { return LAYER; }

// One layer's attention for the lean forward's decode groups (one query per row), whose new
// keys and values are already in their slots: the native pass's attention above, without the
// gathers and the padding to the longest context that the torch path needs. q: the pass's
// queries, row rows[r] of stride q_stride floats (heads x head_dim contiguous within a row).
// key_slots (m, key_stride) int64, counts (m,): row r attends to key_slots[r][0..counts[r]).
// parts (m, key_stride) uint8: which softmax each of those keys enters (0 none, 1 text,
// 2 image), worked out by the caller (paged_attention.key_parts, from MMCA's masks). out: (m,
// heads, head_dim) float32.
void vc_decode_attention(const float* q, const int64_t* rows, int64_t q_stride, int64_t m,
                         const float* keys, const float* values, const int64_t* key_slots,
                         int64_t key_stride, const int64_t* counts, const uint8_t* parts,
                         int64_t heads, int64_t kv_heads, int64_t head_dim, float scaling,
                         float* out) {
    const Queries queries{q, rows, q_stride, m, key_slots, key_stride, counts, parts};
    attention(queries, heads, kv_heads, head_dim, scaling, keys, values, out);
}

// y = exp16(x) over n values (n a multiple of 16): the attention's exponential, for the tests.
void vc_exp16(const float* x, int64_t n, float* y) {
    for (int64_t i = 0; i + 16 <= n; i += 16) {
        const f32x16 e = exp16(load16(x + i));
        std::memcpy(y + i, &e, sizeof e);
    }
}
}
