// Fused CPU kernels for one HyperAdam step (docs/spec.md §2) and its hand-derived backward.
//
// hyperadam_fast.py owns validation, allocation and autograd, compiles this file with the system
// C++ compiler (no torch headers, so it builds in seconds) and calls it through ctypes.
//
// Layout: a [p, J] tensor is J contiguous "planes" of `ld` rows; ld is p rounded up to kBlock and
// rows >= p are padding. The work is split into blocks of kBlock rows; inside a block every
// per-coordinate op is vectorised across rows, and the small matmuls ([kBlock, 2J] x [2J, 4J]
// etc.) are register-tiled outer products. The intermediates of a block (gates, decay logits,
// their gradients) therefore stay in L1/L2 and never stream through memory: that, not the FLOPs,
// is what the eager reference pays for. The only couplings between rows are the global column
// norms, so the forward and the backward are two parallel passes each, with a tiny serial
// reduction in between.
//
// Padding rows are computed like any other row but never enter a reduction over rows (the masks
// select rather than multiply), so whatever they hold cannot leak into real rows or into theta.

#include <omp.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

// Rows per block: 512 measured faster than 256 or 1024 with AVX-512; with AVX2, 256 ties.
constexpr int kBlock = 512;

// The vector type is one hardware register and the matmul tile fits the register file. With
// AVX-512 that is a 64-byte zmm and a 4 x 4 tile (16 accumulators of 32 registers). Without it,
// 64-byte vectors become ymm pairs and the same tile needs 32 accumulators in 16 registers: GCC
// spills them to the stack on every FMA, measured on an AVX2 host (znver3) as a fused step 4x
// slower than the eager reference. So AVX2 (and older) gets 32-byte vectors and a 4 x 2 tile.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kTileVectors = 4;  // row vectors per matmul tile
#else
constexpr int kVectorBytes = 32;
constexpr int kTileVectors = 2;
#endif

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  typedef int32_t I __attribute__((vector_size(kVectorBytes)));
  static constexpr int kLanes = kVectorBytes / 4;
  static constexpr float kExpLo = -87.0f;  // keeps 2^n a normal number
  static constexpr float kExpHi = 88.0f;   // keeps e^x finite
  static constexpr float kTanhClamp = 9.0f;  // tanh(9) = 1 to fp32 precision
  static constexpr float kLn2Hi = 0.693359375f;  // 355/512: n * kLn2Hi is exact for |n| <= 128
  static constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kLn2Hi
  static constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: (x + kRound) - kRound = rint(x)
  static constexpr int kBias = 127;
  static constexpr int kMantissa = 23;
  // e^r - 1 = r + r^2/2 + c3 r^3 + ... + c6 r^6 on |r| <= ln2/2, c3..c6 fitted (Lawson-weighted
  // least squares on the relative error): max relative error 3.6e-9 (Taylor needs degree 7).
  static constexpr int kPoly = 6;
  static constexpr float kPolyCoef[kPoly + 1] = {0.0f, 1.0f, 0.5f, 0.16666534059697702f,
                                                 0.04166723757978179f, 0.008367475811479739f,
                                                 0.0013863786686610872f};
};

template <>
struct Traits<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  typedef int64_t I __attribute__((vector_size(kVectorBytes)));
  static constexpr int kLanes = kVectorBytes / 8;
  static constexpr double kExpLo = -708.0;
  static constexpr double kExpHi = 709.0;
  static constexpr double kTanhClamp = 19.0;
  // ln 2 truncated to 41 significant bits (n * kLn2Hi exact for |n| < 2^11), and the rest.
  static constexpr double kLn2Hi = 0.693147180559663;
  static constexpr double kLn2Lo = 2.8235290563031577e-13;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int kBias = 1023;
  static constexpr int kMantissa = 52;
  static constexpr int kPoly = 13;  // Taylor: r^14/14! < 5e-18
  static constexpr double kPolyCoef[kPoly + 1] = {
      0.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
      1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};
};

// ---------------------------------------------------------------------------------------------
// Vector helpers and the transcendental functions (exp, expm1, sigmoid, tanh, ELU).

template <typename T>
using Vec = typename Traits<T>::V;

template <typename T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

// Unaligned vector loads/stores through a vector-of-T type (not memcpy): char-typed accesses
// would alias the plane-pointer arrays and force the compiler to reload every pointer after each
// store.
template <typename T>
struct Unaligned {
  typedef T V __attribute__((vector_size(kVectorBytes), aligned(alignof(T))));
};

template <typename T>
inline Vec<T> load(const T* p) {
  return *reinterpret_cast<const typename Unaligned<T>::V*>(p);
}

template <typename T>
inline void store(T* p, Vec<T> v) {
  *reinterpret_cast<typename Unaligned<T>::V*>(p) = v;
}

// A store that bypasses the caches, for outputs not read again within this call (saved planes,
// the new state): it saves the read-for-ownership of every written line, i.e. a third of the
// memory traffic of a pass. Needs 64-byte alignment (planes start at torch allocations, which
// are 64-byte aligned, and at multiples of kBlock rows); stream_fence() before other threads read.
template <typename T>
inline void store_nt(T* p, Vec<T> v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
    return;
  }
#elif defined(__AVX__)
  if constexpr (sizeof(T) == 4) {
    _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
    return;
  }
#endif
  store(p, v);
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Subnormal floats as zero (FTZ and DAZ) for the lifetime of the guard, in the calling thread;
// the caller's mode is restored on exit. A candidate whose gradients stay zero (a dead unit, a
// stalled network) sees its moments decay geometrically into the subnormal range within a few
// hundred steps at the learned decay rates, and x86 then takes a microcode assist on every
// operation touching them: measured 7x slower steps (1.29 against 0.18 s at p = 117 434). Values
// below 1.2e-38 are nothing next to the moment epsilon, so flushing them changes no update that
// matters; tests/meta_train/test_hyperadam_fast.py pins the behaviour.
class FlushSubnormals {
 public:
#if defined(__SSE__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_;
#endif
};

// Clamps. Written as selects they propagate NaN from x; the float specialisations below keep
// that (vmaxps/vminps return their second operand when either is NaN) in one instruction.
template <typename T>
inline Vec<T> vmax(Vec<T> x, Vec<T> lo) {
  return x < lo ? lo : x;
}

