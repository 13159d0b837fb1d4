// The fused CPU kernel of the tiled backend: Euclidean FNA with float alpha and bandwidth, forward
// and backward, in (query block x key block) tiles that stay in cache through the distance matmul,
// the kernel and the second matmul, as FlashAttention does (PyTorch's own CPU kernel for
// scaled_dot_product_attention works the same way).
//
// Conventions (see levyattn/backends/fused_cpu.py, which builds and calls this file):
// q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv), float32 or float64, read in place where each
// row (last dimension) is contiguous, at any strides between rows and heads (the views of a packed
// projection), else copied first. The output is (B, H, Nq, Dv) laid out as (B, Nq, H, Dv), as
// PyTorch's CPU attention returns it, so that merging the heads costs no copy; the gradients are
// contiguous. Distances are taken between q and k shifted by one point s per (batch, head), `shift`
// (B, H, D): unless the caller gives one, the centre of the keys in use (all, or those the mask
// keeps for some query; center_keys: the mean of the half nearest to their mean, which one far key
// cannot drag). The shift changes no distance but keeps |q - s|^2 + |k - s|^2 - 2 (q - s).(k - s)
// from cancelling; the shifted rows are made tile by tile, in cache, not as copies of q and k. A
// single query row of the power law (decoding) takes its distances |q - k_j|^2 directly instead,
// with no shift.
// log Phi_ij = -exponent * log1p(c * sqrt(sq_ij)) + mask_ij (power law, alpha < 2), sq_ij the
// squared distance clamped below at the smallest normal number; or -c * sq_ij + mask_ij (Gaussian,
// alpha = 2) with sq_ij = |k_j - s|^2 - 2 (q_i - s) . (k_j - s), the squared distance less the
// row's constant |q_i - s|^2, which the row's normalisation removes.
// mask: bool (True keeps) or additive (0 keeps, -inf removes), of shape (B or 1, H or 1, Nq or 1,
// Nk), or undefined; the kernel reads it as an additive mask of q's dtype broadcast to
// (B, H, Nq, Nk). Causal and self-pair masks are bottom-right aligned: query i sits at key
// i + Nk - Nq.
// Forward returns the output, the row log-sum-exp (B, H, Nq) (-inf for a fully masked row, whose
// output is 0) and the shift it used; backward takes the shift back, recomputes each tile from the
// log-sum-exp, and on request also returns the gradient of the mask, dS = P (dO v^T - D), as a
// contiguous (B, H, Nq, Nk) tensor.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

// The BLAS that PyTorch's CPU library links (MKL in the x86 wheels) exports the Fortran API.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace {

// Row-major C (M x N) = op(A) op(B) + beta C, op(X) = X^T when trans_x. Column-major BLAS sees
// the row-major C as C^T = op(B)^T op(A)^T, so the operands swap and the flags stay.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int m = N, n = M, k = K, la = lda, lb = ldb, lc = ldc;
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tb, &ta, &m, &n, &k, &one, B, &lb, A, &la, &beta, C, &lc);
  } else {
    dgemm_(&tb, &ta, &m, &n, &k, &one, B, &lb, A, &la, &beta, C, &lc);
  }
}

// log at Sleef's 3.5-ulp accuracy for float vectors (a third faster than the 1-ulp one that
// Vectorized::log calls); other types and widths as Vectorized::log.
template <typename T>
at::vec::Vectorized<T> log_u35(const at::vec::Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return at::vec::Vectorized<float>(Sleef_logf16_u35(x));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return at::vec::Vectorized<float>(Sleef_logf8_u35(x));
#endif
  return x.log();
}

// sqrt(x) for x >= the smallest normal number. Float vectors: x * rsqrt(x) from the 14-bit
// (AVX-512) or 12-bit (AVX2) estimate and one Newton step, about 1 ulp, for a fraction of the
// throughput cost of the exact square root; other types and widths: Vectorized::sqrt.
template <typename T>
at::vec::Vectorized<T> sqrt_normal(const at::vec::Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    using Vec = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
    const Vec y(_mm512_rsqrt14_ps(x));
#else
    const Vec y(_mm256_rsqrt_ps(x));
#endif
    const Vec xy = x * y;  // y' = y (3 - x y^2) / 2, and sqrt(x) = x y'
    return xy * (Vec(1.5f) - Vec(0.5f) * xy * y);
  }
#endif
  return x.sqrt();
}

// A (B, H, N, E) operand read or written row by row: rows (the last dimension) contiguous, any
// strides between them. E is the element type, const for an input.
template <typename E>
struct Rows {
  E* data;
  int64_t heads, stride_b, stride_h, stride_row;

  Rows(E* data_, const at::Tensor& x)
      : data(data_), heads(x.size(1)), stride_b(x.stride(0)), stride_h(x.stride(1)),
        stride_row(x.size(2) == 1 ? x.size(3) : x.stride(2)) {}  // a lone row's stride is free: BLAS wants >= E

  E* row(int64_t bh, int64_t i) const {
    return data + (bh / heads) * stride_b + (bh % heads) * stride_h + i * stride_row;
  }
};

template <typename T>
Rows<const T> rows_of(const at::Tensor& x) {
  return Rows<const T>(x.const_data_ptr<T>(), x);
}

// A row of n entries as vectors: `count` of them, the last holding `last` entries (a masked load
// and store where n is not a multiple of the width). `fits`: one vector or more, at most 8, few
// enough to keep in registers.
template <typename T>
struct VectorRow {
  using Vec = at::vec::Vectorized<T>;
  int64_t count, last;

