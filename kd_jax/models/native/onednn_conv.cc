// oneDNN convolutions (NHWC activations, HWIO kernels, float32) as XLA FFI handlers:
// the forward, the input gradient and the kernel gradient of one 2-D convolution.
// `kd_jax.models.onednn` compiles this file on first use and registers the handlers.
// Primitives are made once per geometry (oneDNN picks its own kernel layout; the
// kernel is reordered into it on each call, which costs a kernel-sized copy).
#include <array>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include "xla/ffi/api/ffi.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace ffi = xla::ffi;
namespace {
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;
using Key = std::array<int64_t, 14>;

dnnl::engine& Engine() { static dnnl::engine e(dnnl::engine::kind::cpu, 0); return e; }

struct Geometry {
  dnnl::memory::dims src, wei, dst, strides, pad_l, pad_r;
  Key key;
};

Geometry Make(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
              int64_t sh, int64_t sw, int64_t ph0, int64_t ph1, int64_t pw0, int64_t pw1) {
  return Geometry{{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]}, {y[0], y[3], y[1], y[2]},
                  {sh, sw}, {ph0, pw0}, {ph1, pw1},
                  Key{x[0], x[1], x[2], x[3], w[0], w[1], w[2], w[3], sh, sw, ph0, ph1, pw0, pw1}};
}

dnnl::memory::desc Act(const dnnl::memory::dims& d) { return {d, dt::f32, tag::nhwc}; }
dnnl::memory::desc UserWei(const dnnl::memory::dims& d) { return {d, dt::f32, tag::hwio}; }
dnnl::memory::desc AnyWei(const dnnl::memory::dims& d) { return {d, dt::f32, tag::any}; }

dnnl::convolution_forward::primitive_desc FwdPd(const Geometry& g) {
  return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          Act(g.src), AnyWei(g.wei), Act(g.dst), g.strides, g.pad_l, g.pad_r};
}

struct Prims {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_wei_pd;
  dnnl::convolution_backward_weights bwd_wei;
  dnnl::memory fwd_wei, bwd_data_wei, bwd_wei_out;  // weights in each primitive's layout
};

std::mutex mu;  // one oneDNN call at a time: each uses all cores through OpenMP

Prims& Get(const Geometry& g) {
  static std::map<Key, std::unique_ptr<Prims>> cache;
  auto& p = cache[g.key];
  if (!p) {
    auto fwd_pd = FwdPd(g);
    dnnl::convolution_backward_data::primitive_desc bd(
        Engine(), dnnl::algorithm::convolution_direct, Act(g.src), AnyWei(g.wei), Act(g.dst),
        g.strides, g.pad_l, g.pad_r, fwd_pd);
    dnnl::convolution_backward_weights::primitive_desc bw(
        Engine(), dnnl::algorithm::convolution_direct, Act(g.src), AnyWei(g.wei), Act(g.dst),
        g.strides, g.pad_l, g.pad_r, fwd_pd);
    p.reset(new Prims{fwd_pd, dnnl::convolution_forward(fwd_pd), bd,
                      dnnl::convolution_backward_data(bd), bw,
                      dnnl::convolution_backward_weights(bw),
                      dnnl::memory(fwd_pd.weights_desc(), Engine()),
                      dnnl::memory(bd.weights_desc(), Engine()),
                      dnnl::memory(bw.diff_weights_desc(), Engine())});
  }
  return *p;
}

// Reorders `from` into `to` unless they already share a layout (then returns `from`).
dnnl::memory Into(dnnl::stream& s, dnnl::memory from, dnnl::memory to) {
  if (from.get_desc() == to.get_desc()) return from;
  dnnl::reorder(from, to).execute(s, from, to);
  return to;
}

template <typename T> T* Ptr(const T* p) { return const_cast<T*>(p); }

}  // namespace

#define GEOMETRY_ATTRS \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("ph0").Attr<int64_t>("ph1") \
  .Attr<int64_t>("pw0").Attr<int64_t>("pw1")
using F32 = ffi::Buffer<ffi::F32>;

using Result = ffi::ResultBuffer<ffi::F32>;

// oneDNN reports failures as exceptions, which must not cross into XLA.
template <typename Body>
static ffi::Error Guarded(Body body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
}

// The forward (x -> y) and the input gradient (dy -> dx): activations and the kernel in,
// activations out, the kernel reordered into the primitive's own layout.
template <typename Primitive>
static ffi::Error WithKernel(const Geometry& g, Primitive Prims::*primitive,
                             dnnl::memory Prims::*kernel_layout, F32 kernel, int in_arg,
                             const dnnl::memory::dims& in_dims, const float* in,
                             int out_arg, const dnnl::memory::dims& out_dims, float* out) {
  return Guarded([&] {
    std::lock_guard<std::mutex> lock(mu);
    Prims& p = Get(g);
    dnnl::stream s(Engine());
    dnnl::memory user(UserWei(g.wei), Engine(), Ptr(kernel.typed_data()));
    (p.*primitive).execute(s, {{in_arg, dnnl::memory(Act(in_dims), Engine(), Ptr(in))},
                               {DNNL_ARG_WEIGHTS, Into(s, user, p.*kernel_layout)},
                               {out_arg, dnnl::memory(Act(out_dims), Engine(), out)}});
    s.wait();
  });
}

static ffi::Error Forward(F32 x, F32 w, Result y, int64_t sh, int64_t sw, int64_t ph0,
                          int64_t ph1, int64_t pw0, int64_t pw1) {
  auto g = Make(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, ph0, ph1, pw0, pw1);
  return WithKernel(g, &Prims::fwd, &Prims::fwd_wei, w, DNNL_ARG_SRC, g.src,
                    x.typed_data(), DNNL_ARG_DST, g.dst, y->typed_data());
}

static ffi::Error BackwardData(F32 dy, F32 w, Result dx, int64_t sh, int64_t sw,
                               int64_t ph0, int64_t ph1, int64_t pw0, int64_t pw1) {
  auto g = Make(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, ph0, ph1, pw0, pw1);
  return WithKernel(g, &Prims::bwd_data, &Prims::bwd_data_wei, w, DNNL_ARG_DIFF_DST, g.dst,
                    dy.typed_data(), DNNL_ARG_DIFF_SRC, g.src, dx->typed_data());
}

static ffi::Error BackwardWeights(F32 x, F32 dy, Result dw, int64_t sh, int64_t sw,
                                  int64_t ph0, int64_t ph1, int64_t pw0, int64_t pw1) {
  auto g = Make(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, ph0, ph1, pw0, pw1);
  return Guarded([&] {
    std::lock_guard<std::mutex> lock(mu);
    Prims& p = Get(g);
    dnnl::stream s(Engine());
    dnnl::memory user(UserWei(g.wei), Engine(), dw->typed_data());
    bool direct = p.bwd_wei_out.get_desc() == user.get_desc();
    p.bwd_wei.execute(s, {{DNNL_ARG_SRC, dnnl::memory(Act(g.src), Engine(), Ptr(x.typed_data()))},
                          {DNNL_ARG_DIFF_DST, dnnl::memory(Act(g.dst), Engine(), Ptr(dy.typed_data()))},
                          {DNNL_ARG_DIFF_WEIGHTS, direct ? user : p.bwd_wei_out}});
    if (!direct) dnnl::reorder(p.bwd_wei_out, user).execute(s, p.bwd_wei_out, user);
    s.wait();
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdConvForward, Forward,
    ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() GEOMETRY_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdConvBackwardData, BackwardData,
    ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() GEOMETRY_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdConvBackwardWeights, BackwardWeights,
    ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() GEOMETRY_ATTRS);