template <typename T>
inline Vec<T> vmin(Vec<T> x, Vec<T> hi) {
  return x > hi ? hi : x;
}

// 1/x and 1/sqrt(x). Division and square root are the slowest vector instructions and the step
// needs ~10 per coordinate and candidate, so float uses the hardware estimates refined by one
// Newton step (relative error ~1e-7, i.e. an ulp or two; x > 0 and finite here). Double (used to
// check the derivation) divides exactly.
template <typename T>
inline Vec<T> recip(Vec<T> x) {
  return T(1) / x;
}

template <typename T>
inline Vec<T> rsqrt(Vec<T> x) {
  Vec<T> r = x;  // a lane loop the compiler turns into one vector sqrt
  for (int l = 0; l < Traits<T>::kLanes; ++l) r[l] = std::sqrt(x[l]);
  return T(1) / r;
}

#if defined(__AVX512F__)
template <>
inline Vec<float> recip<float>(Vec<float> x) {
  const Vec<float> r = reinterpret_cast<Vec<float>>(_mm512_rcp14_ps(reinterpret_cast<__m512>(x)));
  return r * (2.0f - x * r);
}

template <>
inline Vec<float> rsqrt<float>(Vec<float> x) {
  const Vec<float> r =
      reinterpret_cast<Vec<float>>(_mm512_rsqrt14_ps(reinterpret_cast<__m512>(x)));
  return r * (1.5f - (0.5f * x) * (r * r));
}

template <>
inline Vec<float> vmax<float>(Vec<float> x, Vec<float> lo) {
  return reinterpret_cast<Vec<float>>(
      _mm512_max_ps(reinterpret_cast<__m512>(lo), reinterpret_cast<__m512>(x)));
}

template <>
inline Vec<float> vmin<float>(Vec<float> x, Vec<float> hi) {
  return reinterpret_cast<Vec<float>>(
      _mm512_min_ps(reinterpret_cast<__m512>(hi), reinterpret_cast<__m512>(x)));
}
#elif defined(__AVX__)
// One ymm register per vector here (kVectorBytes = 32).
template <>
inline Vec<float> recip<float>(Vec<float> x) {
  const Vec<float> r = reinterpret_cast<Vec<float>>(_mm256_rcp_ps(reinterpret_cast<__m256>(x)));
  return r * (2.0f - x * r);
}

template <>
inline Vec<float> rsqrt<float>(Vec<float> x) {
  const Vec<float> r = reinterpret_cast<Vec<float>>(_mm256_rsqrt_ps(reinterpret_cast<__m256>(x)));
  return r * (1.5f - (0.5f * x) * (r * r));
}
#endif

// e^x = s + s * q with s = 2^n, q = e^r - 1, x = n ln2 + r, |r| <= ln2 / 2. Writing e^r - 1
// directly keeps expm1 accurate near 0. NaN propagates through q.
template <typename T>
inline void exp_split(Vec<T> x, Vec<T>& s, Vec<T>& q) {
  using Tr = Traits<T>;
  using I = typename Tr::I;
  x = vmin<T>(vmax<T>(x, splat<T>(Tr::kExpLo)), splat<T>(Tr::kExpHi));
  const Vec<T> n = (x * T(1.4426950408889634) + Tr::kRound) - Tr::kRound;
  const Vec<T> r = (x - n * Tr::kLn2Hi) - n * Tr::kLn2Lo;
  Vec<T> poly = splat<T>(Tr::kPolyCoef[Tr::kPoly]);
  for (int k = Tr::kPoly - 1; k >= 1; --k) poly = poly * r + Tr::kPolyCoef[k];
  q = poly * r;
  const I bits = (__builtin_convertvector(n, I) + Tr::kBias) << Tr::kMantissa;
  std::memcpy(&s, &bits, sizeof s);
}

template <typename T>
inline Vec<T> vexp(Vec<T> x) {
  Vec<T> s, q;
  exp_split<T>(x, s, q);
  return s * q + s;
}

template <typename T>
inline Vec<T> vexpm1(Vec<T> x) {
  Vec<T> s, q;
  exp_split<T>(x, s, q);
  return s * q + (s - T(1));
}

template <typename T>
inline Vec<T> sigmoid(Vec<T> x) {
  return recip<T>(T(1) + vexp<T>(-x));
}

template <typename T>
inline Vec<T> vtanh(Vec<T> x) {
  const T c = Traits<T>::kTanhClamp;
  const Vec<T> y = vexpm1<T>(T(2) * vmin<T>(vmax<T>(x, splat<T>(-c)), splat<T>(c)));
  return y * recip<T>(y + T(2));
}

template <typename T>
inline Vec<T> elu(Vec<T> x) {
  return x > T(0) ? x : vexpm1<T>(x);
}

// ---------------------------------------------------------------------------------------------
// Block matmuls. A "plane pointer" points at the first row of the block in one plane.

// C_n[r] = init_n[r] (or bias[n], or 0) + sum_k A_k[r] * B[k * ldb + n], for n < N, r < kBlock.
#define ALWAYS_INLINE inline __attribute__((always_inline))

template <typename T, int NQ>
ALWAYS_INLINE void mm_tile(int K, const T* const* A, const T* B, int ldb, int n0, const T* bias,
                           const T* const* init, T* const* C, int r0) {
  constexpr int L = Traits<T>::kLanes;
  constexpr int S = kTileVectors;
  Vec<T> acc[NQ][S];
  if (init) {
    for (int q = 0; q < NQ; ++q)
      for (int s = 0; s < S; ++s) acc[q][s] = load(init[n0 + q] + r0 + s * L);
  } else {
    for (int q = 0; q < NQ; ++q) {
      const Vec<T> b = splat<T>(bias ? bias[n0 + q] : T(0));
      for (int s = 0; s < S; ++s) acc[q][s] = b;
    }
  }
  for (int k = 0; k < K; ++k) {
    const T* a = A[k] + r0;
    Vec<T> av[S];
    for (int s = 0; s < S; ++s) av[s] = load(a + s * L);
    const T* b = B + static_cast<int64_t>(k) * ldb + n0;
    for (int q = 0; q < NQ; ++q) {
      const T bq = b[q];
      for (int s = 0; s < S; ++s) acc[q][s] += av[s] * bq;
    }
  }
  for (int q = 0; q < NQ; ++q)
    for (int s = 0; s < S; ++s) store(C[n0 + q] + r0 + s * L, acc[q][s]);
}