  explicit VectorRow(int64_t n) : count((n + Vec::size() - 1) / Vec::size()), last(n - (count - 1) * Vec::size()) {}

  bool fits() const { return count > 0 && count <= 8; }
  int64_t lanes(int64_t e) const { return e + 1 < count ? Vec::size() : last; }
  Vec load(const T* row, int64_t e) const { return Vec::loadu(row + e * Vec::size(), lanes(e)); }
  void store(const Vec& x, T* row, int64_t e) const { x.store(row + e * Vec::size(), lanes(e)); }
};

// Running maxima of |x| over runs of contiguous entries, four vectors wide so that the loop is
// not bound by the latency of one maximum (the vector maximum propagates NaN; the scalar one is
// written to).
template <typename T>
struct PeakScan {
  using Vec = at::vec::Vectorized<T>;
  Vec m0, m1, m2, m3;
  T scalar;

  explicit PeakScan(T init) : m0(init), m1(init), m2(init), m3(init), scalar(init) {}

  static T nan_max(T a, T b) { return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b); }

  void add(const T* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 * Vec::size() <= n; i += 4 * Vec::size()) {
      m0 = at::vec::maximum(m0, Vec::loadu(x + i).abs());
      m1 = at::vec::maximum(m1, Vec::loadu(x + i + Vec::size()).abs());
      m2 = at::vec::maximum(m2, Vec::loadu(x + i + 2 * Vec::size()).abs());
      m3 = at::vec::maximum(m3, Vec::loadu(x + i + 3 * Vec::size()).abs());
    }
    for (; i + Vec::size() <= n; i += Vec::size()) m0 = at::vec::maximum(m0, Vec::loadu(x + i).abs());
    for (; i < n; ++i) scalar = nan_max(scalar, std::abs(x[i]));
  }

  T result() const {
    const auto vec_max = [](Vec& a, Vec& b) { return at::vec::maximum(a, b); };
    const Vec all = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
    return nan_max(at::vec::vec_reduce_all<T>(vec_max, all), scalar);
  }
};

template <typename T>
struct Problem {
  int64_t B, H, Nq, Nk, D, Dv;
  Rows<const T> q, k, v;
  const T* shift;  // (B*H, D); nullptr: one query row, its distances taken directly
  const T* mask;  // nullptr: no mask
  int64_t mask_stride_b, mask_stride_h, mask_stride_q;
  T exponent, c, inv_c;  // inv_c = 1 / c
  bool gaussian, causal, exclude_self;
  int64_t query_block, key_block;  // tile size: query rows x keys

  Problem(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& shift_,
          const std::optional<at::Tensor>& mask_, double exponent_, double c_, bool gaussian_, bool causal_,
          bool exclude_self_, int64_t query_block_, int64_t key_block_)
      : B(q_.size(0)), H(q_.size(1)), Nq(q_.size(2)), Nk(k_.size(2)), D(q_.size(3)), Dv(v_.size(3)),
        q(rows_of<T>(q_)), k(rows_of<T>(k_)), v(rows_of<T>(v_)),
        shift(shift_.numel() ? shift_.const_data_ptr<T>() : nullptr), mask(nullptr),
        mask_stride_b(0), mask_stride_h(0), mask_stride_q(0), exponent(exponent_), c(c_), inv_c(T(1) / T(c_)),
        gaussian(gaussian_), causal(causal_), exclude_self(exclude_self_),
        // No tile larger than the problem: a short sequence's buffers stay small.
        query_block(std::min(query_block_, std::max<int64_t>(Nq, 1))),
        key_block(std::min(key_block_, std::max<int64_t>(Nk, 1))) {
    TORCH_CHECK(query_block_ > 0 && key_block_ > 0, "fna_cpu: block sizes must be positive");
    if (mask_.has_value() && mask_->defined()) {
      mask = mask_->const_data_ptr<T>();
      mask_stride_b = mask_->stride(0);
      mask_stride_h = mask_->stride(1);
      mask_stride_q = mask_->stride(2);
    }
  }

