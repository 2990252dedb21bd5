// Homologous-patch attention on the CPU: forward and backward (pyssl/ops/homologous_attention.py).
//
// Computes O_i = softmax_{j kept}(scale·q_i·k_j) v_j where key j is allowed for query i when
// their group ids are equal or either is negative (a global token), and, with topk = K > 0, only
// the K highest allowed scores of the row are kept (ties to the lower key index). Saves the
// row log-sum-exp and, in top-k mode, the kept set as a bitmask (B, H, L, ceil(L/8)) uint8.
//
// Tiling: the allowed pattern is a union of dense blocks once tokens are grouped, so each batch
// row is split into "sets" computed once and shared by all heads:
//     group g:        queries = tokens of g,          keys = tokens of g ∪ global tokens
//     global tokens:  queries = global tokens,        keys = all L tokens
// (no groups: one set, all against all). Every query is in exactly one set, so dQ rows are
// written directly; dK and dV rows receive contributions from several sets and are accumulated
// per (batch, head). Scheduling: the (batch·head, set) pairs in order are cut into one
// contiguous range per thread of about equal work (Σ n_q·n_k + n_q + n_k), so one long image
// (B·H below the thread count) is shared out as well as a large batch is: sets are first cut
// into query chunks of at most a quarter of a thread's share of the work. In the backward a
// thread accumulates the dK, dV of a (batch, head) whose sets it all holds in its own buffer and
// writes it out; one cut between threads (at most two per thread, its first and last) goes to
// a buffer of its own, and those are summed in thread order afterwards.
// Per set the thread gathers Q, K, Kᵀ, V (and Vᵀ, dO in the backward) into contiguous
// accumulator-type buffers; every product (S = QKᵀ, O = PV; dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K,
// dK = dSᵀ·Q) goes through one register-blocked micro-GEMM (8 rows × two vectors of C held in
// registers over the whole inner loop), the softmax through a vectorized exp, a top-k row's
// threshold by a SIMD bisection over its scores' integer images (topk_row); only the n_q×n_k
// score block of one set (kSetScores elements or 64 query rows, whichever is more: large sets
// are cut into query chunks sharing their gathered keys) exists per thread, never a B·H·L·L tensor. Memory
// traffic: q, k, v (and out, dout) read once per (batch, head) into cache-resident buffers;
// masked-out pairs are never computed (the work is Σ_sets n_q·n_k·d instead of L²·d).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