template <typename T>
void mm_planes(int N, int K, const T* const* A, const T* B, int ldb, const T* bias,
               const T* const* init, T* const* C) {
  constexpr int step = kTileVectors * Traits<T>::kLanes;
  for (int r0 = 0; r0 < kBlock; r0 += step) {
    int n0 = 0;
    for (; n0 + 4 <= N; n0 += 4) mm_tile<T, 4>(K, A, B, ldb, n0, bias, init, C, r0);
    switch (N - n0) {
      case 3: mm_tile<T, 3>(K, A, B, ldb, n0, bias, init, C, r0); break;
      case 2: mm_tile<T, 2>(K, A, B, ldb, n0, bias, init, C, r0); break;
      case 1: mm_tile<T, 1>(K, A, B, ldb, n0, bias, init, C, r0); break;
      default: break;
    }
  }
}

// All-ones lanes for the first `count` lanes (count < kLanes), zeros after.
template <typename T>
inline typename Traits<T>::I lane_mask(int count) {
  typename Traits<T>::I m = {};
  for (int l = 0; l < count; ++l) m[l] = -1;
  return m;
}

// acc[i * K + k] += A_i[r] * B_k[r] over the first `valid` rows of the block, lane by lane
// (lanes are summed at the end). Rows past `valid` are padding and never read, whatever they hold.
template <typename T, int IQ, int KQ>
ALWAYS_INLINE void red_tile(int K, const T* const* A, const T* const* B, int i0, int k0, int valid,
                            Vec<T>* acc) {
  constexpr int L = Traits<T>::kLanes;
  Vec<T> c[IQ][KQ];
  for (int i = 0; i < IQ; ++i)
    for (int k = 0; k < KQ; ++k) c[i][k] = acc[(i0 + i) * K + k0 + k];
  int r = 0;
  for (; r + L <= valid; r += L) {
    Vec<T> a[IQ], b[KQ];
    for (int i = 0; i < IQ; ++i) a[i] = load(A[i0 + i] + r);
    for (int k = 0; k < KQ; ++k) b[k] = load(B[k0 + k] + r);
    for (int i = 0; i < IQ; ++i)
      for (int k = 0; k < KQ; ++k) c[i][k] += a[i] * b[k];
  }
  if (r < valid) {
    const typename Traits<T>::I keep = lane_mask<T>(valid - r);
    for (int i = 0; i < IQ; ++i)
      for (int k = 0; k < KQ; ++k)
        c[i][k] += keep ? load(A[i0 + i] + r) * load(B[k0 + k] + r) : splat<T>(0);
  }
  for (int i = 0; i < IQ; ++i)
    for (int k = 0; k < KQ; ++k) acc[(i0 + i) * K + k0 + k] = c[i][k];
}

template <typename T, int IQ>
inline void red_row(int K, const T* const* A, const T* const* B, int i0, int valid,
                    Vec<T>* acc) {
  int k0 = 0;  // IQ x kTileVectors accumulators, like the matmul tile
  for (; k0 + kTileVectors <= K; k0 += kTileVectors)
    red_tile<T, IQ, kTileVectors>(K, A, B, i0, k0, valid, acc);
  for (; k0 < K; ++k0) red_tile<T, IQ, 1>(K, A, B, i0, k0, valid, acc);
}

template <typename T>
void reduce_planes(int I, int K, const T* const* A, const T* const* B, int valid, Vec<T>* acc) {
  int i0 = 0;
  for (; i0 + 4 <= I; i0 += 4) red_row<T, 4>(K, A, B, i0, valid, acc);
  for (; i0 < I; ++i0) red_row<T, 1>(K, A, B, i0, valid, acc);
}

// Sums the lanes of every thread's accumulators, threads in a fixed order (deterministic).
template <typename T>
void finish_sums(const std::vector<Vec<T>>& acc, int threads, int count, T* out) {
  for (int e = 0; e < count; ++e) {
    T total = 0;
    for (int t = 0; t < threads; ++t) {
      const Vec<T> v = acc[static_cast<size_t>(t) * count + e];
      T lane_sum = 0;
      for (int l = 0; l < Traits<T>::kLanes; ++l) lane_sum += v[l];
      total += lane_sum;
    }
    out[e] = total;
  }
}

// Plane pointers of a [count, ld] array at block row r0.
template <typename T>
void planes_at(T* base, int64_t ld, int count, int64_t r0, T** out) {
  for (int k = 0; k < count; ++k) out[k] = base + k * ld + r0;
}

// Pointer slots; hyperadam_fast.py passes arrays in exactly this order.
enum ForwardSlot {
  F_GRAD,                                       // [ld]   gradient, zero padded
  F_H, F_C, F_M, F_V, F_B, F_GAMMA,             // [J,ld] previous state
  F_PRE_KERNEL, F_PRE_BIAS, F_LSTM_KERNEL, F_LSTM_BIAS,
  F_DECAY_KERNEL, F_DECAY_BIAS, F_WEIGHT_KERNEL, F_WEIGHT_BIAS,
  F_H_OUT, F_C_OUT, F_M_OUT, F_V_OUT, F_B_OUT, F_GAMMA_OUT,  // [J,ld] new state
  F_DIRECTION,                                  // [ld]   sum_j rho_j m_hat_j
  F_GATES,  // [4J,ld] sigma(i), tanh(u), sigma(f+1), sigma(o) (or null: nothing saved)
  F_DECAYS,                                     // [2J,ld] beta, gamma, or null
  F_RHO,                                        // [J,ld]  rho, or null
  F_NORMS,                                      // [2J]    column inverse norms of h_t and m_{t-1}
  F_NUM_SLOTS
};

enum BackwardSlot {
  B_GRAD, B_H, B_C, B_M,  // the backward needs only these of the previous state
  B_PRE_KERNEL, B_PRE_BIAS, B_LSTM_KERNEL, B_DECAY_KERNEL, B_WEIGHT_KERNEL,
  B_H_OUT, B_C_OUT, B_M_OUT, B_V_OUT, B_B_OUT, B_GAMMA_OUT,
  B_GATES, B_DECAYS, B_RHO, B_NORMS,
  // incoming gradients (null = zero)
  B_D_DIRECTION, B_D_H_OUT, B_D_C_OUT, B_D_M_OUT, B_D_V_OUT, B_D_B_OUT, B_D_GAMMA_OUT,
  // gradients of the previous state (null = not wanted)
  B_D_H, B_D_C, B_D_M, B_D_V, B_D_B, B_D_GAMMA,
  // gradients of theta (always written)
  B_D_PRE_KERNEL, B_D_PRE_BIAS, B_D_LSTM_KERNEL, B_D_LSTM_BIAS,
  B_D_DECAY_KERNEL, B_D_DECAY_BIAS, B_D_WEIGHT_KERNEL, B_D_WEIGHT_BIAS,
  B_NUM_SLOTS
};