  // Rows i0 .. i0 + count of q or k (x) of (batch, head) bh, shifted, into out (count x D), and
  // their squared norms |x_i - s|^2 into out_sq (count), taken while the rows are in registers. A
  // row of whole vectors (up to 8) keeps the shift in registers: a short row costs a few instructions.
  void shifted(const Rows<const T>& x, int64_t bh, int64_t i0, int64_t count, T* out, T* out_sq) const {
    const T* s = shift + bh * D;
    const T* rows = x.row(bh, i0);
    const VectorRow<T> span(D);
    if (!span.fits()) {
      for (int64_t r = 0; r < count; ++r) {
        T* row = out + r * D;
        at::vec::map2([](Vec a, Vec b) { return a - b; }, row, rows + r * x.stride_row, s, D);
        out_sq[r] = at::vec::map_reduce_all<T>([](auto a) { return a * a; }, [](auto a, auto b) { return a + b; },
                                               row, D);
      }
      return;
    }
    Vec s_v[8];
    for (int64_t e = 0; e < span.count; ++e) s_v[e] = span.load(s, e);
    for (int64_t r = 0; r < count; ++r) {
      const T* row = rows + r * x.stride_row;
      Vec norm(0);  // the lanes past D load as 0, minus a shift of 0
      for (int64_t e = 0; e < span.count; ++e) {
        const Vec centred = span.load(row, e) - s_v[e];
        span.store(centred, out + r * D, e);
        norm = at::vec::fmadd(centred, centred, norm);
      }
      out_sq[r] = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, norm);
    }
  }

  // |q - k_j|^2 of query row q_row against the keys j0 .. j0 + n of (batch, head) bh, into out (n):
  // one query's distances taken directly, which costs less than shifting the keys for it and
  // has nothing to cancel. The keys' largest entries go into `peak` as they are read.
  void squared_distances(const T* q_row, int64_t bh, int64_t j0, int64_t n, T* out, PeakScan<T>& peak) const {
    const T* keys = k.row(bh, j0);
    const VectorRow<T> span(D);
    if (!span.fits()) {
      for (int64_t j = 0; j < n; ++j) {
        out[j] = at::vec::map2_reduce_all<T>([](auto a, auto b) { return (a - b) * (a - b); },
                                             [](auto a, auto b) { return a + b; }, keys + j * k.stride_row, q_row, D);
        peak.add(keys + j * k.stride_row, D);
      }
      return;
    }
    Vec q_v[8];
    for (int64_t e = 0; e < span.count; ++e) q_v[e] = span.load(q_row, e);
    for (int64_t j = 0; j < n; ++j) {
      const T* key = keys + j * k.stride_row;
      Vec sum(0);  // the lanes past D load as 0 on both sides
      for (int64_t e = 0; e < span.count; ++e) {
        const Vec entries = span.load(key, e);
        peak.m0 = at::vec::maximum(peak.m0, entries.abs());
        const Vec diff = entries - q_v[e];
        sum = at::vec::fmadd(diff, diff, sum);
      }
      out[j] = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, sum);
    }
  }

  // acc (Dv) += sum_j w_j v_j over the values j0 .. j0 + n of (batch, head) bh, one query row's
  // product with v, reading each value once; their largest entries go into `peak`.
  void weighted_values(const T* w, int64_t bh, int64_t j0, int64_t n, T* acc, PeakScan<T>& peak) const {
    const T* values = v.row(bh, j0);
    const VectorRow<T> span(Dv);
    if (!span.fits()) {
      for (int64_t j = 0; j < n; ++j) {
        const Vec weight(w[j]);
        const T* value = values + j * v.stride_row;
        at::vec::map2([weight](Vec a, Vec x) { return at::vec::fmadd(x, weight, a); }, acc, acc, value, Dv);
        peak.add(value, Dv);
      }
      return;
    }
    Vec sums[8];
    for (int64_t e = 0; e < span.count; ++e) sums[e] = span.load(acc, e);
    for (int64_t j = 0; j < n; ++j) {
      const Vec weight(w[j]);
      const T* value = values + j * v.stride_row;
      for (int64_t e = 0; e < span.count; ++e) {
        const Vec entries = span.load(value, e);
        peak.m0 = at::vec::maximum(peak.m0, entries.abs());
        sums[e] = at::vec::fmadd(entries, weight, sums[e]);
      }
    }
    for (int64_t e = 0; e < span.count; ++e) span.store(sums[e], acc, e);
  }

  // Keys 0 .. key_stop that rows up to `last_row` may see (all, or up to the causal limit).
  int64_t key_stop(int64_t last_row) const {
    if (!causal) return Nk;
    return std::clamp<int64_t>(last_row + Nk - Nq + 1, 0, Nk);
  }

  using Vec = at::vec::Vectorized<T>;

  // log Phi of squared distances (without masks) and, when `slope` is given, d log Phi / d sq,
  // which is 0 at zero distance for the power law (sqrt has an infinite slope there).
  Vec log_phi(const Vec& sq, Vec* slope = nullptr) const {
    if (gaussian) {  // sq without the row's |q_i - s|^2 (any sign): see logits_row
      if (slope != nullptr) *slope = Vec(-c);
      return sq * Vec(-c);
    }
    const Vec tiny(std::numeric_limits<T>::min()), one(1);
    const Vec r = sqrt_normal(at::vec::maximum(sq, tiny)), cr = r * Vec(c), u = cr + one;
    if (slope != nullptr) {
      // -(exponent / 2) c / (r (1 + c r)) = -(exponent / 2) / (r (r + 1 / c)), which has no c^2
      // to overflow for a small bandwidth.
      *slope = Vec::blendv(Vec(0), Vec(T(-0.5) * exponent) / (r * (r + Vec(inv_c))), sq >= tiny);
    }
    // log1p(cr) at the cost of a log (log1p is 2-3x dearer): log(u) misses the rounding of
    // u = 1 + cr, e = cr - (u - 1), and log1p(cr) = log(u) + e / u + O(e^2). The correction
    // matters only where u < 2, where u - 1 is exact and e / u is e to within half of e.
    const Vec rounding = Vec::blendv(Vec(0), cr - (u - one), u < Vec(2));
    return (log_u35(u) + rounding) * Vec(-exponent);
  }

  const T* mask_row(int64_t bh, int64_t i) const {
    if (mask == nullptr) return nullptr;
    return mask + (bh / H) * mask_stride_b + (bh % H) * mask_stride_h + i * mask_stride_q;
  }

  // In place over one tile row of n keys starting at key j0: the matmul's q_i . k_j become
  // log Phi_ij with every mask applied, from |q_i - s|^2 (q_sq) and the keys' |k_j - s|^2 (ks, n);
  // with ks null, s holds the squared distances themselves. Returns the row max (-inf when all
  // are masked).
  T logits_row(T* s, int64_t n, T q_sq, const T* ks, int64_t bh, int64_t i, int64_t j0) const {
    // The Gaussian leaves the row's constant |q_i - s|^2 out (the normalisation removes it): for a
    // query far from every key it would dwarf, and round away, the differences between the keys.
    const Vec q_sq_i(gaussian ? T(0) : q_sq), two(2);
    const T* m = mask_row(bh, i);
    if (m != nullptr) m += j0;
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), n - j);
      const Vec scores = Vec::loadu(s + j, count);
      Vec logit = log_phi(ks == nullptr ? scores : q_sq_i + Vec::loadu(ks + j, count) - scores * two);
      if (m != nullptr) logit = logit + Vec::loadu(m + j, count);
      logit.store(s + j, count);
    }
    mask_structural(s, n, i, j0, -std::numeric_limits<T>::infinity());
    return at::vec::reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, n);
  }

  // Sets the causal / self-pair masked entries of a tile row (keys j0 .. j0 + n) to `value`.
  void mask_structural(T* s, int64_t n, int64_t i, int64_t j0, T value) const {
    const int64_t self = i + Nk - Nq;
    if (causal) {
      for (int64_t j = std::max<int64_t>(0, self + 1 - j0); j < n; ++j) s[j] = value;
    }
    if (exclude_self && self >= j0 && self < j0 + n) s[self - j0] = value;
  }
};

