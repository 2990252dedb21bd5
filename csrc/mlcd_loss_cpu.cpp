// CPU backend of the margin-loss engine (MLCD loss and margin softmax share it); the contract is
// pyssl/ops/_margin_engine_contract.md, "chunked backends".
//
// What it computes, for one chunk of R rows against all C' selected classes:
//   mlcd_chunk_lse : buf = x̂·Wᵀ, then buf <- scale·clamp(buf·rw, -1, 1) with the positive columns
//                    set to -inf; returns lse_neg (R,) = logsumexp over the negative columns
//                    (-inf for a row without one) and pos_cos (R, L) = clamp(cos) at the positives.
//   mlcd_chunk_grad: buf (the logits left by mlcd_chunk_lse) <- G' = rw ⊙ G in place, then
//                    dxhat_out = G'·W and dw_acc += G'ᵀ·x̂ (= when accumulate is false); an
//                    empty 1-D dxhat_out or dw_acc skips that product (a frozen input).
//
// Tiling: the caller picks R so that the (R, C') buffer fits its memory budget; this file sees
// row chunks × all columns. The three GEMMs go to MKL (at::mm_out / addmm_), which tiles them far
// better than hand-written code could. What is fused here is everything between the GEMMs: each
// epilogue is ONE pass over buf, parallel over rows (at::parallel_for, i.e. torch's OpenMP pool
// and torch.get_num_threads()), vectorized along the row.
//
// Cache / traffic: buf (R·C'·4 bytes) is far larger than the caches at the sizes that matter, so
// each epilogue streams it once from memory: read + write 4 bytes per element, 2·R·C'·4 bytes per
// pass (the unfused torch version makes ~6 such passes: scale, clamp, mask, max, exp, sum ...).
// rw (C'·4 bytes) is shared by all rows and stays in L2/L3. The forward walks a row in blocks of
// kBlock columns: the block's logits are written, then re-read from L1 for the exp-sum, so the
// stable log-sum-exp costs no second trip to memory, and the running max is rescaled once per
// block, not per element. Positive columns (L per row, few) come from a sorted per-row list and
// are masked inside their block before its exp-sum, never subtracted afterwards (no cancellation,
// and a dominant positive cannot underflow the negatives' sum).
//
// Cost: the epilogues do O(R·C') work against the GEMMs' O(R·C'·D) each. Measured on 2 cores
// (AVX-512), R = 512, C' = 100000, D = 256: the 3 GEMMs take ~450 ms, each epilogue ~12-20 ms
// (~24 GB/s, i.e. memory bound); the same chunk with torch ops takes ~710 ms.
// Fusing further was tried and measured (6b55d5f): walking the columns in 4 MiB tiles (GEMM
// into the tile, epilogue while it is in cache, the backward's GEMMs per tile) made the
// epilogues ~8 ms faster per call at N = 1024, C' = 100000, D = 256, but the ~50 smaller GEMMs
// per phase lost ~25 ms; 2-4% slower end to end, interleaved in one process (1, 4 and 16 MiB
// tiles alike). So the GEMMs stay whole.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_gemm.h"

namespace {

using pyssl_cpu::fast_exp;

constexpr int64_t kBlock = 1024;  // 4 KiB of logits + 4 KiB of rw: both stay in L1 for the re-read
constexpr float kInf = std::numeric_limits<float>::infinity();

inline float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

void check_f32_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "mlcd cpu kernel: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "mlcd cpu kernel: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "mlcd cpu kernel: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "mlcd cpu kernel: ", name, " must be contiguous (rows packed)");
}

void check_f32_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), "mlcd cpu kernel: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "mlcd cpu kernel: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "mlcd cpu kernel: ", name, " must have shape (",
              n, ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "mlcd cpu kernel: ", name, " must be contiguous");
}

