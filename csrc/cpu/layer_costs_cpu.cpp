// Layer cost matrices, CPU kernels (forward and fused backward) of
//   bert_emd::layer_costs_fwd / bert_emd::layer_costs_bwd   (schemas in csrc/ops.cpp).
//
// Maths. Student layers S_1..S_M and teacher layers T_1..T_N share one shape [B, ...]. With
// w[e] in {0,1} the token mask of element e (1 everywhere without a mask), f(x) = 0 if x <= floor
// else x (identity without an attention floor) and n = sum_e w[e]:
//   forward   D_ij    = (1/n) sum_e w[e] (f(S_i[e]) - f(T_j[e]))^2
//   backward  dS_i[e] = (2/n) w[e] [S_i[e] > floor] (f(S_i[e]) sum_j G_ij - sum_j G_ij f(T_j[e]))
//             dT_j[e] = (2/n) w[e] [T_j[e] > floor] (f(T_j[e]) sum_i G_ij - sum_i G_ij f(S_i[e]))
// per_sample: the same per batch element b, with n_b and G_b.
//
// Layout. Every layer is read through its strides as a canonical [B, D1, D2, D3] view: without
// a mask, adjacent dims that are contiguous on every layer are merged (a contiguous input becomes
// one flat run; without per_sample the batch dim is merged too); with a mask the view is
// [B,1,1,L] (2-d input), [B,1,L,d] (hidden states: query mask on D2) or [B,H,L,L] (attention:
// query mask on D2, key mask on D3). Only two cases copy an input: the layers of one side have
// different strides (non-contiguous layers of that side are made contiguous), or more than three
// non-mergeable dims remain after merging.
//
// Work split. The elements of each sample are cut into tiles of kTile; at::parallel_for runs over
// the B x tiles grid. Forward: each tile walks its rows, skips query-masked rows without reading
// them, and packs up to kChunk elements of every layer into fp32 (fp64 for float64 inputs)
// buffers (dtype conversion, strides, floor and key mask applied once per element and layer);
// rows of float (double) with unit stride and no key mask are read in place in runs of kDirect,
// the floor applied in registers. All M*N pair sums are computed with 4x4 register blocks, so
// each element of each layer comes from memory once and is reused M (or N) times from cache.
// Lanes accumulate at most kChunk/8 squares in fp32 before they are added to a double per pair
// and tile; tile partials are reduced in a fixed order (deterministic for any thread count).
// Differences are formed directly (no |s|^2 + |t|^2 - 2 s.t cancellation).
//
// Backward: per chunk of kChunk elements (read in place or packed as above, padded rows as
// zeros), dS_i = S_i rowG_i - sum_j G_ij T_j in 4-row register blocks (each T_j vector loaded
// once per block), likewise dT_j, then scaled, masked and stored in the input dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

// The hot loops are compiled for AVX-512, AVX2+FMA and the baseline ISA and picked at load time
// (setup.py builds for the baseline; these loops are 3-4x faster with wide vectors). `flatten`
// inlines the templates below into each clone so they are compiled for its ISA too.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BERT_EMD_LC_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define BERT_EMD_LC_CLONES
#endif

