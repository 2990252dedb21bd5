// The one Python module of the extension, pyssl._C. Every op file (csrc/<op>_cpu.cpp,
// csrc/<op>_cuda.cu) defines plain functions; they are declared and bound here only, so the
// extension has a single PYBIND11_MODULE and each op file stays free of pybind.
#include <torch/extension.h>

#include <tuple>

// ---- mlcd_loss_cpu.cpp: the margin-loss engine's chunked CPU backend
// (pyssl/ops/_margin_engine_contract.md, "chunked backends").
std::tuple<at::Tensor, at::Tensor> mlcd_chunk_lse(at::Tensor xhat, at::Tensor w, at::Tensor rw,
                                                  at::Tensor pos_col, double scale,
                                                  at::Tensor buf);
void mlcd_chunk_grad(at::Tensor buf, at::Tensor xhat, at::Tensor w, at::Tensor rw,
                     at::Tensor pos_col, double scale, at::Tensor lse_total, at::Tensor gneg,
                     at::Tensor gpos, at::Tensor dxhat_out, at::Tensor dw_acc,
                     bool accumulate);

// ---- knn_cpu.cpp: exact inner-product top-k (pyssl/ops/knn.py, backend "cpu").
std::tuple<at::Tensor, at::Tensor> knn_topk_cpu(at::Tensor queries, at::Tensor bank, int64_t k,
                                                c10::optional<at::Tensor> bank_bias,
                                                int64_t query_block, int64_t bank_block);

