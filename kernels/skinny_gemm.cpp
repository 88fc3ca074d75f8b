// y = x @ w.T + b for few-row fp32 inputs on CPU (fasteagle::skinny_linear; see skinny_gemm.py).
//
// w is stored blocked, [ceil(N/16), K, 16]: block g holds output columns 16g..16g+15, each k's 16 weights side by
// side. A thread takes NB blocks at a time and streams them from memory once, whatever the number of rows: for
// each k it loads NB weight vectors and multiplies them into every row's accumulators with x[m, k] broadcast.
// Rows go in chunks of ROWS; the chunks after the first re-read the NB blocks from the thread's L2, not memory.
// Each y[m, n] is summed over k in order 0..K-1, one fp32 FMA at a time, whatever M is: a row's result does not
// depend on the other rows (a one-row decode step equals that row of a tree verification, bit for bit).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

typedef float v16 __attribute__((vector_size(64)));

#ifdef __AVX512F__
constexpr int ROWS = 8, NB = 4;  // 32 zmm registers: NB * ROWS accumulators
#else
constexpr int ROWS = 4, NB = 2;  // AVX2: 16 ymm registers, two per v16
#endif
constexpr int PREFETCH = 512;  // floats ahead in a block (32 k steps)

template <int M>
static void block_rows(const float* x, int64_t K, const float* const* p, v16 (*acc)[M]) {
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < M; ++m) acc[j][m] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    for (int j = 0; j < NB; ++j) {
      __builtin_prefetch(p[j] + k * 16 + PREFETCH);
      v16 w;
      std::memcpy(&w, p[j] + k * 16, sizeof w);
      for (int m = 0; m < M; ++m) acc[j][m] += w * x[m * K + k];
    }
  }
}

template <int M>
static void store_rows(v16 (*acc)[M], const float* b, float* y, int64_t N, int64_t g, int nblocks) {
  for (int j = 0; j < nblocks; ++j) {
    const int64_t n0 = (g + j) * 16;
    const int width = (int)std::min<int64_t>(16, N - n0);
    for (int m = 0; m < M; ++m) {
      float out[16];
      std::memcpy(out, &acc[j][m], sizeof out);
      for (int i = 0; i < width; ++i) y[m * N + n0 + i] = out[i] + (b ? b[n0 + i] : 0.f);
    }
  }
}

template <int M>
static void chunk(const float* x, const float* wb, const float* b, float* y, int64_t N, int64_t K, int64_t g,
                  int nblocks) {
  v16 acc[NB][M];
  const float* p[NB];
  for (int j = 0; j < NB; ++j) p[j] = wb + (g + std::min(j, nblocks - 1)) * K * 16;  // past the end: repeat
  block_rows<M>(x, K, p, acc);
  store_rows<M>(acc, b, y, N, g, nblocks);
}

using ChunkFn = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int);

template <int... Ms>
static constexpr ChunkFn chunk_fns[] = {nullptr, chunk<Ms>...};

#ifdef __AVX512F__
static constexpr auto& CHUNKS = chunk_fns<1, 2, 3, 4, 5, 6, 7, 8>;
#else
static constexpr auto& CHUNKS = chunk_fns<1, 2, 3, 4>;
#endif

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& wb, const c10::optional<at::Tensor>& bias,
                         int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && wb.scalar_type() == at::kFloat, "skinny_linear: fp32 only");
  TORCH_CHECK(wb.dim() == 3 && wb.size(2) == 16 && wb.is_contiguous() && wb.size(0) * 16 >= N &&
                  wb.size(0) * 16 < N + 16 && x.size(-1) == wb.size(1),
              "skinny_linear: bad blocked weight");
  const at::Tensor xs = x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t M = xs.size(0), K = xs.size(1), blocks = wb.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float *xp = xs.data_ptr<float>(), *wp = wb.data_ptr<float>(), *bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (blocks + NB - 1) / NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t g = group * NB;
      const int nblocks = (int)std::min<int64_t>(NB, blocks - g);
      for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
        const int rows = (int)std::min<int64_t>(ROWS, M - m0);
        CHUNKS[rows](xp + m0 * K, wp, bp, yp + m0 * N, N, K, g, nblocks);
      }
    }
  });
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

TORCH_LIBRARY(fasteagle_cpu, m) {
  m.def("skinny_linear(Tensor x, Tensor blocked, Tensor? bias, int out_features) -> Tensor");
}
TORCH_LIBRARY_IMPL(fasteagle_cpu, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