namespace bert_emd {
namespace {

constexpr int64_t kChunk = 512;   // elements per layer packed at once (16 layers: 32 KB fp32)
constexpr int64_t kDirect = 8192; // elements per layer of an in-place run (16 layers: 512 KB fp32)
constexpr int64_t kTile = 32768;  // elements per sample and parallel task

// Vectors are only passed between always-inlined functions of this file: the ABI note that
// gcc attaches to 32-byte vector arguments does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// 32-byte vectors (8 floats / 4 doubles) of GCC's vector extension: explicit lanes keep the
// 4x4 accumulator block in registers, which gcc's auto-vectoriser does not manage here.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int lanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int lanes = 4;
};

template <typename acc_t>
__attribute__((always_inline)) inline typename Vec<acc_t>::type vload(const acc_t* p) {
  typename Vec<acc_t>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename acc_t>
__attribute__((always_inline)) inline void vstore(acc_t* p, const typename Vec<acc_t>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

// ------------------------------------------------------------------------------------ geometry
enum DtypeCode : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct Side {
  std::vector<at::Tensor> keep;  // copies made, if any (keeps their storage alive)
  std::vector<const char*> ptr;  // per-layer data pointers
  int dtype = kF32;
  int64_t elsize = 4;
  int64_t st[4] = {0, 0, 0, 0};  // element strides of the canonical [B, D1, D2, D3] view
};

struct Geometry {
  int64_t B = 0, D1 = 1, D2 = 1, D3 = 1, len = 0;  // len = D1*D2*D3 elements per sample
  bool mask_q = false, mask_k = false;
  int64_t L = 0;
  std::vector<uint8_t> mask;      // [B_orig, L] 0/1
  std::vector<double> count;      // n_b per canonical sample (or one entry: the total)
  bool has_floor = false;
  double floor = 0.0;
  bool acc_double = false;
};

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return -1;
  }
}

// Validates one side (all layers: defined, CPU, a supported dtype shared by the side, the shape
// `ref`) and returns its layers, with non-contiguous ones copied when strides differ.
std::vector<at::Tensor> check_side(const char* name, at::TensorList xs, at::IntArrayRef ref,
                                   const char* ref_name) {
  TORCH_CHECK_VALUE(!xs.empty(), "layer_costs: ", name,
                    " must hold at least one layer tensor [B, ...], got an empty list");
  std::vector<at::Tensor> out(xs.begin(), xs.end());
  for (size_t i = 0; i < out.size(); ++i) {
    const at::Tensor& x = out[i];
    TORCH_CHECK_VALUE(x.defined(), "layer_costs: ", name, "[", i, "] is an undefined tensor");
    TORCH_CHECK_VALUE(x.device().is_cpu(), "layer_costs (cpu backend): ", name, "[", i,
                      "] must be a CPU tensor, got device ", x.device());
    TORCH_CHECK_VALUE(dtype_code(x.scalar_type()) >= 0, "layer_costs: ", name, "[", i,
                      "] must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK_VALUE(x.scalar_type() == out[0].scalar_type(), "layer_costs: every ", name,
                      " layer must have one dtype: ", name, "[0] is ", out[0].scalar_type(), " but ",
                      name, "[", i, "] is ", x.scalar_type());
    TORCH_CHECK_VALUE(x.dim() >= 1 && x.sizes().equals(ref), "layer_costs: ", name, "[", i,
                      "] must have the shape ", shape_str(ref), " of ", ref_name, ", got ",
                      shape_str(x.sizes()));
  }
  // One stride vector per side (size-1 dims do not count); otherwise copy the odd layers.
  auto same_strides = [&](const at::Tensor& a, const at::Tensor& b) {
    for (int64_t d = 0; d < a.dim(); ++d)
      if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
    return true;
  };
  bool uniform = true;
  for (const auto& x : out) uniform = uniform && same_strides(x, out[0]);
  if (!uniform)
    for (auto& x : out) x = x.contiguous();
  return out;
}

// Per-layer data pointers and the dtype of one side (strides are set by prepare()).
void fill_side(Side& side, const std::vector<at::Tensor>& xs) {
  side.dtype = dtype_code(xs[0].scalar_type());
  side.elsize = static_cast<int64_t>(xs[0].element_size());
  side.ptr.clear();
  for (const auto& x : xs) side.ptr.push_back(static_cast<const char*>(x.data_ptr()));
}

// Merge adjacent dims of [B, d1..dk] that are contiguous on both sides (row-major order kept,
// so the flat index of the view is the flat index of a contiguous tensor of the input shape).
// Returns false if more than `max_dims` dims remain.
bool coalesce(at::IntArrayRef sizes, at::IntArrayRef s0, at::IntArrayRef s1, int64_t first,
              int max_dims, std::vector<int64_t>& size_out, std::vector<int64_t>& st0,
              std::vector<int64_t>& st1) {
  size_out.clear(); st0.clear(); st1.clear();
  for (int64_t d = first; d < static_cast<int64_t>(sizes.size()); ++d) {
    if (sizes[d] == 1) continue;
    if (!size_out.empty() && st0.back() == s0[d] * sizes[d] && st1.back() == s1[d] * sizes[d]) {
      size_out.back() *= sizes[d];
      st0.back() = s0[d];
      st1.back() = s1[d];
    } else {
      size_out.push_back(sizes[d]);
      st0.push_back(s0[d]);
      st1.push_back(s1[d]);
    }
  }
  return static_cast<int>(size_out.size()) <= max_dims;
}

// Validates everything and builds the canonical view of both sides.
Geometry prepare(at::TensorList student_in, at::TensorList teacher_in,
                 const std::optional<at::Tensor>& mask_in, bool per_sample,
                 std::optional<double> attention_floor, Side& S, Side& T) {
  TORCH_CHECK_VALUE(!student_in.empty(), "layer_costs: student must hold at least one layer tensor "
                    "[B, ...], got an empty list");
  TORCH_CHECK_VALUE(student_in[0].defined(), "layer_costs: student[0] is an undefined tensor");
  TORCH_CHECK_VALUE(student_in[0].dim() >= 1, "layer_costs: student[0] must have shape [B, ...] "
                    "(at least 1 dim), got a 0-dim tensor");
  const std::vector<int64_t> ref = student_in[0].sizes().vec();
  std::vector<at::Tensor> s = check_side("student", student_in, ref, "student[0]");
  std::vector<at::Tensor> t = check_side("teacher", teacher_in, ref, "student[0]");

  Geometry g;
  g.acc_double = s[0].scalar_type() == at::kDouble || t[0].scalar_type() == at::kDouble;
  if (attention_floor.has_value()) {
    TORCH_CHECK_VALUE(!std::isnan(*attention_floor), "layer_costs: attention_floor must be a "
                      "number or None, got nan");
    g.has_floor = true;
    g.floor = *attention_floor;
  }
  const int64_t ndim = static_cast<int64_t>(ref.size());
  const int64_t B = ref[0];

  if (mask_in.has_value() && mask_in->defined()) {
    const at::Tensor& m = *mask_in;
    TORCH_CHECK_VALUE(ndim >= 2 && ndim <= 4, "layer_costs: mask needs layers of shape [B, L], "
                      "[B, L, d] (hidden states) or [B, H, L, L] (attention), got layers of shape ",
                      shape_str(ref));
    const int64_t L = ndim == 4 ? ref[2] : ref[1];
    TORCH_CHECK_VALUE(ndim != 4 || ref[2] == ref[3], "layer_costs: mask needs attention maps "
                      "[B, H, L, L] with equal query and key lengths, got ", shape_str(ref));
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == L, "layer_costs: mask must "
                      "have shape [B, L] = [", B, ", ", L, "], got ", shape_str(m.sizes()));
    TORCH_CHECK_VALUE(m.device().is_cpu(), "layer_costs (cpu backend): mask must be a CPU tensor, "
                      "got device ", m.device());
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), false) ||
                          at::isFloatingType(m.scalar_type()),
                      "layer_costs: mask must be bool, integer or floating point (0/1), got ",
                      m.scalar_type());
    g.L = L;
    g.mask.resize(static_cast<size_t>(B * L));
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, m.scalar_type(), "lc_mask", [&] {
      const scalar_t* p = m.const_data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t l = 0; l < L; ++l)
          g.mask[b * L + l] = static_cast<double>(p[b * m.stride(0) + l * m.stride(1)]) != 0.0;
    });
    g.B = B;
    // [B,1,1,L] | [B,1,L,d] | [B,H,L,L]
    auto set = [&](Side& side, const at::Tensor& x) {
      side.st[0] = x.stride(0);
      if (ndim == 2) { side.st[1] = 0; side.st[2] = 0; side.st[3] = x.stride(1); }
      if (ndim == 3) { side.st[1] = 0; side.st[2] = x.stride(1); side.st[3] = x.stride(2); }
      if (ndim == 4) { side.st[1] = x.stride(1); side.st[2] = x.stride(2); side.st[3] = x.stride(3); }
    };
    set(S, s[0]);
    set(T, t[0]);
    if (ndim == 2) { g.D1 = 1; g.D2 = 1; g.D3 = L; g.mask_k = true; }
    if (ndim == 3) { g.D1 = 1; g.D2 = L; g.D3 = ref[2]; g.mask_q = true; }
    if (ndim == 4) { g.D1 = ref[1]; g.D2 = L; g.D3 = L; g.mask_q = g.mask_k = true; }
    g.len = g.D1 * g.D2 * g.D3;
    g.count.assign(static_cast<size_t>(B), 0.0);
    for (int64_t b = 0; b < B; ++b) {
      int64_t c = 0;
      for (int64_t l = 0; l < L; ++l) c += g.mask[b * L + l];
      g.count[b] = static_cast<double>(g.D1) * (g.mask_q ? c : g.D2) * (g.mask_k ? c : g.D3);
    }
  } else {
    std::vector<int64_t> sz, st0, st1;
    // Without per_sample the batch dim merges too (one flat run for contiguous inputs).
    const int64_t first = per_sample ? 1 : 0;
    const int max_dims = per_sample ? 3 : 4;
    if (!coalesce(ref, s[0].strides(), t[0].strides(), first, max_dims, sz, st0, st1)) {
      for (auto& x : s) x = x.contiguous();
      for (auto& x : t) x = x.contiguous();
      coalesce(ref, s[0].strides(), t[0].strides(), first, max_dims, sz, st0, st1);
    }
    while (static_cast<int>(sz.size()) < max_dims) {
      sz.insert(sz.begin(), 1); st0.insert(st0.begin(), 0); st1.insert(st1.begin(), 0);
    }
    if (per_sample) {
      sz.insert(sz.begin(), B);
      st0.insert(st0.begin(), s[0].stride(0));
      st1.insert(st1.begin(), t[0].stride(0));
    }
    g.B = sz[0]; g.D1 = sz[1]; g.D2 = sz[2]; g.D3 = sz[3];
    for (int k = 0; k < 4; ++k) { S.st[k] = st0[k]; T.st[k] = st1[k]; }
    g.len = g.D1 * g.D2 * g.D3;
    int64_t numel = 1;
    for (auto d : ref) numel *= d;
    if (per_sample) g.count.assign(static_cast<size_t>(B), static_cast<double>(g.len));
    else g.count.assign(1, static_cast<double>(numel));
  }
  fill_side(S, s);
  fill_side(T, t);
  S.keep = std::move(s);
  T.keep = std::move(t);
  return g;
}