namespace {

using pyssl_cpu::fast_exp;
using pyssl_cpu::gemm;
using pyssl_cpu::transpose;

struct Set {
  std::vector<int64_t> q;                        // query token indices
  std::shared_ptr<const std::vector<int64_t>> k;  // key token indices, ascending (shared by a
                                                  // set's query chunks: gathered once per segment)
};

// One set's score blocks (S, and dP, T in the backward) stay under kSetScores elements per
// thread (256 KB each in float32, so the three stay in L2 between the products that use them)
// or 64 query rows, whichever is more: a set with more queries is cut into query chunks that
// share its gathered keys, so long rows without groups (one set of L×L) never hold L² floats,
// and a chunk keeps 64 rows as the inner dimension of the dK, dV products. Measured at
// B = H = 1, d = 64, forward+backward, against 2^20-score blocks on one thread: L = 2048
// without groups 71 -> 43 ms, top-k 16 at L = 1024 33 -> 21 ms, L = 4096 in 4 groups
// 50 -> 47 ms (2^15: slightly slower); against 8-row chunks at long L on two threads:
// L = 8192 510 -> 383 ms, L = 16384 1988 -> 1638 ms (32 rows: 386, 1718 ms).
constexpr int64_t kSetScores = int64_t(1) << 16;
constexpr int64_t kMinChunkRows = 64;

// The ranges to cut: the thread count, or 1 when called inside a parallel region (parallel_for
// then runs serially, and T ranges would only cut the sets finer and hold T partial buffers).
int64_t threads_here() {
  return at::in_parallel_region() ? 1 : at::get_num_threads();
}

// Adds q × k as a set, cut into query chunks of max(kSetScores / nk, kMinChunkRows) rows, or
// fewer (8 at least) to keep a chunk under `cap` scores.
void add_set(std::vector<Set>& out, const std::vector<int64_t>& q, std::vector<int64_t> k, double cap) {
  const int64_t nk = std::max<int64_t>((int64_t)k.size(), 1);
  int64_t rows = std::max(kMinChunkRows, kSetScores / nk);
  if ((double)rows * (double)nk > cap) rows = std::max<int64_t>(8, (int64_t)(cap / (double)nk));
  const size_t per = (size_t)rows;
  auto keys = std::make_shared<const std::vector<int64_t>>(std::move(k));
  for (size_t i = 0; i < q.size(); i += per) {
    Set s;
    s.q.assign(q.begin() + i, q.begin() + std::min(q.size(), i + per));
    s.k = keys;
    out.push_back(std::move(s));
  }
}

// Every batch row's sets (query chunks of the blocks above). With T > 1 threads a chunk is also
// kept under a quarter of a thread's share of the work (B·H·Σ n_q·n_k / 4T scores), so that the
// ranges of make_schedule can be cut evenly: one image's single set (no groups) or a batch
// slightly above a multiple of T is shared out; a batch of B·H ≥ 4T short rows is not cut.
std::vector<std::vector<Set>> build_sets(const c10::optional<at::Tensor>& groups, int64_t B, int64_t H,
                                         int64_t L, int64_t T) {
  struct Block {
    std::vector<int64_t> q, k;
  };
  std::vector<std::vector<Block>> blocks(B);
  std::vector<int64_t> all(L);
  std::iota(all.begin(), all.end(), 0);
  const int64_t* g = groups.has_value() ? groups->data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    if (!g) {
      blocks[b].push_back({all, all});
      continue;
    }
    const int64_t* gb = g + b * L;
    std::vector<int64_t> globals;
    std::vector<std::pair<int64_t, int64_t>> members;   // (group, token)
    for (int64_t t = 0; t < L; ++t) {
      if (gb[t] < 0) globals.push_back(t);
      else members.emplace_back(gb[t], t);
    }
    std::sort(members.begin(), members.end());
    for (size_t i = 0; i < members.size();) {
      size_t j = i;
      std::vector<int64_t> q;
      while (j < members.size() && members[j].first == members[i].first) q.push_back(members[j++].second);
      std::vector<int64_t> k(q.size() + globals.size());
      std::merge(q.begin(), q.end(), globals.begin(), globals.end(), k.begin());
      blocks[b].push_back({std::move(q), std::move(k)});
      i = j;
    }
    if (!globals.empty()) blocks[b].push_back({globals, all});
  }
  double total = 0;
  for (const auto& row : blocks)
    for (const Block& blk : row) total += (double)blk.q.size() * (double)blk.k.size();
  const double cap = T > 1 ? total * (double)H / (4.0 * (double)T) : std::numeric_limits<double>::infinity();
  std::vector<std::vector<Set>> sets(B);
  for (int64_t b = 0; b < B; ++b)
    for (Block& blk : blocks[b]) add_set(sets[b], blk.q, std::move(blk.k), cap);
  return sets;
}

// Thread t takes the (batch·head, set) pairs from first[t] up to first[t + 1] (exclusive), in
// order: first[0] = (0, 0), first[T] = (B·H, 0); cut before the pair where the running work
// passes t/T of the total (a range may be empty).
struct Schedule {
  std::vector<std::pair<int64_t, size_t>> first;
};

double set_work(const Set& st) {
  const double nq = (double)st.q.size(), nk = (double)st.k->size();
  return nq * nk + nq + nk;
}

