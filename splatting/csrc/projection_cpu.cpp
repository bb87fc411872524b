// CPU kernel of the EWA projection (splatting/projection.py, project_gaussians), forward and analytic
// backward, for the candidate Gaussians ids[] only (the ones maybe_visible keeps): outputs are the
// full [C, N] arrays, zero for the others, as _project_candidates in rasterize.py builds them.
//
// The same arithmetic as project_gaussians, per (camera, Gaussian): p_c = R_v p + t (x, y, z);
// M = R(q / |q|) diag(s); Mc = R_v M; u, v = x/z, y/z clamped to 1.3x the field of view; rows
// r0 = fx/z (Mc_0 - u Mc_2), r1 = fy/z (Mc_1 - v Mc_2) of J R_v M; cov2d = (r0.r0, r0.r1, r1.r1);
// eps2d added to the diagonal; conic = inverse of the dilated cov2d (its determinant clamped at
// 1e-10); compensation sqrt(det_orig / det) in antialiased mode; radius and culling without grad.
// The backward recomputes these per entry and runs them in reverse; it loops over the cameras
// inside each Gaussian, so every thread writes only its own Gaussians' gradient rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

struct Camera {
  double R[3][3], t[3], fx, fy, cx, cy, lox, hix, loy, hiy;
};

std::vector<Camera> cameras(const torch::Tensor& viewmats, const torch::Tensor& Ks, int64_t width, int64_t height) {
  auto vm = viewmats.to(torch::kCPU, torch::kDouble).contiguous();
  auto K = Ks.to(torch::kCPU, torch::kDouble).contiguous();
  const double* v = vm.data_ptr<double>();
  const double* k = K.data_ptr<double>();
  std::vector<Camera> cams(vm.size(0));
  for (size_t c = 0; c < cams.size(); ++c) {
    Camera& cam = cams[c];
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) cam.R[i][j] = v[c * 16 + i * 4 + j];
      cam.t[i] = v[c * 16 + i * 4 + 3];
    }
    cam.fx = k[c * 9 + 0], cam.fy = k[c * 9 + 4], cam.cx = k[c * 9 + 2], cam.cy = k[c * 9 + 5];
    const double tanx = 0.5 * width / cam.fx, tany = 0.5 * height / cam.fy;
    cam.lox = -(cam.cx / cam.fx + 0.3 * tanx), cam.hix = (width - cam.cx) / cam.fx + 0.3 * tanx;
    cam.loy = -(cam.cy / cam.fy + 0.3 * tany), cam.hiy = (height - cam.cy) / cam.fy + 0.3 * tany;
  }
  return cams;
}

// Unit quaternion (w, x, y, z) -> rotation, as quat_to_rotmat (normalised with F.normalize's eps).
template <typename T>
inline void rotmat(const T* q, T qn[4], T& inv_norm, T Rq[3][3]) {
  const T n = std::sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
  inv_norm = T(1) / std::max(n, T(1e-12));
  for (int i = 0; i < 4; ++i) qn[i] = q[i] * inv_norm;
  const T w = qn[0], x = qn[1], y = qn[2], z = qn[3];
  Rq[0][0] = 1 - 2 * (y * y + z * z), Rq[0][1] = 2 * (x * y - w * z), Rq[0][2] = 2 * (x * z + w * y);
  Rq[1][0] = 2 * (x * y + w * z), Rq[1][1] = 1 - 2 * (x * x + z * z), Rq[1][2] = 2 * (y * z - w * x);
  Rq[2][0] = 2 * (x * z - w * y), Rq[2][1] = 2 * (y * z + w * x), Rq[2][2] = 1 - 2 * (x * x + y * y);
}

// The per-(camera, Gaussian) intermediate values that both passes need.
template <typename T>
struct Entry {
  T x, y, z, rz, u, v, Mc[3][3], r0[3], r1[3], a, b, c, ap, cp, det_blur, det;
  bool u_free, v_free;  // the clamps of u, v pass gradient
};