// --------------------------------------------------------------------------------- packing
// After a row segment is converted into dst: keep[e] = 1 where the gradient flows (key real
// and raw value > floor), then f(x) (x <= floor -> 0; NaN kept, as torch.where keeps it) and
// the key mask (padded keys -> 0 on both sides, so they add nothing to any pair).
template <typename acc_t>
inline void finish_pack(int64_t len, const uint8_t* km, bool has_floor, acc_t floor, acc_t* dst,
                        acc_t* keep) {
  if (keep != nullptr) {
    if (has_floor)
      for (int64_t e = 0; e < len; ++e) keep[e] = dst[e] <= floor ? acc_t(0) : acc_t(1);
    else
      for (int64_t e = 0; e < len; ++e) keep[e] = acc_t(1);
    if (km != nullptr)
      for (int64_t e = 0; e < len; ++e) keep[e] = km[e] ? keep[e] : acc_t(0);
  }
  if (has_floor)
    for (int64_t e = 0; e < len; ++e) dst[e] = dst[e] <= floor ? acc_t(0) : dst[e];
  if (km != nullptr)
    for (int64_t e = 0; e < len; ++e) dst[e] = km[e] ? dst[e] : acc_t(0);
}

template <typename scalar_t, typename acc_t>
inline void pack_typed(const char* src_c, int64_t st, int64_t len, const uint8_t* km, bool has_floor,
                       acc_t floor, acc_t* dst, acc_t* keep) {
  const scalar_t* src = reinterpret_cast<const scalar_t*>(src_c);
  if (st == 1) {
    for (int64_t e = 0; e < len; ++e) dst[e] = static_cast<acc_t>(static_cast<float>(src[e]));
  } else {
    for (int64_t e = 0; e < len; ++e) dst[e] = static_cast<acc_t>(static_cast<float>(src[e * st]));
  }
  finish_pack<acc_t>(len, km, has_floor, floor, dst, keep);
}

// Doubles are not routed through float.
template <>
inline void pack_typed<double, double>(const char* src_c, int64_t st, int64_t len, const uint8_t* km,
                                       bool has_floor, double floor, double* dst, double* keep) {
  const double* src = reinterpret_cast<const double*>(src_c);
  for (int64_t e = 0; e < len; ++e) dst[e] = src[e * st];
  finish_pack<double>(len, km, has_floor, floor, dst, keep);
}