// Sizes and the scalars of the step. The constants come from hyperadam.py (one source of truth).
template <typename T>
struct Dims {
  int64_t ld, p;  // rows per plane (a multiple of kBlock) and real coordinates
  int J, threads;
  T grad_inv_norm;  // rsqrt(sum g^2 + NORM_EPS), computed by torch exactly as the reference does
  T norm_eps, moment_eps, forget_bias;
  int64_t blocks() const { return ld / kBlock; }
  int valid(int64_t blk) const {  // rows of block blk that are real coordinates
    const int64_t v = p - blk * kBlock;
    return v >= kBlock ? kBlock : static_cast<int>(v > 0 ? v : 0);
  }
};

// e = ELU(g_hat a + b) for one block (spec §2.1.2); also writes g_hat.
template <typename T>
void preprocess(const Dims<T>& d, const T* grad, T grad_inv_norm, const T* pre_kernel,
                const T* pre_bias, T* g_hat, T* const* e) {
  constexpr int L = Traits<T>::kLanes;
  for (int r = 0; r < kBlock; r += L) store(g_hat + r, load(grad + r) * grad_inv_norm);
  for (int j = 0; j < d.J; ++j)
    for (int r = 0; r < kBlock; r += L)
      store(e[j] + r, elu<T>(load(g_hat + r) * pre_kernel[j] + pre_bias[j]));
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T>
void forward(const Dims<T>& d, void* const* slot) {
  const FlushSubnormals flush;  // the serial parts; each parallel region sets its own threads
  constexpr int L = Traits<T>::kLanes;
  const int J = d.J;
  const int64_t ld = d.ld;
  auto in = [&](int s) { return static_cast<const T*>(slot[s]); };
  auto out = [&](int s) { return static_cast<T*>(slot[s]); };
  T* gates_out = out(F_GATES);
  T* decays_out = out(F_DECAYS);
  T* rho_out = out(F_RHO);

  // Pass 1: StateCell (spec §2.1) and the column sums of squares of h_t and m_{t-1}.
  std::vector<Vec<T>> sq_acc(static_cast<size_t>(d.threads) * 2 * J, splat<T>(0));
#pragma omp parallel num_threads(d.threads)
  {
    const FlushSubnormals flush;
    const int tid = omp_get_thread_num();
    std::vector<T> buf(static_cast<size_t>(kBlock) * (1 + 5 * J));
    T* g_hat = buf.data();
    std::vector<T*> e(J), gates(4 * J);
    std::vector<const T*> x(2 * J);
    std::vector<T*> h_prev(J), c_prev(J), m_prev(J), h_new(J), c_new(J), act(4 * J);
    planes_at(g_hat + kBlock, kBlock, J, 0, e.data());
    planes_at(g_hat + kBlock * (1 + J), kBlock, 4 * J, 0, gates.data());
    Vec<T>* sq = sq_acc.data() + static_cast<size_t>(tid) * 2 * J;
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < d.blocks(); ++blk) {
      const int64_t r0 = blk * kBlock;
      const int valid = d.valid(blk);
      planes_at(const_cast<T*>(in(F_H)), ld, J, r0, h_prev.data());
      planes_at(const_cast<T*>(in(F_C)), ld, J, r0, c_prev.data());
      planes_at(const_cast<T*>(in(F_M)), ld, J, r0, m_prev.data());
      planes_at(out(F_H_OUT), ld, J, r0, h_new.data());
      planes_at(out(F_C_OUT), ld, J, r0, c_new.data());
      if (gates_out) planes_at(gates_out, ld, 4 * J, r0, act.data());
      preprocess(d, in(F_GRAD) + r0, d.grad_inv_norm, in(F_PRE_KERNEL), in(F_PRE_BIAS), g_hat,
                 e.data());
      for (int j = 0; j < J; ++j) x[j] = e[j], x[J + j] = h_prev[j];
      mm_planes<T>(4 * J, 2 * J, x.data(), in(F_LSTM_KERNEL), 4 * J, in(F_LSTM_BIAS), nullptr,
                   gates.data());
      for (int j = 0; j < J; ++j) {
        for (int r = 0; r < kBlock; r += L) {
          const Vec<T> si = sigmoid<T>(load(gates[j] + r));
          const Vec<T> tu = vtanh<T>(load(gates[J + j] + r));
          const Vec<T> sf = sigmoid<T>(load(gates[2 * J + j] + r) + d.forget_bias);
          const Vec<T> so = sigmoid<T>(load(gates[3 * J + j] + r));
          const Vec<T> c = sf * load(c_prev[j] + r) + si * tu;
          const Vec<T> h = so * vtanh<T>(c);
          store_nt(c_new[j] + r, c);
          store(h_new[j] + r, h);
          if (gates_out) {
            store_nt(act[j] + r, si);
            store_nt(act[J + j] + r, tu);
            store_nt(act[2 * J + j] + r, sf);
            store_nt(act[3 * J + j] + r, so);
          }
          const Vec<T> m = load(m_prev[j] + r);
          if (r + L <= valid) {
            sq[j] += h * h;
            sq[J + j] += m * m;
          } else if (r < valid) {  // padding rows may hold anything: select, never multiply
            const typename Traits<T>::I keep = lane_mask<T>(valid - r);
            sq[j] += keep ? h * h : splat<T>(0);
            sq[J + j] += keep ? m * m : splat<T>(0);
          }
        }
      }
    }
    stream_fence();  // before the barrier that ends the parallel region
  }

  // Column inverse norms (spec §2.2.1), folded into the decay kernel: N(X) W = X diag(n) W.
  T* norms = out(F_NORMS);
  finish_sums<T>(sq_acc, d.threads, 2 * J, norms);
  for (int k = 0; k < 2 * J; ++k) norms[k] = T(1) / std::sqrt(norms[k] + d.norm_eps);
  std::vector<T> decay_scaled(static_cast<size_t>(4) * J * J);
  for (int i = 0; i < 2 * J; ++i)
    for (int k = 0; k < 2 * J; ++k)
      decay_scaled[i * 2 * J + k] = norms[i] * in(F_DECAY_KERNEL)[i * 2 * J + k];

  // Pass 2: AdamCell (spec §2.2), WeightCell and the combination (spec §2.3).
#pragma omp parallel num_threads(d.threads)
  {
    const FlushSubnormals flush;
    std::vector<T> buf(static_cast<size_t>(kBlock) * (1 + 3 * J));
    T* dir = buf.data();
    std::vector<T*> z(2 * J), rho_pre(J);
    planes_at(dir + kBlock, kBlock, 2 * J, 0, z.data());
    planes_at(dir + kBlock * (1 + 2 * J), kBlock, J, 0, rho_pre.data());
    std::vector<const T*> x(2 * J);
    std::vector<T*> h_new(J), m_prev(J), v_prev(J), b_prev(J), gam_prev(J);
    std::vector<T*> m_new(J), v_new(J), b_new(J), gam_new(J), decays(2 * J), rho(J);
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < d.blocks(); ++blk) {
      const int64_t r0 = blk * kBlock;
      planes_at(out(F_H_OUT), ld, J, r0, h_new.data());
      planes_at(const_cast<T*>(in(F_M)), ld, J, r0, m_prev.data());
      planes_at(const_cast<T*>(in(F_V)), ld, J, r0, v_prev.data());
      planes_at(const_cast<T*>(in(F_B)), ld, J, r0, b_prev.data());
      planes_at(const_cast<T*>(in(F_GAMMA)), ld, J, r0, gam_prev.data());
      planes_at(out(F_M_OUT), ld, J, r0, m_new.data());
      planes_at(out(F_V_OUT), ld, J, r0, v_new.data());
      planes_at(out(F_B_OUT), ld, J, r0, b_new.data());
      planes_at(out(F_GAMMA_OUT), ld, J, r0, gam_new.data());
      if (decays_out) planes_at(decays_out, ld, 2 * J, r0, decays.data());
      if (rho_out) planes_at(rho_out, ld, J, r0, rho.data());
      for (int j = 0; j < J; ++j) x[j] = h_new[j], x[J + j] = m_prev[j];
      mm_planes<T>(2 * J, 2 * J, x.data(), decay_scaled.data(), 2 * J, in(F_DECAY_BIAS),
                   nullptr, z.data());
      mm_planes<T>(J, J, x.data(), in(F_WEIGHT_KERNEL), J, in(F_WEIGHT_BIAS), nullptr,
                   rho_pre.data());
      const T* grad = in(F_GRAD) + r0;
      for (int r = 0; r < kBlock; r += L) store(dir + r, splat<T>(0));
      for (int j = 0; j < J; ++j) {
        for (int r = 0; r < kBlock; r += L) {
          const Vec<T> g = load(grad + r);
          const Vec<T> beta = sigmoid<T>(load(z[j] + r));
          const Vec<T> gamma = sigmoid<T>(load(z[J + j] + r));
          const Vec<T> m = beta * load(m_prev[j] + r) + (T(1) - beta) * g;
          const Vec<T> v = gamma * load(v_prev[j] + r) + (T(1) - gamma) * (g * g);
          const Vec<T> b = beta * load(b_prev[j] + r) + (T(1) - beta);
          const Vec<T> gam = gamma * load(gam_prev[j] + r) + (T(1) - gamma);
          const Vec<T> m_tilde = m * recip<T>(b + d.moment_eps);
          const Vec<T> v_tilde = v * recip<T>(gam + d.moment_eps);
          const Vec<T> m_hat = m_tilde * rsqrt<T>(v_tilde + d.moment_eps);
          const Vec<T> rh = elu<T>(load(rho_pre[j] + r));
          store(dir + r, load(dir + r) + rh * m_hat);
          store_nt(m_new[j] + r, m);
          store_nt(v_new[j] + r, v);
          store_nt(b_new[j] + r, b);
          store_nt(gam_new[j] + r, gam);
          if (decays_out) {
            store_nt(decays[j] + r, beta);
            store_nt(decays[J + j] + r, gamma);
          }
          if (rho_out) store_nt(rho[j] + r, rh);
        }
      }
      std::memcpy(out(F_DIRECTION) + r0, dir, kBlock * sizeof(T));
    }
    stream_fence();  // before the barrier that ends the parallel region
  }
}