// In place s_j = exp(s_j - peak) over n entries; returns their sum (one pass over the tile row).
template <typename T>
T exp_sum(T* s, int64_t n, T peak) {
  using Vec = at::vec::Vectorized<T>;
  const Vec peak_v(peak);
  Vec total(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(s + j) - peak_v).exp_u20();
    e.store(s + j);
    total = total + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, total);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - peak);
    sum += s[j];
  }
  return sum;
}

// peaks ((2, B*H): per (batch, head) the largest magnitude in q and k, then in v; NaN where an entry
// is NaN), written when given, needs one query row (no shift), whose keys and values the kernel
// reads in full.
template <typename T>
void forward_kernel(const Problem<T>& p, const Rows<T>& out, T* lse, T* peaks = nullptr) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t bq = p.query_block, blocks = (p.Nq + bq - 1) / bq;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, p.B * p.H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(bq * p.key_block), acc(bq * p.Dv), row_max(bq), row_sum(bq), q_tile(bq * p.D), q_sq(bq),
        k_tile(p.key_block * p.D), k_sq(p.key_block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, i0 = (task % blocks) * bq, rows = std::min(bq, p.Nq - i0);
      const bool direct = p.shift == nullptr;  // one query row
      if (!direct) p.shifted(p.q, bh, i0, rows, q_tile.data(), q_sq.data());
      PeakScan<T> qk_peak(T(0)), v_peak(T(0));  // direct: q, k and v as they are read
      if (direct) qk_peak.add(p.q.row(bh, i0), p.D);
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      const int64_t stop = p.key_stop(i0 + rows - 1);
      for (int64_t j0 = 0; j0 < stop; j0 += p.key_block) {
        const int64_t cols = std::min(p.key_block, stop - j0);
        if (direct) {
          p.squared_distances(p.q.row(bh, i0), bh, j0, cols, scores.data(), qk_peak);
        } else {
          p.shifted(p.k, bh, j0, cols, k_tile.data(), k_sq.data());
          gemm(false, true, rows, cols, p.D, q_tile.data(), p.D, k_tile.data(), p.D, T(0), scores.data(), cols);
        }
        for (int64_t r = 0; r < rows; ++r) {
          T* s = scores.data() + r * cols;
          const T row_peak =
              p.logits_row(s, cols, direct ? T(0) : q_sq[r], direct ? nullptr : k_sq.data(), bh, i0 + r, j0);
          const T peak = std::max(row_max[r], row_peak);
          if (peak == neg_inf) {  // nothing seen yet in this row
            std::fill(s, s + cols, T(0));
            continue;
          }
          const T rescale = std::exp(row_max[r] - peak);  // 0 for the first finite block
          row_sum[r] = row_sum[r] * rescale + exp_sum(s, cols, peak);
          row_max[r] = peak;
          if (rescale != T(1)) {
            T* a = acc.data() + r * p.Dv;
            at::vec::map([rescale](Vec x) { return x * Vec(rescale); }, a, a, p.Dv);
          }
        }
        if (direct) {
          p.weighted_values(scores.data(), bh, j0, cols, acc.data(), v_peak);
        } else {
          gemm(false, false, rows, p.Dv, cols, scores.data(), cols, p.v.row(bh, j0), p.v.stride_row, T(1),
               acc.data(), p.Dv);
        }
      }
      if (peaks != nullptr) {
        peaks[bh] = qk_peak.result();
        peaks[p.B * p.H + bh] = v_peak.result();
      }
      for (int64_t r = 0; r < rows; ++r) {
        const T total = row_sum[r];
        const T inv = total > T(0) ? T(1) / total : T(0);
        at::vec::map([inv](Vec x) { return x * Vec(inv); }, out.row(bh, i0 + r), acc.data() + r * p.Dv, p.Dv);
        lse[bh * p.Nq + i0 + r] = total > T(0) ? row_max[r] + std::log(total) : neg_inf;
      }
    }
  });
}