template <typename acc_t>
inline void pack(int dtype, const char* src, int64_t st, int64_t len, const uint8_t* km, bool has_floor,
                 acc_t floor, acc_t* dst, acc_t* keep) {
  switch (dtype) {
    case kF32: pack_typed<float, acc_t>(src, st, len, km, has_floor, floor, dst, keep); break;
    case kF64: pack_typed<double, acc_t>(src, st, len, km, has_floor, floor, dst, keep); break;
    case kF16: pack_typed<c10::Half, acc_t>(src, st, len, km, has_floor, floor, dst, keep); break;
    default: pack_typed<c10::BFloat16, acc_t>(src, st, len, km, has_floor, floor, dst, keep); break;
  }
}

// ------------------------------------------------------------------------ forward compute
// acc[i*ldo + j] += sum_{e<len} (f(s_i[e]) - f(t_j[e]))^2 for an IB x JB block: per step one
// vector of each of the IB + JB layers is loaded (f applied in registers when FLOOR) and IB*JB
// squared differences are accumulated. The fp32 lanes are flushed into doubles every kChunk
// elements, so a lane never sums more than kChunk / lanes squares (accuracy), while `len` may
// be a long in-place run (each layer is then streamed in long runs, which the hardware
// prefetchers follow much better than 16 interleaved short ones).
template <typename acc_t, int IB, int JB, bool FLOOR>
inline void pair_block(const acc_t* const* s, const acc_t* const* t, int64_t len, acc_t floor, double* acc,
                       int64_t ldo) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::lanes;
  double sum[IB][JB] = {};
  for (int64_t e0 = 0; e0 < len; e0 += kChunk) {
    const int64_t e1 = std::min(len, e0 + kChunk);
    V a[IB][JB];
    for (int ii = 0; ii < IB; ++ii)
      for (int jj = 0; jj < JB; ++jj) a[ii][jj] = V{};
    int64_t e = e0;
    for (; e + W <= e1; e += W) {
      V sv[IB];
      for (int ii = 0; ii < IB; ++ii) {
        sv[ii] = vload(s[ii] + e);
        if (FLOOR) sv[ii] = sv[ii] <= floor ? V{} : sv[ii];
      }
      for (int jj = 0; jj < JB; ++jj) {
        V tv = vload(t[jj] + e);
        if (FLOOR) tv = tv <= floor ? V{} : tv;
        for (int ii = 0; ii < IB; ++ii) {
          const V d = sv[ii] - tv;
          a[ii][jj] += d * d;
        }
      }
    }
    const int rem = static_cast<int>(e1 - e);  // < W
    for (int ii = 0; ii < IB; ++ii)
      for (int jj = 0; jj < JB; ++jj) {
        for (int l = 0; l < W; ++l) sum[ii][jj] += static_cast<double>(a[ii][jj][l]);
        for (int k = 0; k < rem; ++k) {
          acc_t x = s[ii][e + k], y = t[jj][e + k];
          if (FLOOR) {
            x = x <= floor ? acc_t(0) : x;
            y = y <= floor ? acc_t(0) : y;
          }
          sum[ii][jj] += static_cast<double>((x - y) * (x - y));
        }
      }
  }
  for (int ii = 0; ii < IB; ++ii)
    for (int jj = 0; jj < JB; ++jj) acc[ii * ldo + jj] += sum[ii][jj];
}

template <typename acc_t, int IB, bool FLOOR>
inline void pair_row(const acc_t* const* s, const acc_t* const* t, int64_t N, int64_t len, acc_t floor,
                     double* acc) {
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) pair_block<acc_t, IB, 4, FLOOR>(s, t + j, len, floor, acc + j, N);
  switch (N - j) {
    case 3: pair_block<acc_t, IB, 3, FLOOR>(s, t + j, len, floor, acc + j, N); break;
    case 2: pair_block<acc_t, IB, 2, FLOOR>(s, t + j, len, floor, acc + j, N); break;
    case 1: pair_block<acc_t, IB, 1, FLOOR>(s, t + j, len, floor, acc + j, N); break;
    default: break;
  }
}

// acc[M, N] += pair sums over `len` elements of the M student and N teacher rows.
template <typename acc_t, bool FLOOR>
inline void pair_sums(const acc_t* const* s, int64_t M, const acc_t* const* t, int64_t N, int64_t len,
                      acc_t floor, double* acc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) pair_row<acc_t, 4, FLOOR>(s + i, t, N, len, floor, acc + i * N);
  switch (M - i) {
    case 3: pair_row<acc_t, 3, FLOOR>(s + i, t, N, len, floor, acc + i * N); break;
    case 2: pair_row<acc_t, 2, FLOOR>(s + i, t, N, len, floor, acc + i * N); break;
    case 1: pair_row<acc_t, 1, FLOOR>(s + i, t, N, len, floor, acc + i * N); break;
    default: break;
  }
}

struct FwdArgs {
  const Geometry* g;
  const Side* S;
  const Side* T;
  int64_t M, N, tiles_per_sample;
  double* partial;  // [ntiles, M*N]
};