Schedule make_schedule(const std::vector<std::vector<Set>>& sets, int64_t H, int64_t BH, int64_t T) {
  std::vector<double> row_work(sets.size(), 0.0);
  double total = 0;
  for (size_t b = 0; b < sets.size(); ++b) {
    for (const Set& st : sets[b]) row_work[b] += set_work(st);
    total += row_work[b] * (double)H;
  }
  Schedule sc;
  sc.first.assign(T + 1, {BH, 0});
  sc.first[0] = {0, 0};
  int64_t t = 1;
  double cum = 0;
  for (int64_t bh = 0; bh < BH && t < T; ++bh) {
    const auto& row = sets[bh / H];
    if (cum + row_work[bh / H] < total * (double)t / (double)T) {   // no cut inside this row
      cum += row_work[bh / H];
      continue;
    }
    for (size_t si = 0; si < row.size(); ++si) {
      while (t < T && cum >= total * (double)t / (double)T) sc.first[t++] = {bh, si};
      cum += set_work(row[si]);
    }
  }
  return sc;
}

// The sets and the threads' ranges of one call (forward and backward build the same).
struct Plan {
  std::vector<std::vector<Set>> sets;
  Schedule sched;
  int64_t T;
};

Plan make_plan(const c10::optional<at::Tensor>& groups, int64_t B, int64_t H, int64_t L) {
  Plan p;
  p.T = threads_here();
  p.sets = build_sets(groups, B, H, L, p.T);
  p.sched = make_schedule(p.sets, H, B * H, p.T);
  return p;
}

// Calls f(bh, s0, s1) for each (batch, head) segment of thread t's range: sets [s0, s1) of bh.
template <typename F>
void for_segments(const Schedule& sc, const std::vector<std::vector<Set>>& sets, int64_t H, int64_t t, F&& f) {
  auto [bh, si] = sc.first[t];
  const auto [bh_end, si_end] = sc.first[t + 1];
  for (; bh < bh_end || (bh == bh_end && si < si_end); ++bh, si = 0) {
    const size_t s1 = bh == bh_end ? si_end : sets[bh / H].size();
    f(bh, si, s1);
  }
}

template <typename scalar_t, typename acc_t>
void gather(const scalar_t* src, const std::vector<int64_t>& idx, int64_t d, acc_t* dst) {
  for (size_t i = 0; i < idx.size(); ++i) {
    const scalar_t* r = src + idx[i] * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) dst[i * d + c] = (acc_t)r[c];
  }
}


// Scores as integers in the same order (IEEE sign-magnitude to two's complement): int32 for
// float, int64 for double. -0.0 ranks with +0.0 and every NaN as the positive quiet NaN, above
// +inf, as torch.sort ranks NaN (a kept NaN then makes the row's output NaN, as in the reference,
// instead of a NaN score being silently dropped).
template <typename acc_t>
using key_of = typename std::conditional<std::is_same<acc_t, double>::value, int64_t, int32_t>::type;

template <typename acc_t>
inline key_of<acc_t> ordered_key(acc_t x) {
  using K = key_of<acc_t>;
  x = std::isnan(x) ? std::numeric_limits<acc_t>::quiet_NaN() : x + acc_t(0);
  K b;
  std::memcpy(&b, &x, sizeof b);
  return b ^ ((b >> (8 * sizeof(K) - 1)) & std::numeric_limits<K>::max());
}