// grad_k, grad_v and grad_mask (nullptr: not wanted) must come zeroed; delta_i = sum_j dO_ij O_ij.
template <typename T>
void backward_kernel(const Problem<T>& p, const Rows<const T>& grad_out, const T* lse, const T* delta, T* grad_q,
                     T* grad_k, T* grad_v, T* grad_mask) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t bq = p.query_block;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> weights(bq * p.key_block), grads(bq * p.key_block), g_q(bq * p.D), g_row(bq), g_col(p.Nk);
    // Of one (batch, head): the shifted rows and their squared norms.
    std::vector<T> q_shifted(p.Nq * p.D), k_shifted(p.Nk * p.D), q_sq(p.Nq), k_sq(p.Nk);
    for (int64_t bh = begin; bh < end; ++bh) {
      p.shifted(p.q, bh, 0, p.Nq, q_shifted.data(), q_sq.data());
      p.shifted(p.k, bh, 0, p.Nk, k_shifted.data(), k_sq.data());
      const T* k = k_shifted.data();
      const T* v = p.v.row(bh, 0);
      const int64_t ld_v = p.v.stride_row, ld_out = grad_out.stride_row;
      T* dk = grad_k + bh * p.Nk * p.D;
      T* dv = grad_v + bh * p.Nk * p.Dv;
      std::fill(g_col.begin(), g_col.end(), T(0));
      for (int64_t i0 = 0; i0 < p.Nq; i0 += bq) {
        const int64_t rows = std::min(bq, p.Nq - i0), row0 = bh * p.Nq + i0;
        const T* q = q_shifted.data() + i0 * p.D;
        const T* d_out = grad_out.row(bh, i0);
        std::fill(g_q.begin(), g_q.end(), T(0));
        std::fill(g_row.begin(), g_row.end(), T(0));
        const int64_t stop = p.key_stop(i0 + rows - 1);
        for (int64_t j0 = 0; j0 < stop; j0 += p.key_block) {
          const int64_t cols = std::min(p.key_block, stop - j0);
          gemm(false, true, rows, cols, p.D, q, p.D, k + j0 * p.D, p.D, T(0), weights.data(), cols);
          gemm(false, true, rows, cols, p.Dv, d_out, ld_out, v + j0 * ld_v, ld_v, T(0), grads.data(), cols);
          for (int64_t r = 0; r < rows; ++r) {
            T* w = weights.data() + r * cols;  // q.k, then P
            T* g = grads.data() + r * cols;    // dO v^T, then dL/d sq
            const int64_t i = i0 + r;
            const T row_lse = lse[row0 + r];
            if (row_lse == neg_inf) {
              std::fill(w, w + cols, T(0));
              std::fill(g, g + cols, T(0));
              continue;
            }
            const Vec q_sq_i(p.gaussian ? T(0) : q_sq[i]), two(2), lse_v(row_lse), delta_v(delta[row0 + r]);
            const T* ks = k_sq.data() + j0;
            const T* m = p.mask_row(bh, i);
            if (m != nullptr) m += j0;
            T* dm = grad_mask == nullptr ? nullptr : grad_mask + (row0 + r) * p.Nk + j0;
            for (int64_t j = 0; j < cols; j += Vec::size()) {
              const int64_t count = std::min<int64_t>(Vec::size(), cols - j);
              Vec slope;
              Vec logit = p.log_phi(q_sq_i + Vec::loadu(ks + j, count) - Vec::loadu(w + j, count) * two, &slope);
              if (m != nullptr) logit = logit + Vec::loadu(m + j, count);
              const Vec prob = (logit - lse_v).exp_u20();
              const Vec grad_score = prob * (Vec::loadu(g + j, count) - delta_v);  // dS = dL / d logit
              if (dm != nullptr) grad_score.store(dm + j, count);
              prob.store(w + j, count);
              (grad_score * slope).store(g + j, count);
            }
            if (dm != nullptr) p.mask_structural(dm, cols, i, j0, T(0));
            p.mask_structural(w, cols, i, j0, T(0));
            p.mask_structural(g, cols, i, j0, T(0));
            g_row[r] += at::vec::reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, g, cols);
            at::vec::map2([](Vec a, Vec b) { return a + b; }, g_col.data() + j0, g_col.data() + j0, g, cols);
          }
          gemm(true, false, cols, p.Dv, rows, weights.data(), cols, d_out, ld_out, T(1), dv + j0 * p.Dv, p.Dv);
          gemm(false, false, rows, p.D, cols, grads.data(), cols, k + j0 * p.D, p.D, T(1), g_q.data(), p.D);
          gemm(true, false, cols, p.D, rows, grads.data(), cols, q, p.D, T(1), dk + j0 * p.D, p.D);
        }
        // dL/dq_i = 2 (q_i sum_j g_ij - sum_j g_ij k_j); the Gaussian's sq has no |q_i - s|^2, so
        // only the second sum.
        for (int64_t r = 0; r < rows; ++r) {
          const T total = p.gaussian ? T(0) : g_row[r];
          at::vec::map2([total](Vec x, Vec gk) { return (x * Vec(total) - gk) * Vec(2); }, grad_q + (row0 + r) * p.D,
                        q + r * p.D, g_q.data() + r * p.D, p.D);
        }
      }
      // dL/dk_j = 2 (k_j sum_i g_ij - sum_i g_ij q_i); dk holds the second sum so far.
      for (int64_t j = 0; j < p.Nk; ++j) {
        const T total = g_col[j];
        at::vec::map2([total](Vec x, Vec gq) { return (x * Vec(total) - gq) * Vec(2); }, dk + j * p.D, k + j * p.D,
                      dk + j * p.D, p.D);
      }
    }
  });
}