// ---------------------------------------------------------------------------------------------
// Backward of the step: gradients of theta and of the previous state, given the gradients of the
// direction d and of the new state (each may be absent = zero). Per coordinate and candidate,
// with D_B = B + eps, D_G = Gamma + eps, q = (V/D_G + eps)^(-1/2):
//   d rho   = dd * M~ q          d(rho pre) = d rho * ELU'     d M^ = dd * rho
//   d M~    = d M^ q             d V~ = -1/2 d M^ M~ q^3
//   dM     += d M~ / D_B         dB  -= d M~ M~ / D_B          (likewise dV, dGamma with V~)
//   d beta  = dM (m_{t-1} - g) + dB (b_{t-1} - 1)   -> dz_beta  = d beta * beta (1 - beta)
//   d gamma = dV (v_{t-1} - g^2) + dGamma (Gamma_{t-1} - 1), with gamma (v_{t-1} - g^2) = V - g^2
//   d m_{t-1} = dM beta + dz W_a'^T[m rows] + c_m m_{t-1};  d v_{t-1} = dV gamma;  etc.
//   d h_t = (incoming) + dz W_a'^T[h rows] + d(rho pre) W_q^T + c_h h_t
// where W_a' = diag(n) W_a folds the column norms n = (sum_rows x^2 + eps)^(-1/2) into the
// kernel and c = -n^3 sum_k (x^T dz)_ik W_a,ik is their gradient. Then the LSTM: with
// tc = tanh(c_t), dc_t += dh_t sigma(o) (1 - tc^2), and dG = [dc tanh(u) si', dc si tanh',
// dc c_{t-1} sf', dh tc so'] for the gates; d[e, h_{t-1}] = dG W_h^T, dW_h = [e, h_{t-1}]^T dG,
// and de * ELU' gives the preprocessing gradients. Pass 1 does the AdamCell and WeightCell,
// pass 2 (after the reduction that gives c_h, c_m) the StateCell.

