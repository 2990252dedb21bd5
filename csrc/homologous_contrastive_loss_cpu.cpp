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
// spread over the threads and no thread holds more than a tile of scores. Tiles have
// tile_rows(n) rows: ~2^20 scores, 64 to 256 rows (a whole sample at ViT lengths, n ≤ 256:
// one tile, the thread normalizes it into its own scratch; 64-row tiles from n = 16k, where the
// tile is 64·n scores). A sample cut into several tiles has its normalized valid rows Ẑ (n × E)
// and Ẑᵀ built once per call and shared read-only (memory 2·n·E, not per thread). Per item the
// tile's rt × n score block comes from the shared register-blocked GEMM (csrc/cpu_gemm.h).
// Never a B·L·L or L·L tensor. The backward needs no transposed accumulation: s is symmetric,
// so row i of (G + Gᵀ) is formed from the tile's own scores and the per-token statistics of
// every column j (lse_j, u_j, |P(j)|), as the Triton kernel does (a single-tile sample forms G
// with one exp per score and mirrors it instead: ~8% faster at ViT shapes); then dẐ_tile =
// (G + Gᵀ)_tile·Ẑ / τ (a second GEMM) and the normalization backward. Memory traffic: each tile
// streams the sample's Ẑᵀ (and Ẑ in the backward): n·E against its 2·rt·n·E GEMM flops, so at
// least 2·64 flops per element read; dz written once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_gemm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using pyssl_cpu::fast_exp;
using pyssl_cpu::gemm;

template <typename scalar_t, typename acc_t>
void normalized_rows(const scalar_t* z, const std::vector<int64_t>& idx, int64_t E, double eps,
                     acc_t* zn, acc_t* inv_norm) {
  for (size_t i = 0; i < idx.size(); ++i) {
    const scalar_t* r = z + idx[i] * E;
    acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < E; ++c) ss += (acc_t)r[c] * (acc_t)r[c];
    const acc_t inv = acc_t(1) / std::max(std::sqrt(ss), (acc_t)eps);
    inv_norm[i] = std::sqrt(ss) > (acc_t)eps ? inv : acc_t(-1) / (acc_t)eps;   // sign marks the clamp
    for (int64_t c = 0; c < E; ++c) zn[i * E + c] = (acc_t)r[c] * inv;
  }
}

// normalized_rows into zn, and its transpose (E × n) into znt: the score GEMM's two operands.
template <typename scalar_t, typename acc_t>
void normalized_rows_t(const scalar_t* z, const std::vector<int64_t>& idx, int64_t E, double eps,
                       acc_t* zn, acc_t* znt, acc_t* inv_norm) {
  const int64_t n = (int64_t)idx.size();
  normalized_rows(z, idx, E, eps, zn, inv_norm);
  pyssl_cpu::transpose(zn, n, E, znt);
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

// Rows per tile, a multiple of 8 (the GEMM's row block): the rt × n score block about 2^20
// elements, between 64 rows (fewer would re-read the sample's Ẑ too often per score: each
// tile streams all of it) and 256 (a whole ViT-length sample: one tile).
int64_t tile_rows(int64_t n) {
  const int64_t rt = (int64_t{1} << 20) / std::max<int64_t>(n, 1);
  return std::max<int64_t>(64, std::min<int64_t>(256, rt / 8 * 8));
}

struct Item {
  int64_t b, i0, i1;
};

// Per-call plan: every sample's tokens and |P(i)|, the work items (row tiles), and — for the
// samples cut into several tiles — their Ẑ, Ẑᵀ and inverse norms built once and shared
// read-only by the threads (one copy, not one per thread that takes a tile of the sample).
// A single-tile sample (every sample at ViT lengths) is normalized by the thread that takes it,
// into its own scratch, which stays in cache.
template <typename acc_t>
struct Plan {
  std::vector<Sample> samples;
  std::vector<Item> items;
  std::vector<int64_t> off;        // per sample: offset in Zn/ZnT (n·E units) or -1 (single tile)
  std::vector<int64_t> off_inv;    // per sample: offset in inv
  std::vector<acc_t> Zn, ZnT, inv;

  template <typename scalar_t>
  Plan(const scalar_t* z, const int64_t* g, int64_t B, int64_t L, int64_t E, double eps) {
    samples.resize(B);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) samples[b] = sample_of(g + b * L, L);
    });
    off.assign(B, -1);
    off_inv.assign(B, -1);
    int64_t total = 0, total_inv = 0;
    std::vector<int64_t> multi;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = (int64_t)samples[b].idx.size(), rt = tile_rows(n);
      for (int64_t i0 = 0; i0 < n; i0 += rt) items.push_back({b, i0, std::min(n, i0 + rt)});
      if (n > rt) {
        off[b] = total;
        off_inv[b] = total_inv;
        total += n * E;
        total_inv += n;
        multi.push_back(b);
      }
    }
    Zn.resize(total); ZnT.resize(total); inv.resize(total_inv);
    at::parallel_for(0, (int64_t)multi.size(), 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t b = multi[m];
        normalized_rows_t(z + b * L * E, samples[b].idx, E, eps, Zn.data() + off[b], ZnT.data() + off[b],
                          inv.data() + off_inv[b]);
      }
    });
  }
};