// The largest |x_i| of x, +inf when an entry is NaN or infinite: one read, in parallel blocks of
// about 64k entries. A contiguous x is one run; a 4-d x with contiguous rows (a view of a packed
// projection) is read row by row in place; any other layout goes to ATen's reduction.
double peak_magnitude(const at::Tensor& x) {
  if (x.numel() == 0) return 0.0;
  const bool rows = x.dim() == 4 && (x.stride(3) == 1 || x.size(3) == 1);
  if (!x.is_contiguous() && !rows) {
    const double peak = at::linalg_vector_norm(x, std::numeric_limits<double>::infinity()).item<double>();
    return peak <= std::numeric_limits<double>::max() ? peak : std::numeric_limits<double>::infinity();
  }
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fna_peaks", [&] {
    using T = scalar_t;
    constexpr int64_t grain = int64_t(1) << 16;  // entries
    T peak;
    if (x.is_contiguous()) {
      const T* data = x.const_data_ptr<T>();
      peak = at::parallel_reduce(
          int64_t(0), x.numel(), grain, T(0),
          [&](int64_t begin, int64_t end, T init) {
            PeakScan<T> scan(init);
            scan.add(data + begin, end - begin);
            return scan.result();
          },
          PeakScan<T>::nan_max);
    } else {  // rows: in parallel over (batch, head), each head's rows one after the other
      const Rows<const T> source = rows_of<T>(x);
      const int64_t per_head = x.size(2), length = x.size(3);
      // A head whose rows lie end to end (a slice of a key/value cache) is one run.
      const bool packed = source.stride_row == length;
      peak = at::parallel_reduce(
          int64_t(0), x.size(0) * x.size(1), std::max<int64_t>(1, grain / (per_head * length)), T(0),
          [&](int64_t begin, int64_t end, T init) {
            PeakScan<T> scan(init);
            for (int64_t bh = begin; bh < end; ++bh) {
              const T* head = source.row(bh, 0);
              if (packed) {
                scan.add(head, per_head * length);
                continue;
              }
              for (int64_t i = 0; i < per_head; ++i) scan.add(head + i * source.stride_row, length);
            }
            return scan.result();
          },
          PeakScan<T>::nan_max);
    }
    return peak <= std::numeric_limits<T>::max() ? double(peak) : std::numeric_limits<double>::infinity();
  });
}

// (largest |x| over q and k, largest |x| over v), each +inf where an entry is not finite: what
// fractional_attention's non-finite check and unit choice need, in one call.
std::tuple<double, double> fna_peaks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {std::max(peak_magnitude(q), peak_magnitude(k)), peak_magnitude(v)};
}

// Adds the keys j of one head (`keys`, row stride `stride`, D entries each) that take(j) admits
// into total (D, double); returns how many: partial sums of 64 keys in four interleaved runs
// (vectorised over the head dim), added up in double. partial: scratch of 4 * D.
template <typename T, typename Take>
int64_t sum_keys(const T* keys, int64_t stride, int64_t Nk, int64_t D, const Take& take, std::vector<T>& partial,
                 std::vector<double>& total) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t runs = 4, keys_per_partial = 64;
  std::fill(total.begin(), total.end(), 0.0);
  int64_t count = 0;
  for (int64_t j0 = 0; j0 < Nk; j0 += keys_per_partial) {
    std::fill(partial.begin(), partial.end(), T(0));
    const int64_t stop = std::min(Nk, j0 + keys_per_partial);
    for (int64_t j = j0; j < stop; ++j) {
      if (!take(j)) continue;
      ++count;
      T* run = partial.data() + (j % runs) * D;
      const T* key = keys + j * stride;
      int64_t e = 0;
      for (; e + Vec::size() <= D; e += Vec::size()) (Vec::loadu(run + e) + Vec::loadu(key + e)).store(run + e);
      for (; e < D; ++e) run[e] += key[e];
    }
    for (int64_t r = 0; r < runs; ++r) {
      for (int64_t e = 0; e < D; ++e) total[e] += partial[r * D + e];
    }
  }
  return count;
}