template <typename T>
void backward(const Dims<T>& d, void* const* slot) {
  const FlushSubnormals flush;  // the serial parts; each parallel region sets its own threads
  constexpr int L = Traits<T>::kLanes;
  const int J = d.J;
  const int64_t ld = d.ld;
  auto in = [&](int s) { return static_cast<const T*>(slot[s]); };
  auto out = [&](int s) { return static_cast<T*>(slot[s]); };
  auto cp = [&](int s) { return const_cast<T*>(in(s)); };
  const T* norms = in(B_NORMS);
  const T* decay_kernel = in(B_DECAY_KERNEL);
  const T* weight_kernel = in(B_WEIGHT_KERNEL);
  const T* lstm_kernel = in(B_LSTM_KERNEL);

  // B for the block matmuls: rows k of dZ/dR, columns = h (or m) coordinates.
  //   dh_t  = dZ (N_h-scaled W_a[:J])^T + dR W_q^T   -> [3J, J]
  //   dm    = dZ (N_m-scaled W_a[J:])^T               -> [2J, J]
  //   d[e, h_{t-1}] = dG W_h^T                         -> [4J, 2J]
  std::vector<T> to_h(static_cast<size_t>(3) * J * J), to_m(static_cast<size_t>(2) * J * J);
  for (int i = 0; i < J; ++i) {
    for (int k = 0; k < 2 * J; ++k) {
      to_h[k * J + i] = norms[i] * decay_kernel[i * 2 * J + k];
      to_m[k * J + i] = norms[J + i] * decay_kernel[(J + i) * 2 * J + k];
    }
    for (int k = 0; k < J; ++k) to_h[(2 * J + k) * J + i] = weight_kernel[i * J + k];
  }
  std::vector<T> lstm_t(static_cast<size_t>(8) * J * J);
  for (int i = 0; i < 2 * J; ++i)
    for (int k = 0; k < 4 * J; ++k) lstm_t[k * 2 * J + i] = lstm_kernel[i * 4 * J + k];

  // dL/dh_t before the norm coupling; every row is written in pass 1, so no zero fill.
  std::unique_ptr<T[]> dh_base(new T[static_cast<size_t>(J) * ld]);
  T* d_m = out(B_D_M);
  const T* d_dir = in(B_D_DIRECTION);

  // Pass 1 (AdamCell and WeightCell backward): dZ = dL/d(decay logits), dR = dL/d(rho logits).
  const int red_h = (J + 1) * 3 * J;  // [h_t; 1]^T [dZ, dR]
  const int red_m = J * 2 * J;        // m_{t-1}^T dZ
  std::vector<Vec<T>> acc1(static_cast<size_t>(d.threads) * (red_h + red_m), splat<T>(0));
  std::vector<T> ones(kBlock, T(1));
#pragma omp parallel num_threads(d.threads)
  {
    const FlushSubnormals flush;
    const int tid = omp_get_thread_num();
    Vec<T>* acc_h = acc1.data() + static_cast<size_t>(tid) * (red_h + red_m);
    Vec<T>* acc_m = acc_h + red_h;
    std::vector<T> buf(static_cast<size_t>(kBlock) * 3 * J);
    std::vector<T*> dzr(3 * J);
    planes_at(buf.data(), kBlock, 3 * J, 0, dzr.data());
    std::vector<T*> m_prev(J), h_new(J), m_new(J), v_new(J),
        b_new(J), gam_new(J), decays(2 * J), rho(J), dm_in(J), dv_in(J), db_in(J), dgam_in(J),
        dh_in(J), dm_out(J), dv_out(J), db_out(J), dgam_out(J), dh(J);
    std::vector<const T*> lhs_h(J + 1);
    const T* zero = nullptr;
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < d.blocks(); ++blk) {
      const int64_t r0 = blk * kBlock;
      planes_at(cp(B_M), ld, J, r0, m_prev.data());
      planes_at(cp(B_H_OUT), ld, J, r0, h_new.data());
      planes_at(cp(B_M_OUT), ld, J, r0, m_new.data());
      planes_at(cp(B_V_OUT), ld, J, r0, v_new.data());
      planes_at(cp(B_B_OUT), ld, J, r0, b_new.data());
      planes_at(cp(B_GAMMA_OUT), ld, J, r0, gam_new.data());
      planes_at(cp(B_DECAYS), ld, 2 * J, r0, decays.data());
      planes_at(cp(B_RHO), ld, J, r0, rho.data());
      planes_at(dh_base.get(), ld, J, r0, dh.data());
      const bool has_dm = in(B_D_M_OUT), has_dv = in(B_D_V_OUT), has_db = in(B_D_B_OUT),
                 has_dgam = in(B_D_GAMMA_OUT), has_dh = in(B_D_H_OUT);
      if (has_dm) planes_at(cp(B_D_M_OUT), ld, J, r0, dm_in.data());
      if (has_dv) planes_at(cp(B_D_V_OUT), ld, J, r0, dv_in.data());
      if (has_db) planes_at(cp(B_D_B_OUT), ld, J, r0, db_in.data());
      if (has_dgam) planes_at(cp(B_D_GAMMA_OUT), ld, J, r0, dgam_in.data());
      if (has_dh) planes_at(cp(B_D_H_OUT), ld, J, r0, dh_in.data());
      if (d_m) planes_at(d_m, ld, J, r0, dm_out.data());
      if (out(B_D_V)) planes_at(out(B_D_V), ld, J, r0, dv_out.data());
      if (out(B_D_B)) planes_at(out(B_D_B), ld, J, r0, db_out.data());
      if (out(B_D_GAMMA)) planes_at(out(B_D_GAMMA), ld, J, r0, dgam_out.data());
      const T* grad = in(B_GRAD) + r0;
      for (int j = 0; j < J; ++j) {
        for (int r = 0; r < kBlock; r += L) {
          const Vec<T> g = load(grad + r);
          const Vec<T> dd = d_dir ? load(d_dir + r0 + r) : splat<T>(0);
          const Vec<T> beta = load(decays[j] + r), gamma = load(decays[J + j] + r);
          const Vec<T> rh = load(rho[j] + r);
          const Vec<T> b_inv = recip<T>(load(b_new[j] + r) + d.moment_eps);
          const Vec<T> gam_inv = recip<T>(load(gam_new[j] + r) + d.moment_eps);
          const Vec<T> m_tilde = load(m_new[j] + r) * b_inv;
          const Vec<T> v_tilde = load(v_new[j] + r) * gam_inv;
          const Vec<T> q = rsqrt<T>(v_tilde + d.moment_eps);
          const Vec<T> d_mhat = dd * rh;
          const Vec<T> d_rho = dd * (m_tilde * q);
          const Vec<T> d_rpre = rh > T(0) ? d_rho : d_rho * (rh + T(1));  // ELU'
          const Vec<T> d_mtilde = d_mhat * q;
          const Vec<T> d_vtilde = (d_mhat * m_tilde) * T(-0.5) * (q * q * q);  // rsqrt'
          Vec<T> dm = d_mtilde * b_inv;  // d(x / y) = dx / y - dy x / y^2
          Vec<T> db = -(d_mtilde * (m_tilde * b_inv));
          Vec<T> dv = d_vtilde * gam_inv;
          Vec<T> dgam = -(d_vtilde * (v_tilde * gam_inv));
          if (has_dm) dm += load(dm_in[j] + r);
          if (has_db) db += load(db_in[j] + r);
          if (has_dv) dv += load(dv_in[j] + r);
          if (has_dgam) dgam += load(dgam_in[j] + r);
          // dL/dbeta = dM (m_{t-1} - g) + dB (b_{t-1} - 1), times sigmoid' = beta (1 - beta).
          // For gamma (and B) use V_t - g^2 = gamma (v_{t-1} - g^2), which spares reading
          // three planes of the previous state.
          const Vec<T> d_beta = dm * (load(m_prev[j] + r) - g) * beta;
          const Vec<T> d_beta_b = db * (load(b_new[j] + r) - T(1));
          const Vec<T> d_gamma = dv * (load(v_new[j] + r) - g * g) +
                                 dgam * (load(gam_new[j] + r) - T(1));
          store(dzr[j] + r, (d_beta + d_beta_b) * (T(1) - beta));
          store(dzr[J + j] + r, d_gamma * (T(1) - gamma));
          store(dzr[2 * J + j] + r, d_rpre);
          if (d_m) store(dm_out[j] + r, dm * beta);
          if (out(B_D_V)) store_nt(dv_out[j] + r, dv * gamma);
          if (out(B_D_B)) store_nt(db_out[j] + r, db * beta);
          if (out(B_D_GAMMA)) store_nt(dgam_out[j] + r, dgam * gamma);
        }
      }
      const int valid = d.valid(blk);
      for (int j = 0; j < J; ++j) lhs_h[j] = h_new[j];
      lhs_h[J] = ones.data();
      reduce_planes<T>(J + 1, 3 * J, lhs_h.data(), dzr.data(), valid, acc_h);
      reduce_planes<T>(J, 2 * J, const_cast<const T* const*>(m_prev.data()), dzr.data(), valid,
                       acc_m);
      mm_planes<T>(J, 3 * J, const_cast<const T* const*>(dzr.data()), to_h.data(), J, zero,
                   has_dh ? const_cast<const T* const*>(dh_in.data()) : nullptr, dh.data());
      if (d_m)
        mm_planes<T>(J, 2 * J, const_cast<const T* const*>(dzr.data()), to_m.data(), J, zero,
                     const_cast<const T* const*>(dm_out.data()), dm_out.data());
    }
    stream_fence();  // before the barrier that ends the parallel region
  }

  // Serial: theta gradients of the AdamCell/WeightCell and the column-norm coupling
  // d/dX of X diag(rsqrt(colsum X^2 + eps)) contributes -n^3 (sum_k dW'_ik W_ik) X_i.
  std::vector<T> sums(static_cast<size_t>(red_h + red_m));
  finish_sums<T>(acc1, d.threads, red_h + red_m, sums.data());
  const T* s_h = sums.data();           // [(J+1), 3J]
  const T* s_m = sums.data() + red_h;   // [J, 2J]
  std::vector<T> coef(2 * J);
  T* g_decay = out(B_D_DECAY_KERNEL);
  for (int i = 0; i < 2 * J; ++i) {
    T dn = 0;
    for (int k = 0; k < 2 * J; ++k) {
      const T raw = i < J ? s_h[i * 3 * J + k] : s_m[(i - J) * 2 * J + k];
      g_decay[i * 2 * J + k] = norms[i] * raw;
      dn += raw * decay_kernel[i * 2 * J + k];
    }
    coef[i] = -(norms[i] * norms[i] * norms[i]) * dn;
  }
  for (int k = 0; k < 2 * J; ++k) out(B_D_DECAY_BIAS)[k] = s_h[J * 3 * J + k];
  for (int i = 0; i < J; ++i)
    for (int k = 0; k < J; ++k) out(B_D_WEIGHT_KERNEL)[i * J + k] = s_h[i * 3 * J + 2 * J + k];
  for (int k = 0; k < J; ++k) out(B_D_WEIGHT_BIAS)[k] = s_h[J * 3 * J + 2 * J + k];

  // Pass 2 (StateCell backward): dG = dL/d(gates), then the LSTM/preprocessing theta gradients.
  const int red_w = (2 * J + 1) * 4 * J;  // [e, h_{t-1}, 1]^T dG
  const int red_p = 2 * J;                // [g_hat, 1]^T dpe
  std::vector<Vec<T>> acc2(static_cast<size_t>(d.threads) * (red_w + red_p), splat<T>(0));
  const T* d_c_in = in(B_D_C_OUT);
  T* d_c = out(B_D_C);
  T* d_h = out(B_D_H);