// Checks shared by both entry points; returns (R, C', D, L). pos_col entries are range-checked
// here, serially: R·L is tiny next to the GEMMs, and an out-of-range column would otherwise be an
// out-of-bounds write inside the parallel pass.
std::tuple<int64_t, int64_t, int64_t, int64_t> check_chunk(const at::Tensor& buf,
                                                           const at::Tensor& xhat,
                                                           const at::Tensor& w,
                                                           const at::Tensor& rw,
                                                           const at::Tensor& pos_col) {
  check_f32_matrix(xhat, "xhat");
  check_f32_matrix(w, "w");
  check_f32_matrix(buf, "buf");
  const int64_t R = xhat.size(0), D = xhat.size(1), C = w.size(0);
  TORCH_CHECK(w.size(1) == D, "mlcd cpu kernel: w must have shape (C', ", D,
              ") to match xhat's feature dimension, got ", w.sizes());
  check_f32_vector(rw, "rw", C);
  TORCH_CHECK(buf.size(0) == R && buf.size(1) == C, "mlcd cpu kernel: buf must have shape (",
              R, ", ", C, ") = (xhat rows, w rows), got ", buf.sizes());
  TORCH_CHECK(pos_col.device().is_cpu() && pos_col.scalar_type() == at::kLong,
              "mlcd cpu kernel: pos_col must be a CPU int64 tensor, got ", pos_col.scalar_type(),
              " on ", pos_col.device());
  TORCH_CHECK(pos_col.dim() == 2 && pos_col.size(0) == R,
              "mlcd cpu kernel: pos_col must have shape (", R, ", L), got ", pos_col.sizes());
  TORCH_CHECK(pos_col.is_contiguous(), "mlcd cpu kernel: pos_col must be contiguous");
  const int64_t L = pos_col.size(1);
  const int64_t* pc = pos_col.data_ptr<int64_t>();
  for (int64_t k = 0; k < R * L; ++k) {
    TORCH_CHECK(pc[k] >= -1 && pc[k] < C, "mlcd cpu kernel: pos_col[", k / L, ", ", k % L,
                "] = ", pc[k], " is not a column index in [0, ", C, ") or -1 (padding)");
  }
  return {R, C, D, L};
}

// Rows per parallel task: enough elements per task to amortize the fork for narrow buffers.
int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(C, 1));
}

// Row functions take plain pointers and values (no lambda captures): with the pointers behind
// references gcc could not prove unit stride and emitted gathers, 2x slower.

// Forward epilogue of one row; returns lse_neg. cols is per-thread scratch.
float lse_row(float* __restrict row, const float* __restrict rw, int64_t C, float s,
              const int64_t* __restrict pc, float* __restrict pcos, int64_t L,
              std::vector<int64_t>& cols) {
  // Positives first, from the raw GEMM output: pos_cos needs clamp(cos), not the scaled logit
  // (dividing by scale would lose bits, and fail for scale = 0).
  cols.clear();
  for (int64_t i = 0; i < L; ++i) {
    const int64_t c = pc[i];
    if (c < 0) continue;
    pcos[i] = clamp_unit(row[c] * rw[c]);
    cols.push_back(c);
  }
  std::sort(cols.begin(), cols.end());
  size_t k = 0;

  float m = -kInf;   // running max of the negatives seen so far
  double sum = 0.0;  // Σ exp(logit - m); double: one add per block, C'/kBlock of them
  bool has_nan = false;
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t n = std::min(kBlock, C - j0);
    float* __restrict blk = row + j0;
    const float* __restrict rwb = rw + j0;
    float bm = -kInf;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < n; ++j) {
      const float v = s * clamp_unit(blk[j] * rwb[j]);
      blk[j] = v;
      bm = std::max(bm, v);
    }
    if (k < cols.size() && cols[k] < j0 + n) {
      // A positive lies in this block: mask it and take the max again (the block is in L1),
      // so the shift is the negatives' max and a dominant positive cannot underflow them.
      while (k < cols.size() && cols[k] < j0 + n) row[cols[k++]] = -kInf;
      bm = -kInf;
#pragma omp simd reduction(max : bm)
      for (int64_t j = 0; j < n; ++j) bm = blk[j] > bm ? blk[j] : bm;   // not std::max: it stops the vectorizer
    }
    if (bm == -kInf) {
      // Whole block masked (the max skips NaN, so look for one: NaN input must give NaN).
      for (int64_t j = 0; j < n; ++j) has_nan |= std::isnan(blk[j]);
      continue;
    }
    if (bm > m) {
      sum *= static_cast<double>(fast_exp(m - bm));  // m = -inf gives 0, and sum is 0 then
      m = bm;
    }
    float bs = 0.0f;
#pragma omp simd reduction(+ : bs)
    for (int64_t j = 0; j < n; ++j) bs += fast_exp(blk[j] - m);
    sum += bs;
  }
  // a NaN max (vectorized max may propagate it) leaves m = -inf but poisons sum
  if (has_nan || std::isnan(sum)) return std::numeric_limits<float>::quiet_NaN();
  return m == -kInf ? -kInf : m + static_cast<float>(std::log(sum));
}