// Forward over tiles [lo, hi) of the B x tiles_per_sample grid; thread-local buffers.
template <typename acc_t>
inline void fwd_tiles(const FwdArgs& A, int64_t lo, int64_t hi) {
  const Geometry& g = *A.g;
  const Side& S = *A.S;
  const Side& T = *A.T;
  const int64_t M = A.M, N = A.N;
  const int acc_code = sizeof(acc_t) == 8 ? kF64 : kF32;
  // In place: both sides already acc_t, unit stride along D3, no key mask to zero (the floor
  // is applied in registers).
  const bool direct = S.dtype == acc_code && T.dtype == acc_code && S.st[3] == 1 && T.st[3] == 1 && !g.mask_k;
  const acc_t floor = static_cast<acc_t>(g.floor);
  std::vector<acc_t> buf(static_cast<size_t>((M + N) * kChunk));
  std::vector<const acc_t*> sp(M), tp(N), sb(M), tb(N);
  acc_t* const sbw = buf.data();               // packed student rows, kChunk apart
  acc_t* const tbw = buf.data() + M * kChunk;  // packed teacher rows
  for (int64_t i = 0; i < M; ++i) sb[i] = sbw + i * kChunk;
  for (int64_t j = 0; j < N; ++j) tb[j] = tbw + j * kChunk;

  for (int64_t w = lo; w < hi; ++w) {
    const int64_t b = w / A.tiles_per_sample;
    const int64_t r0 = (w % A.tiles_per_sample) * kTile;
    const int64_t r1 = std::min(g.len, r0 + kTile);
    double* acc = A.partial + w * M * N;
    std::fill(acc, acc + M * N, 0.0);
    int64_t pending = 0;
    auto flush = [&]() {
      if (pending > 0) pair_sums<acc_t, false>(sb.data(), M, tb.data(), N, pending, floor, acc);
      pending = 0;
    };
    for (int64_t r = r0; r < r1;) {
      const int64_t k0 = r % g.D3, row = r / g.D3;
      const int64_t q = row % g.D2, h = row / g.D2;
      const int64_t seg = std::min(g.D3 - k0, r1 - r);
      if (g.mask_q && !g.mask[b * g.L + q]) {  // padded query row: never read
        r += seg;
        continue;
      }
      const int64_t offS = (b * S.st[0] + h * S.st[1] + q * S.st[2] + k0 * S.st[3]) * S.elsize;
      const int64_t offT = (b * T.st[0] + h * T.st[1] + q * T.st[2] + k0 * T.st[3]) * T.elsize;
      const uint8_t* km = g.mask_k ? g.mask.data() + b * g.L + k0 : nullptr;
      if (direct && seg >= kChunk / 2) {
        // long in-place runs of kDirect elements: the student block stays in L2 while the
        // teacher layers stream past it
        for (int64_t c = 0; c < seg; c += kDirect) {
          const int64_t cl = std::min(kDirect, seg - c);
          for (int64_t i = 0; i < M; ++i)
            sp[i] = reinterpret_cast<const acc_t*>(S.ptr[i] + offS) + c;
          for (int64_t j = 0; j < N; ++j)
            tp[j] = reinterpret_cast<const acc_t*>(T.ptr[j] + offT) + c;
          if (g.has_floor) pair_sums<acc_t, true>(sp.data(), M, tp.data(), N, cl, floor, acc);
          else pair_sums<acc_t, false>(sp.data(), M, tp.data(), N, cl, floor, acc);
        }
      } else {
        for (int64_t pos = 0; pos < seg;) {
          const int64_t take = std::min(kChunk - pending, seg - pos);
          const uint8_t* kmp = km ? km + pos : nullptr;
          for (int64_t i = 0; i < M; ++i)
            pack<acc_t>(S.dtype, S.ptr[i] + offS + pos * S.st[3] * S.elsize, S.st[3], take, kmp,
                        g.has_floor, floor, sbw + i * kChunk + pending, nullptr);
          for (int64_t j = 0; j < N; ++j)
            pack<acc_t>(T.dtype, T.ptr[j] + offT + pos * T.st[3] * T.elsize, T.st[3], take, kmp,
                        g.has_floor, floor, tbw + j * kChunk + pending, nullptr);
          pending += take;
          pos += take;
          if (pending == kChunk) flush();
        }
      }
      r += seg;
    }
    flush();
  }
}

BERT_EMD_LC_CLONES void fwd_tiles_f32(const FwdArgs& A, int64_t lo, int64_t hi) {
  fwd_tiles<float>(A, lo, hi);
}
// float64 is the gradcheck / reference precision, not a speed path: one baseline build.
void fwd_tiles_f64(const FwdArgs& A, int64_t lo, int64_t hi) {
  fwd_tiles<double>(A, lo, hi);
}

// ------------------------------------------------------------------------ backward compute
struct BwdArgs {
  const Geometry* g;
  const Side* S;
  const Side* T;
  int64_t M, N, tiles_per_sample;
  bool need_teacher;
  const double* G;      // [B or 1, M, N] (double copy of the upstream gradient)
  const double* scale;  // [B or 1] 2/n_b (0 where n_b == 0)
  bool per_sample;
  std::vector<char*> outS, outT;  // contiguous gradient buffers, input dtypes
  int out_dtype_S = kF32, out_dtype_T = kF32;
};

template <typename acc_t>
inline void store_out(int dtype, char* dst_c, const acc_t* val, const acc_t* keep, acc_t c, int64_t len) {
  switch (dtype) {
    case kF32: {
      float* d = reinterpret_cast<float*>(dst_c);
      if (keep) for (int64_t e = 0; e < len; ++e) d[e] = static_cast<float>(c * keep[e] * val[e]);
      else for (int64_t e = 0; e < len; ++e) d[e] = static_cast<float>(c * val[e]);
      break;
    }
    case kF64: {
      double* d = reinterpret_cast<double*>(dst_c);
      if (keep) for (int64_t e = 0; e < len; ++e) d[e] = static_cast<double>(c * keep[e] * val[e]);
      else for (int64_t e = 0; e < len; ++e) d[e] = static_cast<double>(c * val[e]);
      break;
    }
    case kF16: {
      c10::Half* d = reinterpret_cast<c10::Half*>(dst_c);
      for (int64_t e = 0; e < len; ++e)
        d[e] = c10::Half(static_cast<float>(c * (keep ? keep[e] : acc_t(1)) * val[e]));
      break;
    }
    default: {
      c10::BFloat16* d = reinterpret_cast<c10::BFloat16*>(dst_c);
      for (int64_t e = 0; e < len; ++e)
        d[e] = c10::BFloat16(static_cast<float>(c * (keep ? keep[e] : acc_t(1)) * val[e]));
      break;
    }
  }
}

