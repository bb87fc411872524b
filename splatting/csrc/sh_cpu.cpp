// CPU kernel of the SH colour model (splatting/sh.py), forward and analytic backward, fused with the
// gather of each visible Gaussian's coefficients.
//
// Entry i is Gaussian ids[i] seen along dirs[i] (camera to Gaussian, any length): with the unit
// direction u = d / |d| and the real SH basis Y_k(u) of splatting/sh.py (3DGS / gsplat order and
// signs), colour_c = sum_{k < n} Y_k(u) coeffs[ids[i], k, c], n = (degree + 1)^2.
// Backward: d coeffs[ids[i], k, c] += Y_k(u) v_c; d u = sum_k (sum_c coeffs v_c) grad Y_k(u) (the
// polynomials' gradients, written out below), then d d = (d u - u (u . d u)) / |d|. The ids of one
// call must be distinct (one camera's visible Gaussians), so entries write disjoint coefficient
// rows and the backward needs no per-thread buffers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

constexpr double kC0 = 0.28209479177387814, kC1 = 0.4886025119029199;
constexpr double kC2[5] = {1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
                           0.5462742152960396};
constexpr double kC3[7] = {-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
                           -0.4570457994644658, 1.445305721320277, -0.5900435899266435};

// Basis values Y[0..n) at the unit vector (x, y, z); with grad != nullptr also dY/d(x, y, z) in
// grad[k][0..3) (the gradient of the polynomial, not restricted to the sphere).
template <typename T>
inline void basis(int degree, T x, T y, T z, T* Y, T (*grad)[3]) {
  Y[0] = T(kC0);
  if (grad) grad[0][0] = grad[0][1] = grad[0][2] = T(0);
  if (degree < 1) return;
  const T c1 = T(kC1);
  Y[1] = -c1 * y, Y[2] = c1 * z, Y[3] = -c1 * x;
  if (grad) {
    T g[3][3] = {{0, -c1, 0}, {0, 0, c1}, {-c1, 0, 0}};
    for (int k = 0; k < 3; ++k)
      for (int a = 0; a < 3; ++a) grad[1 + k][a] = g[k][a];
  }
  if (degree < 2) return;
  const T xx = x * x, yy = y * y, zz = z * z, xy = x * y, yz = y * z, xz = x * z;
  T c2[5];
  for (int k = 0; k < 5; ++k) c2[k] = T(kC2[k]);
  Y[4] = c2[0] * xy, Y[5] = c2[1] * yz, Y[6] = c2[2] * (2 * zz - xx - yy), Y[7] = c2[3] * xz,
  Y[8] = c2[4] * (xx - yy);
  if (grad) {
    T g[5][3] = {{c2[0] * y, c2[0] * x, 0},
                 {0, c2[1] * z, c2[1] * y},
                 {-2 * c2[2] * x, -2 * c2[2] * y, 4 * c2[2] * z},
                 {c2[3] * z, 0, c2[3] * x},
                 {2 * c2[4] * x, -2 * c2[4] * y, 0}};
    for (int k = 0; k < 5; ++k)
      for (int a = 0; a < 3; ++a) grad[4 + k][a] = g[k][a];
  }
  if (degree < 3) return;
  T c3[7];
  for (int k = 0; k < 7; ++k) c3[k] = T(kC3[k]);
  Y[9] = c3[0] * y * (3 * xx - yy);
  Y[10] = c3[1] * xy * z;
  Y[11] = c3[2] * y * (4 * zz - xx - yy);
  Y[12] = c3[3] * z * (2 * zz - 3 * xx - 3 * yy);
  Y[13] = c3[4] * x * (4 * zz - xx - yy);
  Y[14] = c3[5] * z * (xx - yy);
  Y[15] = c3[6] * x * (xx - 3 * yy);
  if (grad) {
    T g[7][3] = {{6 * c3[0] * xy, 3 * c3[0] * (xx - yy), 0},
                 {c3[1] * yz, c3[1] * xz, c3[1] * xy},
                 {-2 * c3[2] * xy, c3[2] * (4 * zz - xx - 3 * yy), 8 * c3[2] * yz},
                 {-6 * c3[3] * xz, -6 * c3[3] * yz, c3[3] * (6 * zz - 3 * xx - 3 * yy)},
                 {c3[4] * (4 * zz - 3 * xx - yy), -2 * c3[4] * xy, 8 * c3[4] * xz},
                 {2 * c3[5] * xz, -2 * c3[5] * yz, c3[5] * (xx - yy)},
                 {3 * c3[6] * (xx - yy), -6 * c3[6] * xy, 0}};
    for (int k = 0; k < 7; ++k)
      for (int a = 0; a < 3; ++a) grad[9 + k][a] = g[k][a];
  }
}

