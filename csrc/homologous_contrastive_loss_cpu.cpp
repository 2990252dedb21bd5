// Homologous contrastive loss on the CPU, forward and backward
// (pyssl/ops/homologous_contrastive_loss.py).
//
// Per sample, over its n tokens with group id >= 0: ẑ_i = z_i / max(‖z_i‖, eps),
// s_ij = ẑ_i·ẑ_j / τ, lse_i = log Σ_{j≠i} exp s_ij, ℓ_i = lse_i − mean_{j≠i, g_j = g_i} s_ij
// (0 without positives, and lse_i = 0 for a lone token). Backward from u_i = ∂L/∂ℓ_i:
//     G_ij = u_i (exp(s_ij − lse_i)[j≠i] − [j ∈ P(i)] / |P(i)|),
//     ∂L/∂ẑ_i = (1/τ) Σ_j (G_ij + G_ji) ẑ_j,   ∂L/∂z_i = (∂ẑ_i − ẑ_i (ẑ_i·∂ẑ_i)) / ‖z_i‖.
//
// Tiling: OpenMP over row tiles of every sample (work items (b, i0, i1)), so a long sample is
// spread over the threads and no thread holds more than a tile of scores: per item, the thread
// builds the sample's normalized valid rows Ẑ (n × E, and Ẑᵀ) — reused by its next item of the
// same sample — and the tile's rt × n score block with the shared register-blocked GEMM
// (csrc/cpu_gemm.h); rt is chosen so the block is ≤ 2^18 floats (1 MiB, L2): one tile of a
// whole sample at ViT lengths (n ≤ 256), 16-row tiles at L = 16k. Never a B·L·L or L·L tensor.
// The backward needs no transposed accumulation: s is symmetric, so row i of (G + Gᵀ) is formed
// from the tile's own scores and the per-token statistics of every column j (lse_j, u_j,
// |P(j)|), as the Triton kernel does; then dẐ_tile = (G + Gᵀ)_tile·Ẑ / τ (a second GEMM) and
// the normalization backward. Memory traffic: per item, the sample's rows are read again (n·E,
// against the tile's 2·rt·n·E GEMM flops); dz written once; the score tile stays in L2.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_gemm.h"

#include <algorithm>
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

struct Sample {
  std::vector<int64_t> idx;   // valid token positions
  std::vector<int64_t> grp;   // their group ids
  std::vector<int64_t> npos;  // |P(i)|
};

Sample sample_of(const int64_t* g, int64_t L) {
  Sample s;
  for (int64_t t = 0; t < L; ++t)
    if (g[t] >= 0) { s.idx.push_back(t); s.grp.push_back(g[t]); }
  // |P(i)| = (tokens of i's group) − 1, counted over the sorted ids: O(n log n), not O(n²)
  std::vector<int64_t> sorted(s.grp);
  std::sort(sorted.begin(), sorted.end());
  s.npos.resize(s.idx.size());
  for (size_t i = 0; i < s.idx.size(); ++i) {
    const auto range = std::equal_range(sorted.begin(), sorted.end(), s.grp[i]);
    s.npos[i] = (int64_t)(range.second - range.first) - 1;
  }
  return s;
}

// Rows per tile: the rt × n score block at most 2^18 elements, between 16 and 256 rows.
int64_t tile_rows(int64_t n) {
  return std::max<int64_t>(16, std::min<int64_t>(256, (int64_t{1} << 18) / std::max<int64_t>(n, 1)));
}

struct Item {
  int64_t b, i0, i1;
};

// The work items of a call: every sample's valid rows in tiles of tile_rows(n).
std::vector<Item> items_of(const int64_t* g, int64_t B, int64_t L) {
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0;
    for (int64_t t = 0; t < L; ++t) n += g[b * L + t] >= 0;
    const int64_t rt = tile_rows(n);
    for (int64_t i0 = 0; i0 < n; i0 += rt) items.push_back({b, i0, std::min(n, i0 + rt)});
  }
  return items;
}

// What a thread keeps of the sample it is working on (rebuilt when its next item is another
// sample's).
template <typename acc_t>
struct SampleState {
  int64_t b = -1;
  Sample sm;
  std::vector<acc_t> Zn, ZnT, inv;