template <typename T>
inline void project(const Camera& cam, const T* p, const T M[3][3], T eps2d, Entry<T>& e) {
  T pc[3];
  for (int i = 0; i < 3; ++i) {
    pc[i] = T(cam.t[i]);
    for (int j = 0; j < 3; ++j) pc[i] += T(cam.R[i][j]) * p[j];
    for (int j = 0; j < 3; ++j) {
      T s = 0;
      for (int k = 0; k < 3; ++k) s += T(cam.R[i][k]) * M[k][j];
      e.Mc[i][j] = s;
    }
  }
  e.x = pc[0], e.y = pc[1], e.z = pc[2];
  e.rz = T(1) / e.z;
  const T xz = e.x * e.rz, yz = e.y * e.rz;
  e.u = std::min(std::max(xz, T(cam.lox)), T(cam.hix));
  e.v = std::min(std::max(yz, T(cam.loy)), T(cam.hiy));
  e.u_free = xz >= T(cam.lox) && xz <= T(cam.hix);
  e.v_free = yz >= T(cam.loy) && yz <= T(cam.hiy);
  const T sx = T(cam.fx) * e.rz, sy = T(cam.fy) * e.rz;
  for (int j = 0; j < 3; ++j) {
    e.r0[j] = sx * (e.Mc[0][j] - e.u * e.Mc[2][j]);
    e.r1[j] = sy * (e.Mc[1][j] - e.v * e.Mc[2][j]);
  }
  e.a = e.r0[0] * e.r0[0] + e.r0[1] * e.r0[1] + e.r0[2] * e.r0[2];
  e.b = e.r0[0] * e.r1[0] + e.r0[1] * e.r1[1] + e.r0[2] * e.r1[2];
  e.c = e.r1[0] * e.r1[0] + e.r1[1] * e.r1[1] + e.r1[2] * e.r1[2];
  e.ap = e.a + eps2d, e.cp = e.c + eps2d;
  e.det_blur = e.ap * e.cp - e.b * e.b;
  e.det = std::max(e.det_blur, T(1e-10));
}

template <typename T>
inline void scaled_rotation(const T* q, const T* s, T qn[4], T& inv_norm, T Rq[3][3], T M[3][3]) {
  rotmat(q, qn, inv_norm, Rq);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) M[i][j] = Rq[i][j] * s[j];
}

void check(const torch::Tensor& means, const torch::Tensor& quats, const torch::Tensor& scales,
           const torch::Tensor& ids) {
  TORCH_CHECK(means.dim() == 2 && means.size(1) == 3 && means.is_contiguous(), "projection: means must be contiguous [N, 3]");
  TORCH_CHECK(quats.sizes() == torch::IntArrayRef({means.size(0), 4}) && quats.is_contiguous() &&
              quats.scalar_type() == means.scalar_type(), "projection: quats must be contiguous [N, 4] like means");
  TORCH_CHECK(scales.sizes() == means.sizes() && scales.is_contiguous() && scales.scalar_type() == means.scalar_type(),
              "projection: scales must be contiguous [N, 3] like means");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kLong && ids.is_contiguous(), "projection: ids must be int64 [M]");
}

}  // namespace

// -> means2d [C, N, 2], conics [C, N, 3], depths [C, N], radii [C, N] int32, compensations [C, N]
// (empty unless antialiased); zero outside ids.
std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                           torch::Tensor viewmats, torch::Tensor Ks, torch::Tensor ids, int64_t width,
                                           int64_t height, double eps2d, double near_plane, double far_plane,
                                           double radius_clip, bool antialiased) {
  check(means, quats, scales, ids);
  const auto cams = cameras(viewmats, Ks, width, height);
  const int64_t C = cams.size(), N = means.size(0), M = ids.size(0);
  auto opts = means.options();
  auto means2d = torch::zeros({C, N, 2}, opts), conics = torch::zeros({C, N, 3}, opts);
  auto depths = torch::zeros({C, N}, opts);
  auto radii = torch::zeros({C, N}, opts.dtype(torch::kInt));
  auto comps = antialiased ? torch::zeros({C, N}, opts) : torch::empty({0}, opts);
  const int64_t* id = ids.data_ptr<int64_t>();
  int32_t* rad = radii.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_forward", [&] {
    using T = scalar_t;
    const T *P = means.data_ptr<T>(), *Q = quats.data_ptr<T>(), *S = scales.data_ptr<T>();
    T *m2 = means2d.data_ptr<T>(), *con = conics.data_ptr<T>(), *dep = depths.data_ptr<T>();
    T* cmp = antialiased ? comps.data_ptr<T>() : nullptr;
    at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = id[i];
        T qn[4], inv_norm, Rq[3][3], Mw[3][3];
        scaled_rotation(Q + 4 * n, S + 3 * n, qn, inv_norm, Rq, Mw);
        for (int64_t c = 0; c < C; ++c) {
          const Camera& cam = cams[c];
          Entry<T> e;
          project(cam, P + 3 * n, Mw, T(eps2d), e);
          const int64_t k = c * N + n;
          const T mx = T(cam.fx) * e.x * e.rz + T(cam.cx), my = T(cam.fy) * e.y * e.rz + T(cam.cy);
          m2[2 * k] = mx, m2[2 * k + 1] = my;
          con[3 * k] = e.cp / e.det, con[3 * k + 1] = -e.b / e.det, con[3 * k + 2] = e.ap / e.det;
          dep[k] = e.z;
          if (cmp) cmp[k] = std::sqrt(std::max((e.a * e.c - e.b * e.b) / e.det, T(0)));
          const T mid = T(0.5) * (e.ap + e.cp);
          const T radius = std::ceil(T(3) * std::sqrt(mid + std::sqrt(std::max(mid * mid - e.det, T(0.01)))));
          const bool valid = e.det_blur > 0 && e.z > T(near_plane) && e.z < T(far_plane) && radius > T(radius_clip) &&
                             mx + radius > 0 && mx - radius < T(width) && my + radius > 0 && my - radius < T(height);
          rad[k] = valid ? static_cast<int32_t>(radius) : 0;
        }
      }
    });
  });
  return {means2d, conics, depths, radii, comps};
}