#pragma omp parallel num_threads(d.threads)
  {
    const FlushSubnormals flush;
    const int tid = omp_get_thread_num();
    Vec<T>* acc_w = acc2.data() + static_cast<size_t>(tid) * (red_w + red_p);
    Vec<T>* acc_p = acc_w + red_w;
    std::vector<T> buf(static_cast<size_t>(kBlock) * (1 + 6 * J));
    T* g_hat = buf.data();
    std::vector<T*> e(J), dg(4 * J), de(J);
    planes_at(g_hat + kBlock, kBlock, J, 0, e.data());
    planes_at(g_hat + kBlock * (1 + J), kBlock, 4 * J, 0, dg.data());
    planes_at(g_hat + kBlock * (1 + 5 * J), kBlock, J, 0, de.data());
    std::vector<T*> h_prev(J), c_prev(J), m_prev(J), h_new(J), c_new(J), act(4 * J), dh(J),
        dc_in(J), dc_out(J), dm_out(J), dh_out(J);
    std::vector<const T*> lhs_w(2 * J + 1), lhs_p(2);
    const T* zero = nullptr;
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < d.blocks(); ++blk) {
      const int64_t r0 = blk * kBlock;
      const int valid = d.valid(blk);
      planes_at(cp(B_H), ld, J, r0, h_prev.data());
      planes_at(cp(B_C), ld, J, r0, c_prev.data());
      planes_at(cp(B_M), ld, J, r0, m_prev.data());
      planes_at(cp(B_H_OUT), ld, J, r0, h_new.data());
      planes_at(cp(B_C_OUT), ld, J, r0, c_new.data());
      planes_at(cp(B_GATES), ld, 4 * J, r0, act.data());
      planes_at(dh_base.get(), ld, J, r0, dh.data());
      if (d_c_in) planes_at(const_cast<T*>(d_c_in), ld, J, r0, dc_in.data());
      if (d_c) planes_at(d_c, ld, J, r0, dc_out.data());
      if (d_m) planes_at(d_m, ld, J, r0, dm_out.data());
      if (d_h) planes_at(d_h, ld, J, r0, dh_out.data());
      preprocess(d, in(B_GRAD) + r0, d.grad_inv_norm, in(B_PRE_KERNEL), in(B_PRE_BIAS), g_hat,
                 e.data());
      for (int j = 0; j < J; ++j) {
        for (int r = 0; r < kBlock; r += L) {
          const Vec<T> h = load(dh[j] + r) + coef[j] * load(h_new[j] + r);
          const Vec<T> tc = vtanh<T>(load(c_new[j] + r));
          const Vec<T> si = load(act[j] + r), tu = load(act[J + j] + r);
          const Vec<T> sf = load(act[2 * J + j] + r), so = load(act[3 * J + j] + r);
          Vec<T> dc = (h * so) * (T(1) - tc * tc);
          if (d_c_in) dc += load(dc_in[j] + r);
          const Vec<T> d_so = h * tc;
          store(dg[j] + r, (dc * tu) * si * (T(1) - si));
          store(dg[J + j] + r, (dc * si) * (T(1) - tu * tu));
          store(dg[2 * J + j] + r, (dc * load(c_prev[j] + r)) * sf * (T(1) - sf));
          store(dg[3 * J + j] + r, d_so * so * (T(1) - so));
          if (d_c) store_nt(dc_out[j] + r, dc * sf);
          if (d_m) store(dm_out[j] + r, load(dm_out[j] + r) + coef[J + j] * load(m_prev[j] + r));
        }
      }
      for (int j = 0; j < J; ++j) lhs_w[j] = e[j], lhs_w[J + j] = h_prev[j];
      lhs_w[2 * J] = ones.data();
      reduce_planes<T>(2 * J + 1, 4 * J, lhs_w.data(), dg.data(), valid, acc_w);
      const T* const* dg_c = const_cast<const T* const*>(dg.data());
      mm_planes<T>(J, 4 * J, dg_c, lstm_t.data(), 2 * J, zero, nullptr, de.data());
      if (d_h) mm_planes<T>(J, 4 * J, dg_c, lstm_t.data() + J, 2 * J, zero, nullptr, dh_out.data());
      for (int j = 0; j < J; ++j)
        for (int r = 0; r < kBlock; r += L) {
          const Vec<T> ev = load(e[j] + r);
          store(de[j] + r, ev > T(0) ? load(de[j] + r) : load(de[j] + r) * (ev + T(1)));  // ELU'
        }
      lhs_p[0] = g_hat;
      lhs_p[1] = ones.data();
      reduce_planes<T>(2, J, lhs_p.data(), de.data(), valid, acc_p);
    }
    stream_fence();  // before the barrier that ends the parallel region
  }
  std::vector<T> sums2(static_cast<size_t>(red_w + red_p));
  finish_sums<T>(acc2, d.threads, red_w + red_p, sums2.data());
  std::memcpy(out(B_D_LSTM_KERNEL), sums2.data(), sizeof(T) * 8 * J * J);
  std::memcpy(out(B_D_LSTM_BIAS), sums2.data() + 8 * J * J, sizeof(T) * 4 * J);
  std::memcpy(out(B_D_PRE_KERNEL), sums2.data() + red_w, sizeof(T) * J);
  std::memcpy(out(B_D_PRE_BIAS), sums2.data() + red_w + J, sizeof(T) * J);
}

