// Homologous contrastive loss on the CPU, forward and backward
// (pyssl/ops/homologous_contrastive_loss.py).
//
// Per sample, over its n tokens with group id >= 0: ẑ_i = z_i / max(‖z_i‖, eps),
// s_ij = ẑ_i·ẑ_j / τ, lse_i = log Σ_{j≠i} exp s_ij, ℓ_i = lse_i − mean_{j≠i, g_j = g_i} s_ij
// (0 without positives, and lse_i = 0 for a lone token). Backward from u_i = ∂L/∂ℓ_i:
//     G_ij = u_i (exp(s_ij − lse_i)[j≠i] − [j ∈ P(i)] / |P(i)|),
//     ∂L/∂ẑ_i = (1/τ) Σ_j (G_ij + G_ji) ẑ_j,   ∂L/∂z_i = (∂ẑ_i − ẑ_i (ẑ_i·∂ẑ_i)) / ‖z_i‖.
//
// Tiling: OpenMP over samples; a thread gathers the sample's normalized valid rows (n × E) and
// builds its n × n score block with the shared register-blocked GEMM (csrc/cpu_gemm.h) — one
// sample's block per thread, never a B·L·L tensor. The backward recomputes the block from the
// saved lse, forms G + Gᵀ in place and multiplies it by Ẑ (a second GEMM). Memory traffic: z
// read once per pass, dz written once; the n × n block stays in L2.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_gemm.h"

#include <cmath>
#include <limits>
#include <vector>

namespace {

using pyssl_cpu::exp_nonpos;
using pyssl_cpu::gemm;

template <typename scalar_t, typename acc_t>
void normalized_rows(const scalar_t* z, const std::vector<int64_t>& idx, int64_t E, double eps,
                     acc_t* zn, acc_t* inv_norm) {
  for (size_t i = 0; i < idx.size(); ++i) {
    const scalar_t* r = z + idx[i] * E;
    acc_t ss = 0;
    for (int64_t c = 0; c < E; ++c) ss += (acc_t)r[c] * (acc_t)r[c];
    const acc_t inv = acc_t(1) / std::max(std::sqrt(ss), (acc_t)eps);
    inv_norm[i] = std::sqrt(ss) > (acc_t)eps ? inv : acc_t(-1) / (acc_t)eps;   // sign marks the clamp
    for (int64_t c = 0; c < E; ++c) zn[i * E + c] = (acc_t)r[c] * inv;
  }
}

// Ẑ (n × E) of the sample's valid rows, their inverse norms, and S = Ẑ·Ẑᵀ (unscaled by 1/τ).
template <typename scalar_t, typename acc_t>
void raw_scores(const scalar_t* z, const std::vector<int64_t>& idx, int64_t E, double eps, std::vector<acc_t>& Zn,
                std::vector<acc_t>& ZnT, std::vector<acc_t>& inv, std::vector<acc_t>& S) {
  const int64_t n = (int64_t)idx.size();
  Zn.resize(n * E); ZnT.resize(n * E); S.resize(n * n); inv.resize(n);
  normalized_rows(z, idx, E, eps, Zn.data(), inv.data());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < E; ++c) ZnT[c * n + i] = Zn[i * E + c];
  gemm(n, n, E, Zn.data(), E, ZnT.data(), n, S.data(), n);
}

struct Sample {
  std::vector<int64_t> idx;   // valid token positions
  std::vector<int64_t> grp;   // their group ids
  std::vector<int64_t> npos;  // |P(i)|
};

Sample sample_of(const int64_t* g, int64_t L) {
  Sample s;
  for (int64_t t = 0; t < L; ++t)
    if (g[t] >= 0) { s.idx.push_back(t); s.grp.push_back(g[t]); }
  const size_t n = s.idx.size();
  s.npos.assign(n, 0);
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < n; ++j)
      if (j != i && s.grp[j] == s.grp[i]) ++s.npos[i];
  return s;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& z, const at::Tensor& groups, double inv_t, double eps) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t B = z.size(0), L = z.size(1), E = z.size(2);
  auto opts = z.options().dtype(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat);
  auto rows = at::zeros({B, L}, opts);
  auto lse = at::zeros({B, L}, opts);
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const int64_t* gp = groups.data_ptr<int64_t>();
  acc_t* rp = static_cast<acc_t*>(rows.data_ptr());
  acc_t* lp = static_cast<acc_t*>(lse.data_ptr());
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Zn, ZnT, S, inv;
    for (int64_t b = begin; b < end; ++b) {
      const Sample sm = sample_of(gp + b * L, L);
      const int64_t n = (int64_t)sm.idx.size();
      if (n == 0) continue;
      raw_scores(zp + b * L * E, sm.idx, E, eps, Zn, ZnT, inv, S);
      for (int64_t i = 0; i < n; ++i) {
        acc_t* s = S.data() + i * n;
        acc_t m = ninf, pos = 0;
        for (int64_t j = 0; j < n; ++j) {
          s[j] *= (acc_t)inv_t;
          if (j == i) continue;
          m = std::max(m, s[j]);
          if (sm.grp[j] == sm.grp[i]) pos += s[j];
        }
        acc_t l = 0;
        if (m != ninf) {
          acc_t sum = 0;
          for (int64_t j = 0; j < n; ++j)
            if (j != i) sum += exp_nonpos(s[j] - m);
          l = m + std::log(sum);
        }
        lp[b * L + sm.idx[i]] = l;
        if (sm.npos[i] > 0) rp[b * L + sm.idx[i]] = l - pos / (acc_t)sm.npos[i];
      }
    }
  });
  return {rows, lse};
}

