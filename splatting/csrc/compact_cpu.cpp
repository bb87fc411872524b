// CPU kernels of Compact 3DGS: the multi-resolution hash encoding (Instant-NGP style, forward and
// analytic backward) and the nearest-codeword search of residual vector quantization.
//
// The same mathematics as the torch path of splatting/compact/hashgrid.py (HashGrid.forward):
// a point x in [0, 1]^3 (clamped) at level l has lattice position p = x * N_l; its 8 surrounding
// vertices v = floor(p) + {0, 1}^3 index the level's table densely (v.x + v.y R + v.z R^2 with
// R = N_l + 1) when the level is dense, else by (v.x * 1 xor v.y * 2654435761 xor v.z * 805459861),
// both modulo T (a power of two: only the low bits matter, so 32-bit unsigned arithmetic is
// exact). The feature is the trilinear blend of the 8 entries.
//
// Backward: d table comes from every thread's own buffer over a static split of the points,
// summed in thread order (deterministic for a given thread count); d x is per point (zero where
// the clamp is active, as torch's clamp gradient).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

struct Corner {
  int64_t row[8];
  float w[8];
  float dw[8][3];  // d w / d frac along each axis
};

inline void corners(const float* x, int64_t res, bool dense, int64_t T, Corner& c) {
  float f[3];
  uint32_t b[3];
  for (int a = 0; a < 3; ++a) {
    float xa = std::min(std::max(x[a], 0.f), 1.f) * static_cast<float>(res);
    float fl = std::floor(xa);
    f[a] = xa - fl;
    b[a] = static_cast<uint32_t>(fl);
  }
  const uint32_t R = static_cast<uint32_t>(res + 1), mask = static_cast<uint32_t>(T - 1);
  for (int k = 0; k < 8; ++k) {
    uint32_t v[3];
    float wa[3], sa[3];
    for (int a = 0; a < 3; ++a) {
      const int bit = (k >> a) & 1;
      v[a] = b[a] + bit;
      wa[a] = bit ? f[a] : 1.f - f[a];
      sa[a] = bit ? 1.f : -1.f;
    }
    uint32_t idx = dense ? v[0] + v[1] * R + v[2] * R * R : (v[0] * 1u) ^ (v[1] * 2654435761u) ^ (v[2] * 805459861u);
    c.row[k] = static_cast<int64_t>(idx & mask);
    c.w[k] = wa[0] * wa[1] * wa[2];
    c.dw[k][0] = sa[0] * wa[1] * wa[2];
    c.dw[k][1] = wa[0] * sa[1] * wa[2];
    c.dw[k][2] = wa[0] * wa[1] * sa[2];
  }
}

void check(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& res, const torch::Tensor& dense) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 3 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "hash_encode: x must be a contiguous float32 [N, 3] tensor");
  TORCH_CHECK(table.dim() == 3 && table.scalar_type() == torch::kFloat && table.is_contiguous(),
              "hash_encode: table must be a contiguous float32 [L, T, F] tensor");
  TORCH_CHECK(res.scalar_type() == torch::kLong && dense.scalar_type() == torch::kBool &&
                  res.numel() == table.size(0) && dense.numel() == table.size(0),
              "hash_encode: resolution (int64) and dense (bool) need one entry per level");
}

}  // namespace

torch::Tensor hash_encode_forward(torch::Tensor x, torch::Tensor table, torch::Tensor res, torch::Tensor dense) {
  check(x, table, res, dense);
  const int64_t N = x.size(0), L = table.size(0), T = table.size(1), F = table.size(2);
  auto out = torch::zeros({N, L * F}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  const int64_t* rp = res.data_ptr<int64_t>();
  const bool* dp = dense.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) {
    Corner c;
    for (int64_t n = b; n < e; ++n) {
      for (int64_t l = 0; l < L; ++l) {
        corners(xp + 3 * n, rp[l], dp[l], T, c);
        float* o = op + n * L * F + l * F;
        const float* tl = tp + l * T * F;
        for (int k = 0; k < 8; ++k)
          for (int64_t f = 0; f < F; ++f) o[f] += c.w[k] * tl[c.row[k] * F + f];
      }
    }
  });
  return out;
}