  template <typename scalar_t>
  void load(const scalar_t* z, const int64_t* g, int64_t bb, int64_t L, int64_t E, double eps) {
    if (bb == b) return;
    b = bb;
    sm = sample_of(g + b * L, L);
    const int64_t n = (int64_t)sm.idx.size();
    Zn.resize(n * E); ZnT.resize(n * E); inv.resize(n);
    normalized_rows(z + b * L * E, sm.idx, E, eps, Zn.data(), inv.data());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < E; ++c) ZnT[c * n + i] = Zn[i * E + c];
  }
};

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
  const std::vector<Item> items = items_of(gp, B, L);
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t begin, int64_t end) {
    SampleState<acc_t> st;
    std::vector<acc_t> S;
    for (int64_t it = begin; it < end; ++it) {
      const Item item = items[it];
      st.load(zp, gp, item.b, L, E, eps);
      const Sample& sm = st.sm;
      const int64_t n = (int64_t)sm.idx.size(), rt = item.i1 - item.i0;
      S.resize(rt * n);
      gemm(rt, n, E, st.Zn.data() + item.i0 * E, E, st.ZnT.data(), n, S.data(), n);
      for (int64_t i = item.i0; i < item.i1; ++i) {
        acc_t* s = S.data() + (i - item.i0) * n;
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
        const int64_t t = item.b * L + sm.idx[i];
        lp[t] = l;
        if (sm.npos[i] > 0) rp[t] = l - pos / (acc_t)sm.npos[i];
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
  const std::vector<Item> items = items_of(gp, B, L);
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t begin, int64_t end) {
    SampleState<acc_t> st;
    std::vector<acc_t> S, dZt, u, l, w;
    int64_t stats_of = -1;   // the sample whose u, l, w are loaded
    for (int64_t it = begin; it < end; ++it) {
      const Item item = items[it];
      st.load(zp, gp, item.b, L, E, eps);
      const Sample& sm = st.sm;
      const int64_t n = (int64_t)sm.idx.size(), rt = item.i1 - item.i0;
      if (stats_of != item.b) {
        // every token's statistics: row j of the tile's Gᵀ needs them for each column j
        stats_of = item.b;
        u.resize(n); l.resize(n); w.resize(n);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t t = item.b * L + sm.idx[j];
          u[j] = sm.npos[j] > 0 ? up[t] : acc_t(0);   // tokens without positives carry no loss
          l[j] = lp[t];
          w[j] = sm.npos[j] > 0 ? acc_t(1) / (acc_t)sm.npos[j] : acc_t(0);
        }
      }
      S.resize(rt * n);
      dZt.resize(rt * E);
      gemm(rt, n, E, st.Zn.data() + item.i0 * E, E, st.ZnT.data(), n, S.data(), n);
      // S -> (G + Gᵀ)/τ for the tile's rows: G_ij = u_i (e^{s_ij − lse_i} − [j ∈ P(i)]/|P(i)|),
      // G_ji the same with i and j swapped (s_ji = s_ij)
      for (int64_t i = item.i0; i < item.i1; ++i) {
        acc_t* s = S.data() + (i - item.i0) * n;
        for (int64_t j = 0; j < n; ++j) {
          if (j == i) { s[j] = 0; continue; }
          const acc_t sij = s[j] * (acc_t)inv_t;
          const bool same = sm.grp[j] == sm.grp[i];
          const acc_t gij = u[i] == 0 ? acc_t(0) : u[i] * (exp_nonpos(sij - l[i]) - (same ? w[i] : acc_t(0)));
          const acc_t gji = u[j] == 0 ? acc_t(0) : u[j] * (exp_nonpos(sij - l[j]) - (same ? w[j] : acc_t(0)));
          s[j] = (gij + gji) * (acc_t)inv_t;
        }
      }
      gemm(rt, E, n, S.data(), n, st.Zn.data(), E, dZt.data(), E);
      for (int64_t i = item.i0; i < item.i1; ++i) {
        const acc_t* g = dZt.data() + (i - item.i0) * E;
        const acc_t* zr = st.Zn.data() + i * E;
        const acc_t inv = st.inv[i];
        scalar_t* out = dp + (item.b * L + sm.idx[i]) * E;
        if (inv < 0) {   // the norm was clamped at eps: ẑ = z/eps, a plain scaling
          for (int64_t c = 0; c < E; ++c) out[c] = (scalar_t)(g[c] * -inv);
          continue;
        }
        acc_t dot = 0;
        for (int64_t c = 0; c < E; ++c) dot += zr[c] * g[c];
        for (int64_t c = 0; c < E; ++c) out[c] = (scalar_t)((g[c] - zr[c] * dot) * inv);
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