template <typename scalar_t>
at::Tensor backward_impl(const at::Tensor& z, const at::Tensor& groups, const at::Tensor& lse,
                         const at::Tensor& grad_rows, double inv_t, double eps) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t B = z.size(0), L = z.size(1), E = z.size(2);
  auto dz = at::zeros_like(z);
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const int64_t* gp = groups.data_ptr<int64_t>();
  const acc_t* lp = static_cast<const acc_t*>(lse.data_ptr());
  const acc_t* up = static_cast<const acc_t*>(grad_rows.data_ptr());
  scalar_t* dp = dz.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Zn, ZnT, S, inv, dZn;
    for (int64_t b = begin; b < end; ++b) {
      const Sample sm = sample_of(gp + b * L, L);
      const int64_t n = (int64_t)sm.idx.size();
      if (n == 0) continue;
      dZn.resize(n * E);
      raw_scores(zp + b * L * E, sm.idx, E, eps, Zn, ZnT, inv, S);
      // S -> G in place (rows without positives have u = 0 and give a zero row)
      for (int64_t i = 0; i < n; ++i) {
        acc_t* s = S.data() + i * n;
        const int64_t t = b * L + sm.idx[i];
        const acc_t u = sm.npos[i] > 0 ? up[t] : acc_t(0);
        const acc_t l = lp[t];
        const acc_t w = sm.npos[i] > 0 ? acc_t(1) / (acc_t)sm.npos[i] : acc_t(0);
        for (int64_t j = 0; j < n; ++j) {
          if (j == i || u == 0) { s[j] = 0; continue; }
          const acc_t p = exp_nonpos(s[j] * (acc_t)inv_t - l);
          s[j] = u * (p - (sm.grp[j] == sm.grp[i] ? w : acc_t(0)));
        }
      }
      // M = (G + Gᵀ)/τ, symmetric, in place over the upper triangle and mirrored
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = i; j < n; ++j) {
          const acc_t m = (S[i * n + j] + S[j * n + i]) * (acc_t)inv_t;
          S[i * n + j] = m;
          S[j * n + i] = m;
        }
      gemm(n, E, n, S.data(), n, Zn.data(), E, dZn.data(), E);
      for (int64_t i = 0; i < n; ++i) {
        const acc_t* g = dZn.data() + i * E;
        const acc_t* zr = Zn.data() + i * E;
        scalar_t* out = dp + (b * L + sm.idx[i]) * E;
        if (inv[i] < 0) {   // the norm was clamped at eps: ẑ = z/eps, a plain scaling
          for (int64_t c = 0; c < E; ++c) out[c] = (scalar_t)(g[c] * -inv[i]);
          continue;
        }
        acc_t dot = 0;
        for (int64_t c = 0; c < E; ++c) dot += zr[c] * g[c];
        for (int64_t c = 0; c < E; ++c) out[c] = (scalar_t)((g[c] - zr[c] * dot) * inv[i]);
      }
    }
  });
  return dz;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> homologous_contrastive_fwd_cpu(at::Tensor z, at::Tensor groups,
                                                                  double temperature, double eps) {
  TORCH_CHECK(z.dim() == 3 && z.is_contiguous(), "z must be contiguous (B, L, E)");
  TORCH_CHECK(groups.dtype() == at::kLong && groups.is_contiguous() && groups.size(0) == z.size(0) &&
              groups.size(1) == z.size(1), "groups must be contiguous int64 (B, L)");
  std::tuple<at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "homologous_contrastive_fwd_cpu", [&] {
    r = forward_impl<scalar_t>(z, groups, 1.0 / temperature, eps);
  });
  return r;
}

at::Tensor homologous_contrastive_bwd_cpu(at::Tensor z, at::Tensor groups, at::Tensor lse, at::Tensor grad_rows,
                                          double temperature, double eps) {
  TORCH_CHECK(z.dim() == 3 && z.is_contiguous(), "z must be contiguous (B, L, E)");
  TORCH_CHECK(lse.is_contiguous() && grad_rows.is_contiguous() && lse.sizes() == grad_rows.sizes() &&
              lse.scalar_type() == grad_rows.scalar_type(), "lse and grad_rows must be contiguous (B, L) alike");
  TORCH_CHECK(lse.scalar_type() == (z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat), "lse dtype");
  at::Tensor r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "homologous_contrastive_bwd_cpu", [&] {
    r = backward_impl<scalar_t>(z, groups, lse, grad_rows, 1.0 / temperature, eps);
  });
  return r;
}