// out_i[e] = f(x_i[e]) sum_j C_ij - sum_j C_ij f(y_j[e]) for rows i of x, with C = coef (stride
// ci between rows, cj between j), blocked by 4 rows so each y_j vector is loaded once per block.
// FUSED (in-place inputs, output dtype == acc_t): out_i = c [x_i > floor] (...) written straight
// to the gradient; else the bare value goes to a buffer for store_out.
template <typename acc_t, int IB, bool FLOOR, bool FUSED>
inline void grad_block(const acc_t* const* x, const acc_t* const* y, int64_t ny, const acc_t* coef,
                       int64_t ci, int64_t cj, const acc_t* rowsum, int64_t len, acc_t c, acc_t floor,
                       acc_t* const* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::lanes;
  int64_t e = 0;
  for (; e + W <= len; e += W) {
    V xr[IB], a[IB];
    for (int ii = 0; ii < IB; ++ii) {
      xr[ii] = vload(x[ii] + e);
      a[ii] = (FLOOR ? (xr[ii] <= floor ? V{} : xr[ii]) : xr[ii]) * rowsum[ii];
    }
    for (int64_t j = 0; j < ny; ++j) {
      V yv = vload(y[j] + e);
      if (FLOOR) yv = yv <= floor ? V{} : yv;
      for (int ii = 0; ii < IB; ++ii) a[ii] -= coef[ii * ci + j * cj] * yv;
    }
    for (int ii = 0; ii < IB; ++ii) {
      if (FUSED) {
        a[ii] = a[ii] * c;
        if (FLOOR) a[ii] = xr[ii] <= floor ? V{} : a[ii];
      }
      vstore(out[ii] + e, a[ii]);
    }
  }
  for (; e < len; ++e)
    for (int ii = 0; ii < IB; ++ii) {
      const acc_t xr = x[ii][e];
      acc_t a = (FLOOR && xr <= floor ? acc_t(0) : xr) * rowsum[ii];
      for (int64_t j = 0; j < ny; ++j) {
        const acc_t yv = y[j][e];
        a -= coef[ii * ci + j * cj] * (FLOOR && yv <= floor ? acc_t(0) : yv);
      }
      if (FUSED) a = FLOOR && xr <= floor ? acc_t(0) : c * a;
      out[ii][e] = a;
    }
}

template <typename acc_t, bool FLOOR, bool FUSED>
inline void grad_rows(const acc_t* const* x, int64_t nx, const acc_t* const* y, int64_t ny,
                      const acc_t* coef, int64_t ci, int64_t cj, const acc_t* rowsum, int64_t len,
                      acc_t c, acc_t floor, acc_t* const* out) {
  int64_t i = 0;
  for (; i + 4 <= nx; i += 4)
    grad_block<acc_t, 4, FLOOR, FUSED>(x + i, y, ny, coef + i * ci, ci, cj, rowsum + i, len, c, floor, out + i);
  for (; i < nx; ++i)
    grad_block<acc_t, 1, FLOOR, FUSED>(x + i, y, ny, coef + i * ci, ci, cj, rowsum + i, len, c, floor, out + i);
}