// The centre of each (batch, head)'s keys in use, (B, H, D), from k (B, H, Nk, D) with contiguous
// rows and `used` (bool (B, H, Nk), any strides; undefined: all keys): the mean of the half of
// them nearest to their mean (by squared distance: those up to the lower median), 0 without any.
// A key far from the others (a huge activation) drags the mean towards it, and with it every
// |q - s|^2 + |k - s|^2 - 2 (q - s).(k - s) into cancellation; it does not move this centre.
// As kernels.key_center computes it.
at::Tensor center_keys(const at::Tensor& k, const std::optional<at::Tensor>& used_) {
  auto center = at::empty({k.size(0), k.size(1), k.size(3)}, k.options());
  const int64_t H = k.size(1), bh_count = k.size(0) * H, Nk = k.size(2), D = k.size(3);
  const bool* used = nullptr;
  int64_t used_b = 0, used_h = 0, used_j = 0;
  if (used_.has_value() && used_->defined()) {
    TORCH_CHECK(used_->scalar_type() == at::kBool && used_->dim() == 3 && used_->size(0) == k.size(0) &&
                    used_->size(1) == H && used_->size(2) == Nk,
                "fna_cpu: the keys in use must be bool (B, H, Nk)");
    used = used_->const_data_ptr<bool>();
    used_b = used_->stride(0), used_h = used_->stride(1), used_j = used_->stride(2);
  }
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "fna_center_keys", [&] {
    using T = scalar_t;
    const Rows<const T> k_in = rows_of<T>(k);
    T* out = center.mutable_data_ptr<T>();
    using Vec = at::vec::Vectorized<T>;
    const VectorRow<T> span(D);
    at::parallel_for(0, bh_count, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> partial(4 * D), mean(D);
      std::vector<double> total(D);
      std::vector<double> spread(Nk), ranked;
      for (int64_t bh = begin; bh < end; ++bh) {
        const T* keys = k_in.row(bh, 0);
        const bool* used_keys = used == nullptr ? nullptr : used + (bh / H) * used_b + (bh % H) * used_h;
        const auto in_use = [&](int64_t j) { return used_keys == nullptr || used_keys[j * used_j]; };
        const int64_t count = sum_keys(keys, k_in.stride_row, Nk, D, in_use, partial, total);
        if (count == 0) {
          std::fill(out + bh * D, out + (bh + 1) * D, T(0));
          continue;
        }
        for (int64_t e = 0; e < D; ++e) mean[e] = T(total[e] / double(count));
        ranked.clear();
        for (int64_t j = 0; j < Nk; ++j) {
          if (!in_use(j)) continue;
          const T* key = keys + j * k_in.stride_row;
          Vec sum(0);  // squared distance to the mean, vectorised over the head dim
          for (int64_t e = 0; e < span.count; ++e) {
            const Vec diff = span.load(key, e) - span.load(mean.data(), e);
            sum = at::vec::fmadd(diff, diff, sum);
          }
          spread[j] = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, sum);
          ranked.push_back(spread[j]);
        }
        const auto median = ranked.begin() + (count - 1) / 2;
        std::nth_element(ranked.begin(), median, ranked.end());
        const double limit = *median;
        const auto near = [&](int64_t j) { return in_use(j) && spread[j] <= limit; };
        const int64_t nearest = sum_keys(keys, k_in.stride_row, Nk, D, near, partial, total);
        for (int64_t e = 0; e < D; ++e) out[bh * D + e] = T(total[e] / double(nearest));
      }
    });
  });
  return center;
}

void check_shift(const at::Tensor& shift, const at::Tensor& q) {
  TORCH_CHECK(shift.is_contiguous() && shift.scalar_type() == q.scalar_type() &&
                  shift.numel() == q.size(0) * q.size(1) * q.size(3),
              "fna_cpu: shift must be a contiguous (B, H, D) tensor of q's dtype");
}

// The shift of q and k: the centre of the keys in use, all or (with an additive mask, of its own
// shape) those the mask keeps for at least one query.
at::Tensor key_shift(const at::Tensor& k, const std::optional<at::Tensor>& additive) {
  if (!additive.has_value()) return center_keys(k, std::nullopt);
  const auto in_use = (*additive != -std::numeric_limits<double>::infinity()).any(2);
  return center_keys(k, in_use.expand({k.size(0), k.size(1), k.size(2)}));
}

bool readable_rows(const at::Tensor& x) {
  return (x.size(3) == 1 || x.stride(3) == 1) && (x.size(2) == 1 || x.stride(2) >= x.size(3));
}

// x as the kernel reads it: in place where its rows are readable, else a contiguous copy.
at::Tensor in_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "fna_cpu: 4-d CPU tensors");
  return readable_rows(x) ? x : x.contiguous();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* t : {&k, &v}) TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fna_cpu: one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "fna_cpu: float32 or float64");
}

// The mask as the kernel reads it: additive, of q's dtype, rows of keys contiguous, still of the
// mask's own (small) shape but for the keys: a mask broadcast along them (last size 1) is spread
// over all Nk, since the kernel reads a row of keys at a time. Undefined without one. `broadcast`
// views it as (B, H, Nq, Nk).
std::optional<at::Tensor> additive_mask(const std::optional<at::Tensor>& mask_, const at::Tensor& q, int64_t Nk) {
  if (!mask_.has_value() || !mask_->defined()) return std::nullopt;
  TORCH_CHECK(mask_->dim() == 4 && (mask_->size(3) == Nk || mask_->size(3) == 1),
              "fna_cpu: mask must be (B or 1, H or 1, Nq or 1, Nk or 1)");
  const at::Tensor mask = mask_->expand({mask_->size(0), mask_->size(1), mask_->size(2), Nk});
  const double removed = -std::numeric_limits<double>::infinity();
  at::Tensor additive = mask.scalar_type() == at::kBool
                            ? at::zeros(mask.sizes(), q.options()).masked_fill_(mask.logical_not(), removed)
                            : mask.to(q.scalar_type());
  return additive.stride(3) == 1 || Nk == 1 ? additive : additive.contiguous();
}

std::optional<at::Tensor> broadcast(const std::optional<at::Tensor>& mask, const at::Tensor& q, int64_t Nk) {
  if (!mask.has_value()) return std::nullopt;
  return mask->expand({q.size(0), q.size(1), q.size(2), Nk});
}