// kept[j] for one row of nk scores: the topk highest (ties to the lower position j, which is
// the lower key index: the set's keys are ascending). A bisection over the integer keys for
// the largest t with count(key >= t) >= topk, counting with SIMD compares (no data-dependent
// branches: nth_element's mispredicted ones cost ~1.4 us per 197-key row, 4x the row's
// attention), stopping as soon as a count is exactly topk (then no tie straddles t). Otherwise
// t is the K-th largest key: keys above it are kept and the first topk − (count above) equal.
template <typename acc_t>
void topk_row(const acc_t* s, int64_t nk, int64_t topk, std::vector<key_of<acc_t>>& keys,
              std::vector<uint8_t>& kept) {
  using K = key_of<acc_t>;
  using U = typename std::make_unsigned<K>::type;
  kept.assign(nk, 0);
  if (topk >= nk) { std::fill(kept.begin(), kept.end(), 1); return; }
  keys.resize(nk);
  K* kp = keys.data();
  K lo = std::numeric_limits<K>::max(), hi = std::numeric_limits<K>::lowest();
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t j = 0; j < nk; ++j) {
    const K key = ordered_key(s[j]);
    kp[j] = key;
    lo = key < lo ? key : lo;
    hi = key > hi ? key : hi;
  }
  // count(key >= lo) = nk > topk; count(key >= hi + 1) = 0 < topk
  bool exact = false;
  while (lo < hi) {
    const U span = (U)hi - (U)lo;
    const K mid = (K)((U)lo + (span >> 1) + (span & 1));   // lo < mid <= hi, no overflow
    int32_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < nk; ++j) c += (int32_t)(kp[j] >= mid);
    if (c >= topk) {
      lo = mid;
      if (c == topk) { exact = true; break; }
    } else {
      hi = mid - 1;
    }
  }
  uint8_t* kd = kept.data();
  if (exact) {
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) kd[j] = kp[j] >= lo;
    return;
  }
  int32_t above = 0;