template <typename T>
Dims<T> dims(int64_t ld, int64_t p, int J, int threads, const double* scalars) {
  return Dims<T>{ld, p, J, threads, static_cast<T>(scalars[0]), static_cast<T>(scalars[1]),
                 static_cast<T>(scalars[2]), static_cast<T>(scalars[3])};
}

}  // namespace

// scalars = {grad_inv_norm, NORM_EPS, MOMENT_EPS, FORGET_BIAS}; slots as in ForwardSlot and
// BackwardSlot. The caller guarantees shapes, dtypes, contiguity and ld % kBlock == 0.
extern "C" {

int hyperadam_block_rows() { return kBlock; }
int hyperadam_forward_slots() { return F_NUM_SLOTS; }
int hyperadam_backward_slots() { return B_NUM_SLOTS; }

void hyperadam_forward_f32(int64_t ld, int64_t p, int J, int threads, const double* scalars,
                           void* const* slots) {
  forward<float>(dims<float>(ld, p, J, threads, scalars), slots);
}
void hyperadam_forward_f64(int64_t ld, int64_t p, int J, int threads, const double* scalars,
                           void* const* slots) {
  forward<double>(dims<double>(ld, p, J, threads, scalars), slots);
}
void hyperadam_backward_f32(int64_t ld, int64_t p, int J, int threads, const double* scalars,
                            void* const* slots) {
  backward<float>(dims<float>(ld, p, J, threads, scalars), slots);
}
void hyperadam_backward_f64(int64_t ld, int64_t p, int J, int threads, const double* scalars,
                            void* const* slots) {
  backward<double>(dims<double>(ld, p, J, threads, scalars), slots);
}

}  // extern "C"
