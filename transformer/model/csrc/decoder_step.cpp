// One decoder step of a frozen model (transformer/model/frozen.py), run from C++ instead of Python.
//
// The same ATen calls, in the same order, as _FrozenDecoder.step for one new position on the CPU (float32):
// what this saves is the Python interpreter between the calls (about 0.5 ms a step at one row on the
// benchmark CPU, a fifth of the step: benchmarks/bench_micro.py --parts overhead). Built on demand by
// transformer/model/native.py with torch.utils.cpp_extension; Python keeps the KV cache (it grows the
// buffers, this writes the new position into them), the output projection and the search.
//
// Shapes: N rows (batch x beams, one new position each), D model width, H heads, Dh = D / H, L cached
// positions before this step, S source length.

#include <torch/extension.h>

#include <optional>
#include <vector>

using at::Tensor;

namespace {

// frozen._Dense's forms below oneDNN's threshold: one row as row blocks (baddbmm), 2..column_rows rows as
// the transposed product W x^T, otherwise x W_t. The bias is always defined (zeros where the model has none).
struct Dense {
  Tensor weight;    // (out, in)
  Tensor weight_t;  // (in, out)
  Tensor bias;      // (out,)
  Tensor bias_col;  // (out, 1)
  Tensor blocks_w;  // (P, out/P, in) or undefined
  Tensor blocks_b;  // (P, out/P, 1)

  Tensor operator()(const Tensor& x, int64_t column_rows) const {  // (N, in) -> (N, out)
    const int64_t rows = x.size(0);
    if (rows == 1 && blocks_w.defined()) {
      const int64_t p = blocks_w.size(0);
      return at::baddbmm(blocks_b, blocks_w, x.t().expand({p, -1, 1})).view({1, -1});
    }
    if (rows >= 2 && rows <= column_rows) {
      return at::addmm(bias_col, weight, x.t()).t();  // (out, N) -> (N, out), a transposed view
    }
    return at::addmm(bias, x, weight_t);
  }
};

struct Norm {
  Tensor weight, bias;
  double eps;
  Tensor operator()(const Tensor& x) const {
    return at::layer_norm(x, {weight.size(0)}, weight, bias, eps);
  }
};

struct Layer {
  Dense qkv, self_out, cross_q, cross_out, fc1, fc2;
  Norm self_norm, cross_norm, ffn_norm;
  bool cross = false;
};

Dense make_dense(const std::vector<Tensor>& t) {  // weight, weight_t, bias, bias_col[, blocks_w, blocks_b]
  TORCH_CHECK(t.size() == 4 || t.size() == 6, "a dense map takes 4 or 6 tensors");
  Dense d{t[0], t[1], t[2], t[3], Tensor(), Tensor()};
  if (t.size() == 6) {
    d.blocks_w = t[4];
    d.blocks_b = t[5];
  }
  return d;
}

}  // namespace

class DecoderStep {
 public:
  DecoderStep(int64_t n_heads, bool norm_first, bool gelu) : n_heads_(n_heads), norm_first_(norm_first), gelu_(gelu) {}

  void add_layer(const std::vector<std::vector<Tensor>>& dense, const std::vector<Tensor>& norms,
                 const std::vector<double>& eps) {
    // dense: qkv, self_out, fc1, fc2[, cross_q, cross_out]; norms: (weight, bias) of self, ffn[, cross]
    Layer l;
    l.qkv = make_dense(dense.at(0));
    l.self_out = make_dense(dense.at(1));
    l.fc1 = make_dense(dense.at(2));
    l.fc2 = make_dense(dense.at(3));
    l.self_norm = Norm{norms.at(0), norms.at(1), eps.at(0)};
    l.ffn_norm = Norm{norms.at(2), norms.at(3), eps.at(1)};
    l.cross = dense.size() == 6;
    if (l.cross) {
      l.cross_q = make_dense(dense.at(4));
      l.cross_out = make_dense(dense.at(5));
      l.cross_norm = Norm{norms.at(4), norms.at(5), eps.at(2)};
    }
    layers_.push_back(std::move(l));
  }

  // x (N, D): the embedded new position of each row. k_cache[i], v_cache[i]: layer i's buffers (N, H, C, Dh),
  // C > length; this step's keys/values go to position `length`. cross_k[i], cross_v[i]: (N, H, S, Dh).
  // memory_mask: (N, 1, 1, S) bool, true where a source token is real, or none. Returns (N, D), before the
  // final LayerNorm.
  Tensor forward(Tensor x, const std::vector<Tensor>& k_cache, const std::vector<Tensor>& v_cache, int64_t length,
                 const std::vector<Tensor>& cross_k, const std::vector<Tensor>& cross_v,
                 const std::optional<Tensor>& memory_mask, int64_t column_rows) const {
    at::NoGradGuard no_grad;
    const int64_t n = x.size(0), d = x.size(1), h = n_heads_, dh = d / h;
    TORCH_CHECK(k_cache.size() == layers_.size() && v_cache.size() == layers_.size(), "one cache per layer");
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      // self-attention
      Tensor y = norm_first_ ? l.self_norm(x) : x;
      Tensor qkv = l.qkv(y, column_rows).contiguous().view({n, 1, 3, h, dh}).permute({2, 0, 3, 1, 4});
      Tensor q = qkv[0], k = qkv[1], v = qkv[2];  // (N, H, 1, Dh)
      k_cache[i].narrow(2, length, 1).copy_(k);
      v_cache[i].narrow(2, length, 1).copy_(v);
      Tensor a = at::scaled_dot_product_attention(q, k_cache[i].narrow(2, 0, length + 1),
                                                  v_cache[i].narrow(2, 0, length + 1));  // (N, H, 1, Dh)
      Tensor s = l.self_out(a.transpose(1, 2).reshape({n, d}), column_rows);
      x = norm_first_ ? x + s : l.self_norm(x + s);
      // cross-attention
      if (l.cross) {
        y = norm_first_ ? l.cross_norm(x) : x;
        Tensor cq = l.cross_q(y, column_rows).contiguous().view({n, 1, h, dh}).transpose(1, 2);  // (N, H, 1, Dh)
        Tensor c = at::scaled_dot_product_attention(cq, cross_k.at(i), cross_v.at(i), memory_mask);
        s = l.cross_out(c.transpose(1, 2).reshape({n, d}), column_rows);
        x = norm_first_ ? x + s : l.cross_norm(x + s);
      }
      // feed-forward
      y = norm_first_ ? l.ffn_norm(x) : x;
      Tensor f = l.fc1(y, column_rows);
      f = gelu_ ? at::gelu(f) : at::relu(f);
      s = l.fc2(f, column_rows);
      x = norm_first_ ? x + s : l.ffn_norm(x + s);
    }
    return x;
  }

 private:
  int64_t n_heads_;
  bool norm_first_, gelu_;
  std::vector<Layer> layers_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecoderStep>(m, "DecoderStep")
      .def(pybind11::init<int64_t, bool, bool>())
      .def("add_layer", &DecoderStep::add_layer)
      .def("forward", &DecoderStep::forward);
}