// (output (B, H, Nq, Dv) laid out as (B, Nq, H, Dv), row log-sum-exp (B, H, Nq)) of q, k, v as the
// kernel reads them, shifted by s (empty: one query row, its distances taken directly), with the
// additive mask of its own shape; `peaks` as forward_kernel takes it, when given.
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& s, const std::optional<at::Tensor>& additive,
                                               double exponent, double c, bool gaussian, bool causal,
                                               bool exclude_self, int64_t query_block, int64_t key_block,
                                               const std::optional<at::Tensor>& peaks) {
  auto out = at::empty({q.size(0), q.size(2), q.size(1), v.size(3)}, q.options()).transpose(1, 2);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fna_forward", [&] {
    const Problem<scalar_t> p(q, k, v, s, broadcast(additive, q, k.size(2)), exponent, c, gaussian, causal,
                              exclude_self, query_block, key_block);
    forward_kernel<scalar_t>(p, Rows<scalar_t>(out.mutable_data_ptr<scalar_t>(), out),
                             lse.mutable_data_ptr<scalar_t>(),
                             peaks.has_value() ? peaks->mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {out, lse};
}

// Returns (output, row log-sum-exp, the shift used, empty for none): backward takes it back.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fna_forward(const at::Tensor& q_, const at::Tensor& k_,
                                                           const at::Tensor& v_, const std::optional<at::Tensor>& mask,
                                                           const std::optional<at::Tensor>& shift, double exponent,
                                                           double c, bool gaussian, bool causal, bool exclude_self,
                                                           int64_t query_block, int64_t key_block) {
  const at::Tensor q = in_rows(q_), k = in_rows(k_), v = in_rows(v_);
  check_inputs(q, k, v);
  const auto additive = additive_mask(mask, q, k.size(2));
  at::Tensor s;
  if (shift.has_value() && shift->defined()) {
    s = *shift;
    check_shift(s, q);
  } else if (q.size(2) == 1 && !gaussian) {
    // One query row: direct distances, no shift (the Gaussian's logits keep their shift and
    // leave |q - s|^2 out: logits_row).
    s = at::empty({0}, q.options());
  } else {
    s = key_shift(k, additive);
  }
  auto [out, lse] = run_forward(q, k, v, s, additive, exponent, c, gaussian, causal, exclude_self, query_block,
                                key_block, std::nullopt);
  return {out, lse, s};
}

// One query row (a decoding step), without autograd: (output, the largest magnitude in q and k, the
// largest in v), each magnitude +inf where an entry is NaN or infinite, taken as the kernel reads
// every entry (one read of the key/value cache for the attention and its non-finite check).
std::tuple<at::Tensor, double, double> fna_decode(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                  const std::optional<at::Tensor>& mask, double exponent, double c,
                                                  bool gaussian, bool causal, bool exclude_self, int64_t key_block) {
  const at::Tensor q = in_rows(q_), k = in_rows(k_), v = in_rows(v_);
  check_inputs(q, k, v);
  TORCH_CHECK(q.size(2) == 1 && k.size(2) > 0 && !gaussian,
              "fna_cpu: decode takes one query row, at least one key and the power law");
  const auto additive = additive_mask(mask, q, k.size(2));
  auto peaks = at::empty({2, q.size(0) * q.size(1)}, q.options());
  const auto none = at::empty({0}, q.options());  // no shift: the distances are taken directly
  const auto out = std::get<0>(
      run_forward(q, k, v, none, additive, exponent, c, gaussian, causal, exclude_self, 1, key_block, peaks));
  return {out, peak_magnitude(peaks[0]), peak_magnitude(peaks[1])};
}

// Returns the gradients of q, k, v (contiguous) and, when mask_grad, of the mask's broadcast
// (B, H, Nq, Nk) (else empty: an op returns defined tensors).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fna_backward(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask, const at::Tensor& shift,
    double exponent, double c, bool gaussian, bool causal, bool exclude_self, int64_t query_block, int64_t key_block,
    bool mask_grad) {
  const at::Tensor q = in_rows(q_), k = in_rows(k_), v = in_rows(v_), d_out = in_rows(grad_out);
  check_inputs(q, k, v);
  const auto additive = additive_mask(mask, q, k.size(2));
  // Backward always shifts (its distances come from matrix products); forward may have had none.
  const at::Tensor s = shift.numel() ? shift : key_shift(k, additive);
  check_shift(s, q);
  auto delta = (d_out * out).sum(-1).contiguous();
  // Contiguous whatever the inputs' layout (empty_like would follow a strided view's order).
  auto grad_q = at::empty(q.sizes(), q.options());
  auto grad_k = at::zeros(k.sizes(), k.options());
  auto grad_v = at::zeros(v.sizes(), v.options());
  auto grad_mask = mask_grad ? at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options())
                             : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fna_backward", [&] {
    const Problem<scalar_t> p(q, k, v, s, broadcast(additive, q, k.size(2)), exponent, c, gaussian, causal,
                              exclude_self, query_block, key_block);
    backward_kernel<scalar_t>(p, rows_of<scalar_t>(d_out), lse.contiguous().const_data_ptr<scalar_t>(),
                              delta.const_data_ptr<scalar_t>(), grad_q.mutable_data_ptr<scalar_t>(),
                              grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(),
                              mask_grad ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {grad_q, grad_k, grad_v, grad_mask};
}

}  // namespace

TORCH_LIBRARY(levyattn_fna_cpu, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? shift, float exponent, float c, bool gaussian, "
      "bool causal, bool exclude_self, int query_block, int key_block) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, Tensor shift, "
      "float exponent, float c, bool gaussian, bool causal, bool exclude_self, int query_block, int key_block, "
      "bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("peaks(Tensor q, Tensor k, Tensor v) -> (float, float)");
  m.def(
      "decode(Tensor q, Tensor k, Tensor v, Tensor? mask, float exponent, float c, bool gaussian, bool causal, "
      "bool exclude_self, int key_block) -> (Tensor, float, float)");
}

TORCH_LIBRARY_IMPL(levyattn_fna_cpu, CPU, m) {
  m.impl("forward", &fna_forward);
  m.impl("backward", &fna_backward);
  m.impl("peaks", &fna_peaks);
  m.impl("decode", &fna_decode);
}