void check(const torch::Tensor& dirs, const torch::Tensor& coeffs, const torch::Tensor& ids, int64_t degree) {
  TORCH_CHECK(degree >= 0 && degree <= 3, "sh: degree must be 0-3");
  TORCH_CHECK(dirs.dim() == 2 && dirs.size(1) == 3 && dirs.is_contiguous(), "sh: dirs must be contiguous [M, 3]");
  TORCH_CHECK(coeffs.dim() == 3 && coeffs.size(2) == 3 && coeffs.is_contiguous(), "sh: coeffs must be contiguous [N, K, 3]");
  TORCH_CHECK(coeffs.size(1) >= (degree + 1) * (degree + 1), "sh: too few coefficients for the degree");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == dirs.size(0) && ids.scalar_type() == torch::kInt64 && ids.is_contiguous(),
              "sh: ids must be contiguous int64 [M]");
  TORCH_CHECK(dirs.scalar_type() == coeffs.scalar_type(), "sh: dtypes must match");
}

}  // namespace

torch::Tensor sh_forward(torch::Tensor dirs, torch::Tensor coeffs, torch::Tensor ids, int64_t degree) {
  check(dirs, coeffs, ids, degree);
  const int64_t M = dirs.size(0), K = coeffs.size(1), n = (degree + 1) * (degree + 1);
  auto out = torch::empty({M, 3}, dirs.options());
  AT_DISPATCH_FLOATING_TYPES(dirs.scalar_type(), "sh_forward", [&] {
    const scalar_t* d = dirs.data_ptr<scalar_t>();
    const scalar_t* cf = coeffs.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1024, [&](int64_t b, int64_t e) {
      scalar_t Y[16];
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* di = d + i * 3;
        const scalar_t r = scalar_t(1) / std::max(std::sqrt(di[0] * di[0] + di[1] * di[1] + di[2] * di[2]), scalar_t(1e-12));
        basis<scalar_t>((int)degree, di[0] * r, di[1] * r, di[2] * r, Y, nullptr);
        const scalar_t* c = cf + id[i] * K * 3;
        scalar_t acc[3] = {0, 0, 0};
        for (int64_t k = 0; k < n; ++k)
          for (int a = 0; a < 3; ++a) acc[a] += Y[k] * c[k * 3 + a];
        for (int a = 0; a < 3; ++a) o[i * 3 + a] = acc[a];
      }
    });
  });
  return out;
}

// Adds d coeffs into v_coeffs ([N, K, 3], rows ids) and returns d dirs [M, 3].
torch::Tensor sh_backward(torch::Tensor dirs, torch::Tensor coeffs, torch::Tensor ids, int64_t degree,
                          torch::Tensor v_out, torch::Tensor v_coeffs) {
  check(dirs, coeffs, ids, degree);
  v_out = v_out.contiguous();
  TORCH_CHECK(v_coeffs.sizes() == coeffs.sizes() && v_coeffs.is_contiguous(), "sh: v_coeffs must be like coeffs");
  const int64_t M = dirs.size(0), K = coeffs.size(1), n = (degree + 1) * (degree + 1);
  auto v_dirs = torch::empty({M, 3}, dirs.options());
  AT_DISPATCH_FLOATING_TYPES(dirs.scalar_type(), "sh_backward", [&] {
    const scalar_t* d = dirs.data_ptr<scalar_t>();
    const scalar_t* cf = coeffs.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    const scalar_t* vo = v_out.data_ptr<scalar_t>();
    scalar_t* vc = v_coeffs.data_ptr<scalar_t>();
    scalar_t* vd = v_dirs.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1024, [&](int64_t b, int64_t e) {
      scalar_t Y[16], G[16][3];
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* di = d + i * 3;
        const scalar_t len = std::max(std::sqrt(di[0] * di[0] + di[1] * di[1] + di[2] * di[2]), scalar_t(1e-12));
        const scalar_t u[3] = {di[0] / len, di[1] / len, di[2] / len};
        basis<scalar_t>((int)degree, u[0], u[1], u[2], Y, G);
        const scalar_t* c = cf + id[i] * K * 3;
        scalar_t* g = vc + id[i] * K * 3;
        const scalar_t* v = vo + i * 3;
        scalar_t vu[3] = {0, 0, 0};
        for (int64_t k = 0; k < n; ++k) {
          const scalar_t vy = c[k * 3] * v[0] + c[k * 3 + 1] * v[1] + c[k * 3 + 2] * v[2];
          for (int a = 0; a < 3; ++a) {
            g[k * 3 + a] += Y[k] * v[a];
            vu[a] += vy * G[k][a];
          }
        }
        const scalar_t dot = u[0] * vu[0] + u[1] * vu[1] + u[2] * vu[2];
        for (int a = 0; a < 3; ++a) vd[i * 3 + a] = (vu[a] - u[a] * dot) / len;
      }
    });
  });
  return v_dirs;
}