// Gradient epilogue of one row: logits -> G' in place. g = gneg·scale, l = lse_total.
void grad_row(float* __restrict row, const float* __restrict rw, int64_t C, float g, float l,
              const int64_t* __restrict pc, const float* __restrict gpos, int64_t L) {
  if (g == 0.0f) {
    // No exp at all: a row whose negatives carry no gradient may have lse_total = -inf (no
    // negatives and nothing else in the total), where exp(logit - lse) would give inf·0.
    std::fill(row, row + C, 0.0f);
  } else {
    // Positive columns hold -inf, so they come out 0 here and are set just below.
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) row[j] = (rw[j] * g) * fast_exp(row[j] - l);
  }
  for (int64_t i = 0; i < L; ++i) {
    const int64_t c = pc[i];
    if (c >= 0) row[c] = rw[c] * gpos[i];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mlcd_chunk_lse(at::Tensor xhat, at::Tensor w, at::Tensor rw,
                                                  at::Tensor pos_col, double scale,
                                                  at::Tensor buf) {
  int64_t R, C, D, L;  // plain variables: C++17 lambdas cannot capture structured bindings
  std::tie(R, C, D, L) = check_chunk(buf, xhat, w, rw, pos_col);
  auto lse_neg = at::empty({R}, xhat.options());
  auto pos_cos = at::zeros({R, L}, xhat.options());
  if (R == 0) return {lse_neg, pos_cos};
  at::mm_out(buf, xhat, w.t());

  float* B = buf.data_ptr<float>();
  const float* rwp = rw.data_ptr<float>();
  const int64_t* pc = pos_col.data_ptr<int64_t>();
  float* lse = lse_neg.data_ptr<float>();
  float* pcos = pos_cos.data_ptr<float>();
  const float s = static_cast<float>(scale);

  at::parallel_for(0, R, row_grain(C), [=](int64_t r0, int64_t r1) {
    std::vector<int64_t> cols;
    cols.reserve(L);
    for (int64_t r = r0; r < r1; ++r)
      lse[r] = lse_row(B + r * C, rwp, C, s, pc + r * L, pcos + r * L, L, cols);
  });
  return {lse_neg, pos_cos};
}

void mlcd_chunk_grad(at::Tensor buf, at::Tensor xhat, at::Tensor w, at::Tensor rw,
                     at::Tensor pos_col, double scale, at::Tensor lse_total, at::Tensor gneg,
                     at::Tensor gpos, at::Tensor dxhat_out, at::Tensor dw_acc,
                     bool accumulate) {
  int64_t R, C, D, L;
  std::tie(R, C, D, L) = check_chunk(buf, xhat, w, rw, pos_col);
  check_f32_vector(lse_total, "lse_total", R);
  check_f32_vector(gneg, "gneg", R);
  check_f32_matrix(gpos, "gpos");
  TORCH_CHECK(gpos.size(0) == R && gpos.size(1) == L, "mlcd cpu kernel: gpos must have shape (",
              R, ", ", L, ") like pos_col, got ", gpos.sizes());
  // an empty 1-D tensor in place of dxhat_out or dw_acc: that product is not wanted (a frozen
  // input), and its GEMM, a third of the backward's work, is skipped
  const bool want_dx = !(dxhat_out.dim() == 1 && dxhat_out.numel() == 0);
  const bool want_dw = !(dw_acc.dim() == 1 && dw_acc.numel() == 0);
  if (want_dx) {
    check_f32_matrix(dxhat_out, "dxhat_out");
    TORCH_CHECK(dxhat_out.size(0) == R && dxhat_out.size(1) == D,
                "mlcd cpu kernel: dxhat_out must have shape (", R, ", ", D, "), got ",
                dxhat_out.sizes());
  }
  if (want_dw) {
    check_f32_matrix(dw_acc, "dw_acc");
    TORCH_CHECK(dw_acc.size(0) == C && dw_acc.size(1) == D,
                "mlcd cpu kernel: dw_acc must have shape (", C, ", ", D, ") like w, got ",
                dw_acc.sizes());
  }
  if (R == 0 || !(want_dx || want_dw)) return;

  float* B = buf.data_ptr<float>();
  const float* rwp = rw.data_ptr<float>();
  const int64_t* pc = pos_col.data_ptr<int64_t>();
  const float* lt = lse_total.data_ptr<float>();
  const float* gn = gneg.data_ptr<float>();
  const float* gp = gpos.data_ptr<float>();
  const float s = static_cast<float>(scale);

  at::parallel_for(0, R, row_grain(C), [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      grad_row(B + r * C, rwp, C, gn[r] * s, lt[r], pc + r * L, gp + r * L, L);
  });

  if (want_dx) at::mm_out(dxhat_out, buf, w);
  // The first chunk writes dw_acc (beta = 0), later chunks add: no separate zero fill of C'×D.
  if (!want_dw) return;
  if (accumulate) {
    dw_acc.addmm_(buf.t(), xhat);
  } else {
    at::mm_out(dw_acc, buf.t(), xhat);
  }
}