// A thread's view of the sample of its current item: the plan's shared Ẑ for a multi-tile
// sample, else its own scratch (rebuilt only when the sample changes).
template <typename acc_t>
struct SampleView {
  int64_t b = -1;
  const acc_t *Zn = nullptr, *ZnT = nullptr, *inv = nullptr;
  std::vector<acc_t> own_Zn, own_ZnT, own_inv;

  template <typename scalar_t>
  void load(const Plan<acc_t>& plan, const scalar_t* z, int64_t bb, int64_t L, int64_t E, double eps) {
    if (bb == b) return;
    b = bb;
    if (plan.off[b] >= 0) {
      Zn = plan.Zn.data() + plan.off[b];
      ZnT = plan.ZnT.data() + plan.off[b];
      inv = plan.inv.data() + plan.off_inv[b];
      return;
    }
    const std::vector<int64_t>& idx = plan.samples[b].idx;
    const int64_t n = (int64_t)idx.size();
    own_Zn.resize(n * E); own_ZnT.resize(n * E); own_inv.resize(n);
    normalized_rows_t(z + b * L * E, idx, E, eps, own_Zn.data(), own_ZnT.data(), own_inv.data());
    Zn = own_Zn.data(); ZnT = own_ZnT.data(); inv = own_inv.data();
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
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();   // constexpr: not captured, a constant in the loops
  const Plan<acc_t> plan(zp, gp, B, L, E, eps);
  at::parallel_for(0, (int64_t)plan.items.size(), 1, [&](int64_t begin, int64_t end) {
    SampleView<acc_t> st;
    std::vector<acc_t> S;
    for (int64_t it = begin; it < end; ++it) {
      const Item item = plan.items[it];
      st.load(plan, zp, item.b, L, E, eps);
      const Sample& sm = plan.samples[item.b];
      const int64_t n = (int64_t)sm.idx.size(), rt = item.i1 - item.i0;
      S.resize(rt * n);
      gemm(rt, n, E, st.Zn + item.i0 * E, E, st.ZnT, n, S.data(), n);
      for (int64_t i = item.i0; i < item.i1; ++i) {
        acc_t* s = S.data() + (i - item.i0) * n;
        acc_t m = ninf, pos = 0;
        const int64_t* grp = sm.grp.data();
        const int64_t gi = grp[i];
        const acc_t it = (acc_t)inv_t;   // locals and `&`, not `&&`: what the vectorizer needs
#pragma omp simd reduction(max : m) reduction(+ : pos)
        for (int64_t j = 0; j < n; ++j) {
          const acc_t v = j == i ? ninf : s[j] * it;   // the row's own token is in neither sum
          s[j] = v;
          m = v > m ? v : m;
          pos += (grp[j] == gi) & (j != i) ? v : acc_t(0);
        }
        acc_t l = 0;
        if (m != ninf) {
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) sum += fast_exp(s[j] - m);
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
  const Plan<acc_t> plan(zp, gp, B, L, E, eps);
  at::parallel_for(0, (int64_t)plan.items.size(), 1, [&](int64_t begin, int64_t end) {
    SampleView<acc_t> st;
    std::vector<acc_t> S, dZt, u, l, w;
    int64_t stats_of = -1;   // the sample whose u, l, w are loaded
    for (int64_t it = begin; it < end; ++it) {
      const Item item = plan.items[it];
      st.load(plan, zp, item.b, L, E, eps);
      const Sample& sm = plan.samples[item.b];
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
      gemm(rt, n, E, st.Zn + item.i0 * E, E, st.ZnT, n, S.data(), n);
      if (rt == n) {
        // the whole sample in one tile (ViT lengths): G in place, one exp per score, then
        // (G + Gᵀ)/τ by mirroring. G_ij = u_i (e^{s_ij − lse_i} − [j ∈ P(i)]/|P(i)|)
        const int64_t* grp = sm.grp.data();
        for (int64_t i = 0; i < n; ++i) {
          acc_t* s = S.data() + i * n;
          const acc_t ui = u[i], li = l[i], wi = w[i];
          const int64_t gi = grp[i];
          if (ui == 0) { std::fill(s, s + n, acc_t(0)); continue; }
#pragma omp simd
          for (int64_t j = 0; j < n; ++j)
            s[j] = ui * (fast_exp(s[j] * (acc_t)inv_t - li) - (grp[j] == gi ? wi : acc_t(0)));
          s[i] = 0;   // the token itself (branch-free loop above, fixed here)
        }
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = i; j < n; ++j) {
            const acc_t m = (S[i * n + j] + S[j * n + i]) * (acc_t)inv_t;
            S[i * n + j] = m;
            S[j * n + i] = m;
          }
      } else {
        // a tile of a longer sample: its rows of (G + Gᵀ)/τ directly, G_ji from the column
        // token's statistics (s_ji = s_ij)
        const int64_t* grp = sm.grp.data();
        const acc_t* uj = u.data();
        const acc_t* lj = l.data();
        const acc_t* wj = w.data();
        for (int64_t i = item.i0; i < item.i1; ++i) {
          acc_t* s = S.data() + (i - item.i0) * n;
          const acc_t ui = u[i], li = l[i], wi = w[i];
          const int64_t gi = grp[i];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const acc_t sij = s[j] * (acc_t)inv_t;
            const bool same = grp[j] == gi;
            const acc_t gij = ui == 0 ? acc_t(0) : ui * (fast_exp(sij - li) - (same ? wi : acc_t(0)));
            const acc_t gji = uj[j] == 0 ? acc_t(0) : uj[j] * (fast_exp(sij - lj[j]) - (same ? wj[j] : acc_t(0)));
            s[j] = (gij + gji) * (acc_t)inv_t;
          }
          s[i] = 0;   // the token itself (branch-free loop above, fixed here)
        }
      }
      gemm(rt, E, n, S.data(), n, st.Zn, E, dZt.data(), E);
      for (int64_t i = item.i0; i < item.i1; ++i) {
        const acc_t* g = dZt.data() + (i - item.i0) * E;
        const acc_t* zr = st.Zn + i * E;
        const acc_t inv = st.inv[i];
        scalar_t* out = dp + (item.b * L + sm.idx[i]) * E;
        if (inv < 0) {   // the norm was clamped at eps: ẑ = z/eps, a plain scaling
          for (int64_t c = 0; c < E; ++c) out[c] = (scalar_t)(g[c] * -inv);
          continue;
        }
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
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