template <typename acc_t>
inline void bwd_tiles(const BwdArgs& A, int64_t lo, int64_t hi) {
  const Geometry& g = *A.g;
  const Side& S = *A.S;
  const Side& T = *A.T;
  const int64_t M = A.M, N = A.N;
  const acc_t floor = static_cast<acc_t>(g.floor);
  const int acc_code = sizeof(acc_t) == 8 ? kF64 : kF32;
  const bool any_mask = g.mask_q || g.mask_k;
  // In place (and fused with the store): both sides acc_t with unit stride, no token mask.
  const bool direct = S.dtype == acc_code && T.dtype == acc_code && S.st[3] == 1 && T.st[3] == 1 && !any_mask;
  const bool use_keep = g.has_floor || any_mask;
  // values (M+N), keep flags (M+N), results (M+N) of one packed chunk
  std::vector<acc_t> buf(static_cast<size_t>(3 * (M + N) * kChunk));
  acc_t* val = buf.data();
  acc_t* kp = val + (M + N) * kChunk;
  acc_t* res = kp + (M + N) * kChunk;
  std::vector<const acc_t*> sp(M), tp(N);
  std::vector<acc_t*> rs(M), rt(N), os(M), ot(N);
  for (int64_t i = 0; i < M; ++i) rs[i] = res + i * kChunk;
  for (int64_t j = 0; j < N; ++j) rt[j] = res + (M + j) * kChunk;
  std::vector<acc_t> Gb(static_cast<size_t>(M * N)), rowG(M), colG(N);

  for (int64_t w = lo; w < hi; ++w) {
    const int64_t b = w / A.tiles_per_sample;
    const int64_t r0 = (w % A.tiles_per_sample) * kTile;
    const int64_t r1 = std::min(g.len, r0 + kTile);
    const int64_t gb = A.per_sample ? b : 0;
    for (int64_t k = 0; k < M * N; ++k) Gb[k] = static_cast<acc_t>(A.G[gb * M * N + k]);
    for (int64_t i = 0; i < M; ++i) {
      acc_t s = 0;
      for (int64_t j = 0; j < N; ++j) s += Gb[i * N + j];
      rowG[i] = s;
    }
    for (int64_t j = 0; j < N; ++j) {
      acc_t s = 0;
      for (int64_t i = 0; i < M; ++i) s += Gb[i * N + j];
      colG[j] = s;
    }
    const acc_t c = static_cast<acc_t>(A.scale[A.per_sample ? b : 0]);

    // Gathers [c0, c0 + cl) (cl <= kChunk) of every layer, row segment by row segment, and
    // stores both gradients through store_out.
    auto packed_chunk = [&](int64_t c0, int64_t cl) {
      for (int64_t i = 0; i < M; ++i) sp[i] = val + i * kChunk;
      for (int64_t j = 0; j < N; ++j) tp[j] = val + (M + j) * kChunk;
      for (int64_t r = c0; r < c0 + cl;) {
        const int64_t k0 = r % g.D3, row = r / g.D3;
        const int64_t q = row % g.D2, h = row / g.D2;
        const int64_t seg = std::min(g.D3 - k0, c0 + cl - r);
        const int64_t p = r - c0;
        if (g.mask_q && !g.mask[b * g.L + q]) {  // padded query row: zeros, never read
          for (int64_t l = 0; l < M + N; ++l) {
            std::fill(val + l * kChunk + p, val + l * kChunk + p + seg, acc_t(0));
            std::fill(kp + l * kChunk + p, kp + l * kChunk + p + seg, acc_t(0));
          }
        } else {
          const int64_t offS = (b * S.st[0] + h * S.st[1] + q * S.st[2] + k0 * S.st[3]) * S.elsize;
          const int64_t offT = (b * T.st[0] + h * T.st[1] + q * T.st[2] + k0 * T.st[3]) * T.elsize;
          const uint8_t* km = g.mask_k ? g.mask.data() + b * g.L + k0 : nullptr;
          for (int64_t i = 0; i < M; ++i)
            pack<acc_t>(S.dtype, S.ptr[i] + offS, S.st[3], seg, km, g.has_floor, floor,
                        val + i * kChunk + p, kp + i * kChunk + p);
          for (int64_t j = 0; j < N; ++j)
            pack<acc_t>(T.dtype, T.ptr[j] + offT, T.st[3], seg, km, g.has_floor, floor,
                        val + (M + j) * kChunk + p, kp + (M + j) * kChunk + p);
        }
        r += seg;
      }
      const int64_t out_off = b * g.len + c0;  // outputs are contiguous [B, ...]
      // dS_i = c * keep * (S_i * rowG_i - sum_j G_ij T_j)
      grad_rows<acc_t, false, false>(sp.data(), M, tp.data(), N, Gb.data(), N, 1, rowG.data(), cl, c, floor,
                                     rs.data());
      for (int64_t i = 0; i < M; ++i)
        store_out<acc_t>(A.out_dtype_S, A.outS[i] + out_off * S.elsize, rs[i],
                         use_keep ? kp + i * kChunk : nullptr, c, cl);
      if (A.need_teacher) {
        // dT_j = c * keep * (T_j * colG_j - sum_i G_ij S_i)
        grad_rows<acc_t, false, false>(tp.data(), N, sp.data(), M, Gb.data(), 1, N, colG.data(), cl, c, floor,
                                       rt.data());
        for (int64_t j = 0; j < N; ++j)
          store_out<acc_t>(A.out_dtype_T, A.outT[j] + out_off * T.elsize, rt[j],
                           use_keep ? kp + (M + j) * kChunk : nullptr, c, cl);
      }
    };

    const int64_t step = direct ? kDirect : kChunk;
    for (int64_t c0 = r0; c0 < r1; c0 += step) {
      const int64_t cl = std::min(step, r1 - c0);
      const int64_t k0 = c0 % g.D3, row = c0 / g.D3;
      if (direct && k0 + cl <= g.D3) {
        // one row run: read in place, floor in registers, gradients written directly
        const int64_t q = row % g.D2, h = row / g.D2;
        const int64_t offS = (b * S.st[0] + h * S.st[1] + q * S.st[2] + k0) * S.elsize;
        const int64_t offT = (b * T.st[0] + h * T.st[1] + q * T.st[2] + k0) * T.elsize;
        const int64_t out_off = b * g.len + c0;
        for (int64_t i = 0; i < M; ++i) {
          sp[i] = reinterpret_cast<const acc_t*>(S.ptr[i] + offS);
          os[i] = reinterpret_cast<acc_t*>(A.outS[i]) + out_off;
        }
        for (int64_t j = 0; j < N; ++j) {
          tp[j] = reinterpret_cast<const acc_t*>(T.ptr[j] + offT);
          if (A.need_teacher) ot[j] = reinterpret_cast<acc_t*>(A.outT[j]) + out_off;
        }
        if (g.has_floor) {
          grad_rows<acc_t, true, true>(sp.data(), M, tp.data(), N, Gb.data(), N, 1, rowG.data(), cl, c, floor,
                                       os.data());
          if (A.need_teacher)
            grad_rows<acc_t, true, true>(tp.data(), N, sp.data(), M, Gb.data(), 1, N, colG.data(), cl, c,
                                         floor, ot.data());
        } else {
          grad_rows<acc_t, false, true>(sp.data(), M, tp.data(), N, Gb.data(), N, 1, rowG.data(), cl, c,
                                        floor, os.data());
          if (A.need_teacher)
            grad_rows<acc_t, false, true>(tp.data(), N, sp.data(), M, Gb.data(), 1, N, colG.data(), cl, c,
                                          floor, ot.data());
        }
      } else {
        for (int64_t p0 = c0; p0 < c0 + cl; p0 += kChunk) packed_chunk(p0, std::min(kChunk, c0 + cl - p0));
      }
    }
  }
}