// -> v_means [N, 3], v_quats [N, 4], v_scales [N, 3] (zero outside ids). v_comps: empty unless
// antialiased.
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                            torch::Tensor viewmats, torch::Tensor Ks, torch::Tensor ids, int64_t width,
                                            int64_t height, double eps2d, torch::Tensor v_means2d,
                                            torch::Tensor v_conics, torch::Tensor v_depths, torch::Tensor v_comps) {
  check(means, quats, scales, ids);
  const auto cams = cameras(viewmats, Ks, width, height);
  const int64_t C = cams.size(), N = means.size(0), M = ids.size(0);
  const bool aa = v_comps.numel() > 0;
  v_means2d = v_means2d.contiguous(), v_conics = v_conics.contiguous(), v_depths = v_depths.contiguous();
  v_comps = v_comps.contiguous();
  auto v_means = torch::zeros_like(means), v_quats = torch::zeros_like(quats), v_scales = torch::zeros_like(scales);
  const int64_t* id = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_backward", [&] {
    using T = scalar_t;
    const T *P = means.data_ptr<T>(), *Q = quats.data_ptr<T>(), *S = scales.data_ptr<T>();
    const T *gm2 = v_means2d.data_ptr<T>(), *gcon = v_conics.data_ptr<T>(), *gdep = v_depths.data_ptr<T>();
    const T* gcmp = aa ? v_comps.data_ptr<T>() : nullptr;
    T *vP = v_means.data_ptr<T>(), *vQ = v_quats.data_ptr<T>(), *vS = v_scales.data_ptr<T>();
    at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = id[i];
        T qn[4], inv_norm, Rq[3][3], Mw[3][3];
        scaled_rotation(Q + 4 * n, S + 3 * n, qn, inv_norm, Rq, Mw);
        T g_p[3] = {0, 0, 0}, g_M[3][3] = {{0, 0, 0}, {0, 0, 0}, {0, 0, 0}};
        for (int64_t c = 0; c < C; ++c) {
          const int64_t k = c * N + n;
          const T g_mx = gm2[2 * k], g_my = gm2[2 * k + 1], g0 = gcon[3 * k], g1 = gcon[3 * k + 1],
                  g2 = gcon[3 * k + 2], g_z0 = gdep[k], g_cmp = gcmp ? gcmp[k] : T(0);
          if (g_mx == 0 && g_my == 0 && g0 == 0 && g1 == 0 && g2 == 0 && g_z0 == 0 && g_cmp == 0) continue;
          const Camera& cam = cams[c];
          Entry<T> e;
          project(cam, P + 3 * n, Mw, T(eps2d), e);
          const T det2 = e.det * e.det;
          // conic = (cp, -b, ap) / det
          T g_ap = g2 / e.det, g_cp = g0 / e.det, g_b = -g1 / e.det;
          T g_det = -(g0 * e.cp - g1 * e.b + g2 * e.ap) / det2;
          T g_a = 0, g_c = 0;
          if (gcmp) {  // comp = sqrt(max(det_orig / det, 0))
            const T det_orig = e.a * e.c - e.b * e.b, ratio = det_orig / e.det;
            if (ratio > 0) {
              const T g_ratio = g_cmp * T(0.5) / std::sqrt(ratio);
              const T g_do = g_ratio / e.det;
              g_det -= g_ratio * det_orig / det2;
              g_a += g_do * e.c, g_c += g_do * e.a, g_b -= 2 * e.b * g_do;
            }
          }
          if (e.det_blur >= T(1e-10)) {  // det = max(det_blur, 1e-10); det_blur = ap cp - b^2
            g_ap += g_det * e.cp, g_cp += g_det * e.ap, g_b -= 2 * e.b * g_det;
          }
          g_a += g_ap, g_c += g_cp;
          // a = r0.r0, b = r0.r1, c = r1.r1
          T g_r0[3], g_r1[3];
          for (int j = 0; j < 3; ++j) {
            g_r0[j] = 2 * g_a * e.r0[j] + g_b * e.r1[j];
            g_r1[j] = 2 * g_c * e.r1[j] + g_b * e.r0[j];
          }
          // r0 = fx rz A0, A0 = Mc_0 - u Mc_2 (r1 likewise with fy, v, Mc_1)
          const T sx = T(cam.fx) * e.rz, sy = T(cam.fy) * e.rz;
          T g_rz = 0, g_u = 0, g_v = 0, g_Mc[3][3];
          for (int j = 0; j < 3; ++j) {
            const T A0 = e.Mc[0][j] - e.u * e.Mc[2][j], A1 = e.Mc[1][j] - e.v * e.Mc[2][j];
            const T gA0 = sx * g_r0[j], gA1 = sy * g_r1[j];
            g_rz += T(cam.fx) * A0 * g_r0[j] + T(cam.fy) * A1 * g_r1[j];
            g_Mc[0][j] = gA0, g_Mc[1][j] = gA1, g_Mc[2][j] = -e.u * gA0 - e.v * gA1;
            g_u -= e.Mc[2][j] * gA0, g_v -= e.Mc[2][j] * gA1;
          }
          // means2d = (fx x rz + cx, fy y rz + cy); u = clamp(x rz), v = clamp(y rz); depth = z
          T g_x = T(cam.fx) * e.rz * g_mx, g_y = T(cam.fy) * e.rz * g_my;
          g_rz += T(cam.fx) * e.x * g_mx + T(cam.fy) * e.y * g_my;
          if (e.u_free) g_x += e.rz * g_u, g_rz += e.x * g_u;
          if (e.v_free) g_y += e.rz * g_v, g_rz += e.y * g_v;
          const T g_z = g_z0 - e.rz * e.rz * g_rz;
          // p_c = R_v p + t, Mc = R_v M
          const T g_pc[3] = {g_x, g_y, g_z};
          for (int j = 0; j < 3; ++j)
            for (int r = 0; r < 3; ++r) {
              g_p[j] += T(cam.R[r][j]) * g_pc[r];
              for (int col = 0; col < 3; ++col) g_M[j][col] += T(cam.R[r][j]) * g_Mc[r][col];
            }
        }
        for (int j = 0; j < 3; ++j) vP[3 * n + j] = g_p[j];
        // M = Rq diag(s)
        T G[3][3];
        for (int r = 0; r < 3; ++r)
          for (int col = 0; col < 3; ++col) G[r][col] = g_M[r][col] * S[3 * n + col];
        for (int col = 0; col < 3; ++col)
          vS[3 * n + col] = g_M[0][col] * Rq[0][col] + g_M[1][col] * Rq[1][col] + g_M[2][col] * Rq[2][col];
        // Rq(qn), then qn = q / |q|
        const T w = qn[0], x = qn[1], y = qn[2], z = qn[3];
        T gq[4];
        gq[0] = 2 * (-z * G[0][1] + y * G[0][2] + z * G[1][0] - x * G[1][2] - y * G[2][0] + x * G[2][1]);
        gq[1] = 2 * (y * G[0][1] + z * G[0][2] + y * G[1][0] - 2 * x * G[1][1] - w * G[1][2] + z * G[2][0] +
                     w * G[2][1] - 2 * x * G[2][2]);
        gq[2] = 2 * (-2 * y * G[0][0] + x * G[0][1] + w * G[0][2] + x * G[1][0] + z * G[1][2] - w * G[2][0] +
                     z * G[2][1] - 2 * y * G[2][2]);
        gq[3] = 2 * (-2 * z * G[0][0] - w * G[0][1] + x * G[0][2] + w * G[1][0] - 2 * z * G[1][1] + y * G[1][2] +
                     x * G[2][0] + y * G[2][1]);
        const T dot = qn[0] * gq[0] + qn[1] * gq[1] + qn[2] * gq[2] + qn[3] * gq[3];
        for (int j = 0; j < 4; ++j) vQ[4 * n + j] = (gq[j] - qn[j] * dot) * inv_norm;
      }
    });
  });
  return {v_means, v_quats, v_scales};
}