#pragma omp simd reduction(+ : above)
  for (int64_t j = 0; j < nk; ++j) {
    kd[j] = kp[j] > lo;
    above += (int32_t)kd[j];
  }
  for (int64_t j = 0, need = topk - above; j < nk && need > 0; ++j)
    if (kp[j] == lo) { kd[j] = 1; --need; }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const c10::optional<at::Tensor>& groups,
                                                            int64_t topk, double scale_d) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3);
  const int64_t nbytes = (L + 7) / 8;
  auto acc_type = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, L}, q.options().dtype(acc_type));
  auto keep = topk > 0 ? at::zeros({B, H, L, nbytes}, q.options().dtype(at::kByte))
                       : at::empty({0}, q.options().dtype(at::kByte));
  const Plan plan = make_plan(groups, B, H, L);
  const auto& sets = plan.sets;
  const Schedule& sched = plan.sched;
  const int64_t T = plan.T;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = static_cast<acc_t*>(lse.data_ptr());
  uint8_t* bits = topk > 0 ? keep.data_ptr<uint8_t>() : nullptr;
  const acc_t scale = (acc_t)scale_d;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();   // constexpr: not captured, a constant in the loops

  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Q, K, KT, V, S, O;
    std::vector<key_of<acc_t>> keys_buf;
    std::vector<uint8_t> kept;
    for (int64_t t = begin; t < end; ++t) for_segments(sched, sets, H, t, [&](int64_t bh, size_t s0, size_t s1) {
      const int64_t b = bh / H;
      const int64_t base = bh * L * d;
      const std::vector<int64_t>* have = nullptr;   // the keys K, V hold
      for (size_t si = s0; si < s1; ++si) {
        const Set& st = sets[b][si];
        const std::vector<int64_t>& keys = *st.k;
        const int64_t nq = (int64_t)st.q.size(), nk = (int64_t)keys.size();
        Q.resize(nq * d); K.resize(nk * d); KT.resize(nk * d); V.resize(nk * d); S.resize(nq * nk); O.resize(nq * d);
        gather(qp + base, st.q, d, Q.data());
        if (have != &keys) {
          have = &keys;
          gather(kp + base, keys, d, K.data());
          gather(vp + base, keys, d, V.data());
          transpose(K.data(), nk, d, KT.data());
        }
        gemm(nq, nk, d, Q.data(), d, KT.data(), nk, S.data(), nk);
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* s = S.data() + i * nk;
          const int64_t qi = st.q[i];
#pragma omp simd
          for (int64_t j = 0; j < nk; ++j) s[j] *= scale;
          if (topk > 0) {
            topk_row(s, nk, topk, keys_buf, kept);
            uint8_t* row_bits = bits + (bh * L + qi) * nbytes;
            const uint8_t* kd = kept.data();
            for (int64_t j = 0; j < nk; ++j) row_bits[keys[j] >> 3] |= (uint8_t)(kd[j] << (keys[j] & 7));
#pragma omp simd
            for (int64_t j = 0; j < nk; ++j) s[j] = kd[j] ? s[j] : ninf;
          }
          acc_t m = ninf;
#pragma omp simd reduction(max : m)
          for (int64_t j = 0; j < nk; ++j) m = s[j] > m ? s[j] : m;
          if (m == ninf) {
            // the max skips NaN: a row of NaN scores is poisoned (NaN output and lse, as in the
            // reference), not taken for a row without kept keys (a zero row of P, a zero output)
            bool nan = false;
            for (int64_t j = 0; j < nk; ++j) nan |= std::isnan(s[j]);
            std::fill(s, s + nk, nan ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0));
            lp[bh * L + qi] = nan ? std::numeric_limits<acc_t>::quiet_NaN() : ninf;
            continue;
          }
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < nk; ++j) { s[j] = fast_exp(s[j] - m); sum += s[j]; }
          const acc_t inv = acc_t(1) / sum;
#pragma omp simd
          for (int64_t j = 0; j < nk; ++j) s[j] *= inv;
          lp[bh * L + qi] = m + std::log(sum);
        }
        gemm(nq, d, nk, S.data(), nk, V.data(), d, O.data(), d);   // O = P · V
        for (int64_t i = 0; i < nq; ++i) {
          scalar_t* o = op + base + st.q[i] * d;
          for (int64_t c = 0; c < d; ++c) o[c] = (scalar_t)O[i * d + c];
        }
      }
    });
  });
  return {out, lse, keep};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& dout, const at::Tensor& lse, const c10::optional<at::Tensor>& groups,
    const at::Tensor& keep, int64_t topk, double scale_d) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3);
  const int64_t nbytes = (L + 7) / 8;
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const Plan plan = make_plan(groups, B, H, L);
  const auto& sets = plan.sets;
  const Schedule& sched = plan.sched;
  const int64_t T = plan.T;
  // the dK, dV of a (batch, head) cut between threads: one buffer (2·L·d) per thread and cut
  // (at most two per thread: its first and last segment), summed after the parallel loop
  struct Partial { int64_t bh; std::unique_ptr<acc_t[]> buf; };
  std::vector<std::vector<Partial>> partials(T);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
  const scalar_t *outp = out.data_ptr<scalar_t>(), *dop = dout.data_ptr<scalar_t>();
  scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
  const acc_t* lp = static_cast<acc_t*>(lse.data_ptr());
  const uint8_t* bits = topk > 0 ? keep.data_ptr<uint8_t>() : nullptr;
  const acc_t scale = (acc_t)scale_d;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();   // constexpr: not captured, a constant in the loops

  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Q, K, KT, V, VT, DO, S, DP, Tr, G, delta, own;   // own: dK, dV of a whole (b, h)
    std::vector<int32_t> kept32(bits ? nbytes * 8 : 0);
    for (int64_t t = begin; t < end; ++t) for_segments(sched, sets, H, t, [&](int64_t bh, size_t s0, size_t s1) {
      const int64_t b = bh / H;
      const int64_t base = bh * L * d;
      const bool whole = s0 == 0 && s1 == sets[b].size();
      acc_t* dK;
      if (whole) {
        own.resize((size_t)2 * L * d);
        dK = own.data();
      } else {
        partials[t].push_back({bh, std::unique_ptr<acc_t[]>(new acc_t[(size_t)2 * L * d])});
        dK = partials[t].back().buf.get();
      }
      acc_t* dV = dK + L * d;
      std::fill(dK, dK + 2 * L * d, acc_t(0));
      const std::vector<int64_t>* have = nullptr;   // the keys K, V hold
      for (size_t si = s0; si < s1; ++si) {
        const Set& st = sets[b][si];
        const std::vector<int64_t>& keys = *st.k;
        const int64_t nq = (int64_t)st.q.size(), nk = (int64_t)keys.size();
        Q.resize(nq * d); K.resize(nk * d); KT.resize(nk * d); V.resize(nk * d); VT.resize(nk * d);
        DO.resize(nq * d); S.resize(nq * nk); DP.resize(nq * nk); Tr.resize(nq * nk);
        G.resize(std::max(nq, nk) * d); delta.resize(nq);
        gather(qp + base, st.q, d, Q.data());
        if (have != &keys) {
          have = &keys;
          gather(kp + base, keys, d, K.data());
          gather(vp + base, keys, d, V.data());
          transpose(K.data(), nk, d, KT.data());
          transpose(V.data(), nk, d, VT.data());
        }
        gather(dop + base, st.q, d, DO.data());
        for (int64_t i = 0; i < nq; ++i) {
          const scalar_t* orow = outp + base + st.q[i] * d;
          const acc_t* dorow = DO.data() + i * d;
          acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < d; ++c) acc += dorow[c] * (acc_t)orow[c];
          delta[i] = acc;
        }
        gemm(nq, nk, d, Q.data(), d, KT.data(), nk, S.data(), nk);      // scores, as in the forward
        gemm(nq, nk, d, DO.data(), d, VT.data(), nk, DP.data(), nk);    // dP = dO · Vᵀ
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* s = S.data() + i * nk;             // scores -> P
          const acc_t* dp = DP.data() + i * nk;
          const int64_t qi = st.q[i];
          const acc_t l = lp[bh * L + qi];
          if (l == ninf) { std::fill(s, s + nk, acc_t(0)); std::fill(DP.data() + i * nk, DP.data() + (i + 1) * nk, acc_t(0)); continue; }
          if (bits) {
            const uint8_t* row_bits = bits + (bh * L + qi) * nbytes;
            const int64_t* kj = keys.data();
            const acc_t sc = scale;   // a local: the captured reference's load stops the vectorizer
            const int64_t b0 = kj[0] >> 3, b1 = kj[nk - 1] >> 3;   // keys ascending
            if (b1 - b0 < nk) {
              // the bytes the keys span unpacked to one int32 per token, then read through the
              // key indices (a vector gather; bit extraction per key ran scalar, ~1/4 of the
              // backward at L = 197): when the span is no wider than 8 tokens per key
              int32_t* kb = kept32.data();
              for (int64_t bb = b0; bb <= b1; ++bb) {
                const int32_t byte = row_bits[bb];
                for (int tt = 0; tt < 8; ++tt) kb[8 * bb + tt] = (byte >> tt) & 1;
              }
#pragma omp simd
              for (int64_t j = 0; j < nk; ++j) s[j] = kb[kj[j]] ? s[j] * sc : ninf;
            } else {   // few keys spread over a long row (many small groups)
              for (int64_t j = 0; j < nk; ++j) s[j] = (row_bits[kj[j] >> 3] >> (kj[j] & 7)) & 1 ? s[j] * sc : ninf;
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < nk; ++j) s[j] *= scale;
          }
          acc_t* ds = DP.data() + i * nk;           // dP -> dS = P (dP − delta)
          const acc_t di = delta[i];
#pragma omp simd
          for (int64_t j = 0; j < nk; ++j) {
            const acc_t p = fast_exp(s[j] - l);
            s[j] = p;
            ds[j] = p * (dp[j] - di);
          }
        }
        // dV[k_j] += Σ_i P_ij dO_i
        transpose(S.data(), nq, nk, Tr.data());
        gemm(nk, d, nq, Tr.data(), nq, DO.data(), d, G.data(), d);
        for (int64_t j = 0; j < nk; ++j) {
          acc_t* dvr = dV + keys[j] * d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) dvr[c] += G[j * d + c];
        }
        // dQ_i = scale Σ_j dS_ij k_j
        gemm(nq, d, nk, DP.data(), nk, K.data(), d, G.data(), d);
        for (int64_t i = 0; i < nq; ++i) {
          scalar_t* dqr = dqp + base + st.q[i] * d;
          for (int64_t c = 0; c < d; ++c) dqr[c] = (scalar_t)(scale * G[i * d + c]);
        }
        // dK[k_j] += scale Σ_i dS_ij q_i
        transpose(DP.data(), nq, nk, Tr.data());
        gemm(nk, d, nq, Tr.data(), nq, Q.data(), d, G.data(), d);
        for (int64_t j = 0; j < nk; ++j) {
          acc_t* dkr = dK + keys[j] * d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) dkr[c] += scale * G[j * d + c];
        }
      }
      if (whole) {
        for (int64_t x = 0; x < L * d; ++x) {
          dkp[base + x] = (scalar_t)dK[x];
          dvp[base + x] = (scalar_t)dV[x];
        }
      }
    });
  });
  // the (batch, head) rows cut between threads: their buffers summed in thread order
  // (deterministic for a given thread count)
  std::vector<std::vector<const acc_t*>> cut(B * H);
  std::vector<int64_t> cut_rows;
  for (int64_t t = 0; t < T; ++t)
    for (const Partial& p : partials[t]) {
      if (cut[p.bh].empty()) cut_rows.push_back(p.bh);
      cut[p.bh].push_back(p.buf.get());
    }
  const int64_t n = L * d;
  at::parallel_for(0, (int64_t)cut_rows.size() * L, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sk(d), sv(d);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = cut_rows[r / L], off = (r % L) * d;
      std::fill(sk.begin(), sk.end(), acc_t(0));
      std::fill(sv.begin(), sv.end(), acc_t(0));
      for (const acc_t* buf : cut[bh]) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) { sk[c] += buf[off + c]; sv[c] += buf[n + off + c]; }
      }
      for (int64_t c = 0; c < d; ++c) {
        dkp[bh * n + off + c] = (scalar_t)sk[c];
        dvp[bh * n + off + c] = (scalar_t)sv[c];
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> homologous_attention_fwd_cpu(
    at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> groups, int64_t topk, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v must be (B, H, L, d) alike");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  if (groups.has_value())
    TORCH_CHECK(groups->dtype() == at::kLong && groups->is_contiguous() && groups->size(0) == q.size(0) &&
                groups->size(1) == q.size(2), "groups must be contiguous int64 (B, L)");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "homologous_attention_fwd_cpu", [&] {
    r = forward_impl<scalar_t>(q, k, v, groups, topk, scale);
  });
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> homologous_attention_bwd_cpu(
    at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out, at::Tensor dout, at::Tensor lse,
    c10::optional<at::Tensor> groups, at::Tensor keep, int64_t topk, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes() && q.sizes() == out.sizes() &&
              q.sizes() == dout.sizes(), "q, k, v, out, dout must be (B, H, L, d) alike");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous() &&
              dout.is_contiguous() && lse.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(), "out/dout dtype must match q");
  TORCH_CHECK(lse.scalar_type() == (q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat), "lse dtype");
  if (topk > 0) TORCH_CHECK(keep.dtype() == at::kByte && keep.numel() == q.size(0) * q.size(1) * q.size(2) * ((q.size(2) + 7) / 8), "keep bitmask shape");
  std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "homologous_attention_bwd_cpu", [&] {
    r = backward_impl<scalar_t>(q, k, v, out, dout, lse, groups, keep, topk, scale);
  });
  return r;
}