std::vector<torch::Tensor> hash_encode_backward(torch::Tensor x, torch::Tensor table, torch::Tensor res,
                                                torch::Tensor dense, torch::Tensor grad_out) {
  check(x, table, res, dense);
  grad_out = grad_out.contiguous();
  const int64_t N = x.size(0), L = table.size(0), T = table.size(1), F = table.size(2);
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(1) == L * F, "hash_encode_backward: grad_out must be [N, L*F]");
  const int threads = at::get_num_threads();
  std::vector<torch::Tensor> buffers(threads);
  auto grad_x = torch::zeros_like(x);
  const float* xp = x.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  const int64_t* rp = res.data_ptr<int64_t>();
  const bool* dp = dense.data_ptr<bool>();
  const float* gp = grad_out.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
  const int64_t chunk = (N + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      buffers[t] = torch::zeros_like(table);
      float* gt = buffers[t].data_ptr<float>();
      Corner c;
      for (int64_t n = t * chunk; n < std::min(N, (t + 1) * chunk); ++n) {
        float gx[3] = {0.f, 0.f, 0.f};
        for (int64_t l = 0; l < L; ++l) {
          corners(xp + 3 * n, rp[l], dp[l], T, c);
          const float* g = gp + n * L * F + l * F;
          const float* tl = tp + l * T * F;
          float* gl = gt + l * T * F;
          for (int k = 0; k < 8; ++k) {
            float dot = 0.f;
            for (int64_t f = 0; f < F; ++f) {
              gl[c.row[k] * F + f] += c.w[k] * g[f];
              dot += tl[c.row[k] * F + f] * g[f];
            }
            for (int a = 0; a < 3; ++a) gx[a] += c.dw[k][a] * dot * static_cast<float>(rp[l]);
          }
        }
        for (int a = 0; a < 3; ++a) {
          const float xa = xp[3 * n + a];
          gxp[3 * n + a] = (xa >= 0.f && xa <= 1.f) ? gx[a] : 0.f;
        }
      }
    }
  });
  auto grad_table = torch::zeros_like(table);
  for (int t = 0; t < threads; ++t)
    if (buffers[t].defined()) grad_table += buffers[t];
  return {grad_x, grad_table};
}

// Index of the nearest row of codebook [K, D] (squared Euclidean distance; the first on ties, as
// torch.argmin) for every row of x [N, D]; float32.
torch::Tensor nearest_codeword(torch::Tensor x, torch::Tensor codebook) {
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2 && x.size(1) == codebook.size(1) &&
                  x.scalar_type() == torch::kFloat && codebook.scalar_type() == torch::kFloat,
              "nearest_codeword: float32 x [N, D] and codebook [K, D] expected");
  x = x.contiguous();
  const int64_t N = x.size(0), K = codebook.size(0), D = x.size(1);
  auto ct = codebook.t().contiguous();  // [D, K]: the loop over codewords vectorizes
  auto out = torch::empty({N}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  const float* cp = ct.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, N, 1024, [&](int64_t b, int64_t e) {
    std::vector<float> d2(K);
    for (int64_t n = b; n < e; ++n) {
      std::fill(d2.begin(), d2.end(), 0.f);
      for (int64_t d = 0; d < D; ++d) {
        const float xd = xp[n * D + d];
        const float* c = cp + d * K;
        for (int64_t k = 0; k < K; ++k) {
          const float t = xd - c[k];
          d2[k] += t * t;
        }
      }
      int64_t arg = 0;
      for (int64_t k = 1; k < K; ++k)
        if (d2[k] < d2[arg]) arg = k;
      op[n] = arg;
    }
  });
  return out;
}
