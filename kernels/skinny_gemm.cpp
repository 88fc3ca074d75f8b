// y = x @ w.T + b for few-row fp32 inputs on CPU (fasteagle_cpu::skinny_linear[_int8]; see skinny_gemm.py).
//
// w is stored blocked, [ceil(N/16), K, 16]: block g holds output columns 16g..16g+15, each k's 16 weights side by
// side. A thread takes NB blocks at a time and streams them from memory once, whatever the number of rows: for
// each k it loads NB weight vectors and multiplies them into every row's accumulators with x[m, k] broadcast.
// Rows go in chunks of ROWS; the chunks after the first re-read the NB blocks from the thread's L2, not memory.
// Each y[m, n] is summed over k in order 0..K-1, one fp32 FMA at a time, whatever M is: a row's result does not
// depend on the other rows (a one-row decode step equals that row of a tree verification, bit for bit).
//
// The int8 variant reads int8 weights (a quarter of the bytes) in the same layout, widens each vector of 16 to fp32
// in registers and sums the same way; one scale per output column multiplies the sum when it is stored:
// y[m, n] = (sum_k x[m, k] * q[n, k]) * scale[n] + b[n]. The activations stay fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int8_t c16 __attribute__((vector_size(16)));

#ifdef __AVX512F__
constexpr int ROWS = 8, NB = 4;  // 32 zmm registers: NB * ROWS accumulators
#else
constexpr int ROWS = 4, NB = 2;  // AVX2: 16 ymm registers, two per v16
#endif
constexpr int PREFETCH_BYTES = 2048;  // ahead in a block (32 k steps of fp32, 128 of int8)

static inline v16 load16(const float* p) {
  v16 w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

static inline v16 load16(const int8_t* p) {  // exact: every int8 is an fp32
#if defined(__AVX512F__)  // (GCC 12 widens vector_size types one element at a time: intrinsics)
  return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  struct {
    __m256 lo, hi;
  } h = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))),
         _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))))};
  v16 w;
  std::memcpy(&w, &h, sizeof w);
  return w;
#else
  c16 q;
  std::memcpy(&q, p, sizeof q);
  return __builtin_convertvector(q, v16);
#endif
}

template <int M, typename W>
static void block_rows(const float* x, int64_t K, const W* const* p, v16 (*acc)[M]) {
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) acc[j][m] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    v16 w[NB];  // the NB weight vectors loaded once, then each row's x broadcast once
    for (int j = 0; j < NB; ++j) {
      __builtin_prefetch(reinterpret_cast<const char*>(p[j] + k * 16) + PREFETCH_BYTES);
      w[j] = load16(p[j] + k * 16);
    }
    for (int m = 0; m < M; ++m) {
      const float xm = x[m * K + k];
      for (int j = 0; j < NB; ++j) acc[j][m] += w[j] * xm;
    }
  }
}

template <int M>
static void store_rows(v16 (*acc)[M], const float* scale, const float* b, float* y, int64_t N, int64_t g,
                       int nblocks) {
  for (int j = 0; j < nblocks; ++j) {
    const int64_t n0 = (g + j) * 16;
    const int width = (int)std::min<int64_t>(16, N - n0);
    for (int m = 0; m < M; ++m) {
      float out[16];
      std::memcpy(out, &acc[j][m], sizeof out);
      for (int i = 0; i < width; ++i) {
        const float s = scale ? out[i] * scale[n0 + i] : out[i];
        y[m * N + n0 + i] = s + (b ? b[n0 + i] : 0.f);
      }
    }
  }
}

template <typename W>
struct Args {
  const float* x;
  const W* w;
  const float* scale;  // int8 only
  const float* b;
  float* y;
  int64_t N, K;
};

template <int M, typename W>
static void chunk(const Args<W>& a, int64_t m0, int64_t g, int nblocks) {
  v16 acc[NB][M];
  const W* p[NB];
  for (int j = 0; j < NB; ++j) p[j] = a.w + (g + std::min(j, nblocks - 1)) * a.K * 16;  // past the end: repeat
  block_rows<M>(a.x + m0 * a.K, a.K, p, acc);
  store_rows<M>(acc, a.scale, a.b, a.y + m0 * a.N, a.N, g, nblocks);
}

template <typename W>
using ChunkFn = void (*)(const Args<W>&, int64_t, int64_t, int);

template <typename W, int... Ms>
static constexpr ChunkFn<W> chunk_fns[] = {nullptr, chunk<Ms, W>...};

template <typename W>
#ifdef __AVX512F__
static constexpr auto& CHUNKS = chunk_fns<W, 1, 2, 3, 4, 5, 6, 7, 8>;
#else
static constexpr auto& CHUNKS = chunk_fns<W, 1, 2, 3, 4>;
#endif

template <typename W>
static void run(const Args<W>& a, int64_t M, int64_t blocks) {
  at::parallel_for(0, (blocks + NB - 1) / NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t g = group * NB;
      const int nblocks = (int)std::min<int64_t>(NB, blocks - g);
      for (int64_t m0 = 0; m0 < M; m0 += ROWS) CHUNKS<W>[std::min<int64_t>(ROWS, M - m0)](a, m0, g, nblocks);
    }
  });
}

static at::Tensor linear(const at::Tensor& x, const at::Tensor& wb, const at::Tensor* scale,
                         const c10::optional<at::Tensor>& bias, int64_t N, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, ": fp32 inputs only");
  TORCH_CHECK(wb.dim() == 3 && wb.size(2) == 16 && wb.is_contiguous() && wb.size(0) * 16 >= N &&
                  wb.size(0) * 16 < N + 16 && x.size(-1) == wb.size(1),
              name, ": bad blocked weight");
  const at::Tensor xs = x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t M = xs.size(0), K = xs.size(1);
  at::Tensor b, s;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  if (scale) s = scale->contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xs.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (scale)
    run<int8_t>({xp, wb.data_ptr<int8_t>(), s.data_ptr<float>(), bp, yp, N, K}, M, wb.size(0));
  else
    run<float>({xp, wb.data_ptr<float>(), nullptr, bp, yp, N, K}, M, wb.size(0));
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& wb, const c10::optional<at::Tensor>& bias,
                         int64_t N) {
  TORCH_CHECK(wb.scalar_type() == at::kFloat, "skinny_linear: fp32 weights only");
  return linear(x, wb, nullptr, bias, N, "skinny_linear");
}

at::Tensor skinny_linear_int8(const at::Tensor& x, const at::Tensor& wb, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(wb.scalar_type() == at::kChar, "skinny_linear_int8: int8 weights only");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N, "skinny_linear_int8: bad scale");
  return linear(x, wb, &scale, bias, N, "skinny_linear_int8");
}

TORCH_LIBRARY(fasteagle_cpu, m) {
  m.def("skinny_linear(Tensor x, Tensor blocked, Tensor? bias, int out_features) -> Tensor");
  m.def("skinny_linear_int8(Tensor x, Tensor blocked, Tensor scale, Tensor? bias, int out_features) -> Tensor");
}
TORCH_LIBRARY_IMPL(fasteagle_cpu, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
  m.impl("skinny_linear_int8", &skinny_linear_int8);
}