// ---- homologous_attention_cpu.cpp: grouped / top-k attention (pyssl/ops/homologous_attention.py)
std::tuple<at::Tensor, at::Tensor, at::Tensor> homologous_attention_fwd_cpu(
    at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> groups, int64_t topk, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> homologous_attention_bwd_cpu(
    at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out, at::Tensor dout, at::Tensor lse,
    c10::optional<at::Tensor> groups, at::Tensor keep, int64_t topk, double scale);

// ---- homologous_contrastive_loss_cpu.cpp (pyssl/ops/homologous_contrastive_loss.py)
std::tuple<at::Tensor, at::Tensor> homologous_contrastive_fwd_cpu(at::Tensor z, at::Tensor groups,
                                                                  double temperature, double eps);
at::Tensor homologous_contrastive_bwd_cpu(at::Tensor z, at::Tensor groups, at::Tensor lse, at::Tensor grad_rows,
                                          double temperature, double eps);

// ---- noise_cpu.cpp / noise_cuda.cu: counter-based Gaussian noise + normalization
// (pyssl/ops/noise.py, "the counter scheme").
void gaussian_noise_cpu(at::Tensor x, at::Tensor row_src, at::Tensor row_sample,
                        at::Tensor image_ids, at::Tensor a, at::Tensor b, double sigma,
                        int64_t seed, int64_t stream, int64_t C, int64_t HW, bool channels_last,
                        at::Tensor out);
at::Tensor philox4x32_cpu(at::Tensor counters, int64_t k0, int64_t k1);
#ifdef PYSSL_WITH_CUDA
void gaussian_noise_cuda(at::Tensor x, at::Tensor row_src, at::Tensor row_sample,
                         at::Tensor image_ids, at::Tensor a, at::Tensor b, double sigma,
                         int64_t seed, int64_t stream, int64_t C, int64_t HW, bool channels_last,
                         at::Tensor out);
#endif

#define PYSSL_STR2(x) #x
#define PYSSL_STR(x) PYSSL_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyssl compiled kernels (C++/OpenMP CPU kernels, and CUDA kernels where built)";
  // setup.py passes the hash of csrc/ so a stale build is detected at import (pyssl/_srchash.py)
#ifdef PYSSL_SOURCE_HASH
  m.attr("source_hash") = PYSSL_STR(PYSSL_SOURCE_HASH);
#else
  m.attr("source_hash") = py::none();
#endif
#ifdef PYSSL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif

  m.def("homologous_attention_fwd_cpu", &homologous_attention_fwd_cpu,
        "(out, lse, keep bitmask) of grouped / top-k attention; topk = 0: group mode only",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("groups"), py::arg("topk"), py::arg("scale"));
  m.def("homologous_attention_bwd_cpu", &homologous_attention_bwd_cpu,
        "(dq, dk, dv) of grouped / top-k attention from the forward's lse and keep bitmask",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dout"), py::arg("lse"),
        py::arg("groups"), py::arg("keep"), py::arg("topk"), py::arg("scale"));
  m.def("homologous_contrastive_fwd_cpu", &homologous_contrastive_fwd_cpu,
        "(per-token losses (B, L), row log-sum-exp (B, L)) of the homologous contrastive loss",
        py::arg("z"), py::arg("groups"), py::arg("temperature"), py::arg("eps"));
  m.def("homologous_contrastive_bwd_cpu", &homologous_contrastive_bwd_cpu,
        "dz of the homologous contrastive loss from the per-token loss gradients",
        py::arg("z"), py::arg("groups"), py::arg("lse"), py::arg("grad_rows"), py::arg("temperature"),
        py::arg("eps"));
  m.def("gaussian_noise_cpu", &gaussian_noise_cpu,
        "out[r] <- a*(x[row_src[r]] + sigma*z(seed, ids[row_src[r]], row_sample[r], e)) + b in "
        "place; out (R, E) contiguous, (R, HW, C) storage order when channels_last",
        py::arg("x"), py::arg("row_src"), py::arg("row_sample"), py::arg("image_ids"), py::arg("a"),
        py::arg("b"), py::arg("sigma"), py::arg("seed"), py::arg("stream"), py::arg("C"),
        py::arg("HW"), py::arg("channels_last"), py::arg("out"));
  m.def("philox4x32_cpu", &philox4x32_cpu, "Philox4x32-10 words of int64 (n, 4) counters",
        py::arg("counters"), py::arg("k0"), py::arg("k1"));
#ifdef PYSSL_WITH_CUDA
  m.def("gaussian_noise_cuda", &gaussian_noise_cuda, "gaussian_noise_cpu on CUDA tensors",
        py::arg("x"), py::arg("row_src"), py::arg("row_sample"), py::arg("image_ids"), py::arg("a"),
        py::arg("b"), py::arg("sigma"), py::arg("seed"), py::arg("stream"), py::arg("C"),
        py::arg("HW"), py::arg("channels_last"), py::arg("out"));
#endif
  m.def("knn_topk_cpu", &knn_topk_cpu,
        "k largest q.b + bias_b per query, sorted descending, ties to the lower index: "
        "(scores (Q, k) float32, indices (Q, k) int64)",
        py::arg("queries"), py::arg("bank"), py::arg("k"), py::arg("bank_bias") = py::none(),
        py::arg("query_block") = 1024, py::arg("bank_block") = 1024);
  m.def("mlcd_chunk_lse", &mlcd_chunk_lse,
        "buf <- scale*clamp((xhat @ w.T) * rw, -1, 1) with positive columns = -inf (in place); "
        "returns (lse_neg (R,), pos_cos (R, L)), float32",
        py::arg("xhat"), py::arg("w"), py::arg("rw"), py::arg("pos_col"), py::arg("scale"),
        py::arg("buf"));
  m.def("mlcd_chunk_grad", &mlcd_chunk_grad,
        "buf <- G' = rw * G in place from buf's logits; dxhat_out = G' @ w; dw_acc += G'.T @ xhat "
        "(dw_acc = G'.T @ xhat when accumulate is false); an empty 1-D dxhat_out or dw_acc skips that product",
        py::arg("buf"), py::arg("xhat"), py::arg("w"), py::arg("rw"), py::arg("pos_col"),
        py::arg("scale"), py::arg("lse_total"), py::arg("gneg"), py::arg("gpos"),
        py::arg("dxhat_out"), py::arg("dw_acc"), py::arg("accumulate"));
}