BERT_EMD_LC_CLONES void bwd_tiles_f32(const BwdArgs& A, int64_t lo, int64_t hi) {
  bwd_tiles<float>(A, lo, hi);
}
void bwd_tiles_f64(const BwdArgs& A, int64_t lo, int64_t hi) {
  bwd_tiles<double>(A, lo, hi);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

// ------------------------------------------------------------------------------------- ops
at::Tensor layer_costs_fwd_cpu(at::TensorList student, at::TensorList teacher,
                               const std::optional<at::Tensor>& mask, bool per_sample,
                               std::optional<double> attention_floor) {
  Side S, T;
  Geometry g = prepare(student, teacher, mask, per_sample, attention_floor, S, T);
  const int64_t M = static_cast<int64_t>(student.size()), N = static_cast<int64_t>(teacher.size());
  const int64_t B_out = per_sample ? student[0].size(0) : 1;
  const int64_t tps = ceil_div(g.len, kTile);
  const int64_t ntiles = g.B * tps;
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(ntiles, 1) * M * N), 0.0);
  FwdArgs A{&g, &S, &T, M, N, tps, partial.data()};
  if (ntiles > 0) {
    at::parallel_for(0, ntiles, 1, [&](int64_t lo, int64_t hi) {
      if (g.acc_double) fwd_tiles_f64(A, lo, hi);
      else fwd_tiles_f32(A, lo, hi);
    });
  }
  // Reduce the tile partials in tile order, then divide by the element count.
  std::vector<double> total(static_cast<size_t>(B_out * M * N), 0.0);
  for (int64_t w = 0; w < ntiles; ++w) {
    const int64_t bo = per_sample ? w / tps : 0;
    for (int64_t k = 0; k < M * N; ++k) total[bo * M * N + k] += partial[w * M * N + k];
  }
  double n_total = 0.0;
  for (double c : g.count) n_total += c;
  at::Tensor out = per_sample
      ? at::empty({B_out, M, N}, student[0].options().dtype(g.acc_double ? at::kDouble : at::kFloat))
      : at::empty({M, N}, student[0].options().dtype(g.acc_double ? at::kDouble : at::kFloat));
  for (int64_t bo = 0; bo < B_out; ++bo) {
    const double n = per_sample ? g.count[bo] : n_total;  // 0/0 -> NaN, as torch's empty mean
    for (int64_t k = 0; k < M * N; ++k) {
      const double v = total[bo * M * N + k] / n;
      if (g.acc_double) out.mutable_data_ptr<double>()[bo * M * N + k] = v;
      else out.mutable_data_ptr<float>()[bo * M * N + k] = static_cast<float>(v);
    }
  }
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> layer_costs_bwd_cpu(
    const at::Tensor& grad, at::TensorList student, at::TensorList teacher,
    const std::optional<at::Tensor>& mask, bool per_sample, std::optional<double> attention_floor,
    bool need_teacher) {
  Side S, T;
  Geometry g = prepare(student, teacher, mask, per_sample, attention_floor, S, T);
  const int64_t M = static_cast<int64_t>(student.size()), N = static_cast<int64_t>(teacher.size());
  const int64_t B0 = student[0].size(0);
  TORCH_CHECK_VALUE(grad.defined() && grad.device().is_cpu() && at::isFloatingType(grad.scalar_type()),
                    "layer_costs backward: grad must be a floating-point CPU tensor");
  if (per_sample) {
    TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(0) == B0 && grad.size(1) == M && grad.size(2) == N,
                      "layer_costs backward: grad must have shape [B, M, N] = [", B0, ", ", M, ", ",
                      N, "], got ", shape_str(grad.sizes()));
  } else {
    TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == M && grad.size(1) == N,
                      "layer_costs backward: grad must have shape [M, N] = [", M, ", ", N, "], got ",
                      shape_str(grad.sizes()));
  }
  // Upstream gradient to doubles through its strides (it may be an expanded view).
  const int64_t GB = per_sample ? B0 : 1;
  std::vector<double> G(static_cast<size_t>(GB * M * N));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "lc_grad", [&] {
    const scalar_t* p = grad.const_data_ptr<scalar_t>();
    const int64_t sb = per_sample ? grad.stride(0) : 0;
    const int64_t si = grad.stride(per_sample ? 1 : 0), sj = grad.stride(per_sample ? 2 : 1);
    for (int64_t b = 0; b < GB; ++b)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j)
          G[(b * M + i) * N + j] = static_cast<double>(p[b * sb + i * si + j * sj]);
  });
  std::vector<double> scale(static_cast<size_t>(GB), 0.0);
  if (per_sample) {
    for (int64_t b = 0; b < GB; ++b) scale[b] = g.count[b] > 0 ? 2.0 / g.count[b] : 0.0;
  } else {
    double n = 0.0;
    for (double c : g.count) n += c;
    scale[0] = n > 0 ? 2.0 / n : 0.0;
  }

  std::vector<at::Tensor> gS, gT;
  BwdArgs A;
  A.g = &g; A.S = &S; A.T = &T; A.M = M; A.N = N;
  A.tiles_per_sample = ceil_div(g.len, kTile);
  A.need_teacher = need_teacher;
  A.G = G.data();
  A.scale = scale.data();
  A.per_sample = per_sample;
  A.out_dtype_S = S.dtype;
  A.out_dtype_T = T.dtype;
  for (int64_t i = 0; i < M; ++i) {
    gS.push_back(at::empty(student[i].sizes(), student[i].options()));
    A.outS.push_back(static_cast<char*>(gS.back().data_ptr()));
  }
  if (need_teacher)
    for (int64_t j = 0; j < N; ++j) {
      gT.push_back(at::empty(teacher[j].sizes(), teacher[j].options()));
      A.outT.push_back(static_cast<char*>(gT.back().data_ptr()));
    }
  const int64_t ntiles = g.B * A.tiles_per_sample;
  if (ntiles > 0) {
    at::parallel_for(0, ntiles, 1, [&](int64_t lo, int64_t hi) {
      if (g.acc_double) bwd_tiles_f64(A, lo, hi);
      else bwd_tiles_f32(A, lo, hi);
    });
  }
  return {std::move(gS), std::move(gT)};
}

TORCH_LIBRARY_IMPL(bert_emd, CPU, m) {
  m.impl("layer_costs_fwd", &layer_costs_fwd_cpu);
  m.impl("layer_costs_bwd", &layer_costs_bwd_cpu);
}

}  // namespace bert_emd
