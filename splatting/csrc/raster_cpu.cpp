// CPU Gaussian rasterizer: tile binning, forward and analytic backward alpha compositing.
//
// The algorithm is gsplat's (16 x 16 pixel tiles; per tile the Gaussians touching it in increasing
// depth; per pixel front-to-back compositing), arranged for a CPU:
//  * bin_gaussians: per Gaussian, the pixel box outside which its alpha is below 1/255 (from its
//    opacity and conic: tighter than gsplat's 3-sigma square, same pixels composited); then a
//    counting sort of Gaussians into the tiles their box touches and their alpha >= 1/255 ellipse
//    reaches (visited in depth order, so each tile's list comes out sorted by depth).
//  * raster_forward: a tile walks its list once; each Gaussian updates the pixels of its footprint
//    box's rows in the 4-px-wide column strips the box touches (outside the box alpha < 1/255 is
//    guaranteed, so whole strip rows are safe), one branch-free loop per strip that the compiler
//    vectorises (exp included, through glibc's vector maths). Per pixel:
//        sigma = 0.5 (a dx^2 + c dy^2) + b dx dy,   d = mean2d - (pixel + 0.5)
//        alpha = min(0.999, opacity exp(-sigma)), skipped if sigma < 0 or alpha < 1/255,
//    and the pixel stops before the Gaussian that would bring its transmittance to <= 1e-4.
//  * raster_backward: the same walk back to front from each pixel's last Gaussian, recovering
//    the transmittance in front of each Gaussian by division (as gsplat does). Gradients of
//    Gaussians shared by tiles of different threads go to per-thread buffers summed at the end.
//  * Both split the tiles statically over torch's threads (at::parallel_for), so the same thread
//    count gives bitwise the same results. (A split balanced by estimated tile cost was measured
//    no faster, within 1%, on the fox views, and was dropped.)
// Templated on the float type (float for speed, double for gradcheck) and on the channel count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr int kMaxTile = 32;

template <typename T>
struct Consts {
  static constexpr T a_min = T(1.0 / 255.0);
  static constexpr T a_max = T(0.999);
  static constexpr T t_min = T(1e-4);
};

// Half-widths of the pixel box outside which a Gaussian has alpha < 1/255: op exp(-sigma) >= 1/255
// needs sigma <= s = log(255 op), and the ellipse 0.5 d^T Q d <= s has half-widths
// sqrt(2 s (Q^-1)_xx), sqrt(2 s (Q^-1)_yy). One pixel of margin keeps the box conservative under
// rounding; the exact alpha test still decides every pixel inside it. Returns false if the
// Gaussian can never reach alpha 1/255; a degenerate conic gets an unbounded box.
inline bool extent(double ca, double cb, double cc, double op, double& hx, double& hy) {
  if (!(op >= 1.0 / 255.0)) return false;
  const double det = ca * cc - cb * cb;
  if (!(det > 0)) {
    hx = hy = 1e30;
    return true;
  }
  const double s = std::log(op * 255.0);
  hx = std::sqrt(2.0 * s * cc / det) + 1.0;
  hy = std::sqrt(2.0 * s * ca / det) + 1.0;
  return true;
}

// The part of a Gaussian's box inside the tile at (x_org, y_org): local pixel indices, inclusive.
template <typename T>
inline bool footprint(T mx, T my, const double* ext, int x_org, int y_org, int tile, int& lx0, int& lx1, int& ly0,
                      int& ly1) {
  const double hx = ext[0], hy = ext[1];
  const double cx = (double)mx - 0.5 - x_org, cy = (double)my - 0.5 - y_org;
  auto clampd = [&](double v) { return std::min(std::max(v, -1.0), tile + 1.0); };
  lx0 = std::max((int)std::floor(clampd(cx - hx)), 0);
  lx1 = std::min((int)std::ceil(clampd(cx + hx)), tile - 1);
  ly0 = std::max((int)std::floor(clampd(cy - hy)), 0);
  ly1 = std::min((int)std::ceil(clampd(cy + hy)), tile - 1);
  return lx0 <= lx1 && ly0 <= ly1;
}

// Pixel layout inside a tile: kStrip-wide columns stored one after another, each row-major
// (pixel (x, y) at (x / kStrip) * tile * kStrip + y * kStrip + x % kStrip). The pixels of a
// Gaussian's box rows within one strip are then contiguous, so the compositing loops run over the
// strips the box touches instead of whole tile rows: on a trained fox scene (100k Gaussians, 266x475)
// 20.5M instead of 32.5M pixel evaluations per view. A tile size not divisible by kStrip uses one
// strip of the tile's width.
constexpr int kStrip = 4;

inline int strip_width(int tile) { return tile % kStrip == 0 ? kStrip : tile; }

// Local (x, y) of the pixel at layout index p.
inline void strip_xy(int64_t p, int tile, int sw, int& x, int& y) {
  x = (int)(p / ((int64_t)sw * tile)) * sw + (int)(p % sw);
  y = (int)((p / sw) % tile);
}

// Least value of sigma(d) = 0.5 (a dx^2 + c dy^2) + b dx dy (a positive definite conic) over the
// box dx in [x0, x1], dy in [y0, y1]: 0 if the box holds the origin, else the least of the minima
// along its four edges (a convex function's minimum over a convex polygon not holding the
// unconstrained minimum lies on its boundary).
inline double min_sigma_box(double a, double b, double c, double x0, double x1, double y0, double y1) {
  if (x0 <= 0 && 0 <= x1 && y0 <= 0 && 0 <= y1) return 0;
  auto q = [&](double x, double y) { return 0.5 * (a * x * x + c * y * y) + b * x * y; };
  auto cl = [](double v, double lo, double hi) { return std::min(std::max(v, lo), hi); };
  return std::min(std::min(q(x0, cl(-b * x0 / c, y0, y1)), q(x1, cl(-b * x1 / c, y0, y1))),
                  std::min(q(cl(-b * y0 / a, x0, x1), y0), q(cl(-b * y1 / a, x0, x1), y1)));
}

}  // namespace

std::vector<torch::Tensor> bin_gaussians(torch::Tensor means2d, torch::Tensor conics, torch::Tensor opacities,
                                         torch::Tensor radii, torch::Tensor depths, int64_t tile, int64_t tw,
                                         int64_t th) {
  TORCH_CHECK(means2d.dim() == 3 && means2d.size(2) == 2, "means2d must be [C, N, 2]");
  auto m = means2d.to(torch::kFloat64).contiguous();
  auto cn = conics.to(torch::kFloat64).contiguous();
  auto opa = opacities.to(torch::kFloat64).contiguous();
  auto r = radii.to(torch::kInt32).contiguous();
  auto dep = depths.to(torch::kFloat64).contiguous();
  const int64_t C = r.size(0), N = r.size(1), n_tiles = th * tw;
  TORCH_CHECK(cn.numel() == C * N * 3 && opa.numel() == C * N && dep.numel() == C * N, "bin_gaussians: shapes");
  const double* mp = m.data_ptr<double>();
  const double* cp = cn.data_ptr<double>();
  const double* opp = opa.data_ptr<double>();
  const int32_t* rp = r.data_ptr<int32_t>();
  const double* dp = dep.data_ptr<double>();
  // per Gaussian: its box half-widths (ext) and its tile rectangle (x0, x1, y0, y1; empty if culled)
  auto ext = torch::empty({C * N, 2}, torch::kFloat64);
  double* ep = ext.data_ptr<double>();
  std::vector<int32_t> rect(C * N * 4);
  at::parallel_for(0, C * N, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      int32_t* rc = rect.data() + i * 4;
      rc[0] = rc[1] = rc[2] = rc[3] = 0;
      ep[i * 2] = ep[i * 2 + 1] = -1.0;
      if (rp[i] <= 0 || !extent(cp[i * 3], cp[i * 3 + 1], cp[i * 3 + 2], opp[i], ep[i * 2], ep[i * 2 + 1])) continue;
      // the tiles of gsplat's 3-sigma square (mean +- radius), intersected with those of the alpha
      // box (pixel u is inside it when |u + 0.5 - mx| <= hx)
      const double mx = mp[i * 2], my = mp[i * 2 + 1], rad = rp[i], hx = ep[i * 2], hy = ep[i * 2 + 1];
      auto lo = [&](double v, int64_t n) { return (int32_t)std::min<double>(std::max(v, 0.0), (double)n); };
      rc[0] = std::max(lo(std::floor((mx - rad) / tile), tw), lo(std::floor((mx - 0.5 - hx) / tile), tw));
      rc[1] = std::min(lo(std::ceil((mx + rad) / tile), tw), lo(std::floor((mx - 0.5 + hx) / tile) + 1.0, tw));
      rc[2] = std::max(lo(std::floor((my - rad) / tile), th), lo(std::floor((my - 0.5 - hy) / tile), th));
      rc[3] = std::min(lo(std::ceil((my + rad) / tile), th), lo(std::floor((my - 0.5 + hy) / tile) + 1.0, th));
      if (rc[1] < rc[0]) rc[1] = rc[0];
      if (rc[3] < rc[2]) rc[3] = rc[2];
    }
  });
  // The tiles of each rectangle that the Gaussian's alpha >= 1/255 ellipse (sigma <= log(255 op))
  // reaches, tested on the box of the tile's pixel centres (with a small margin): the rest of the
  // rectangle is corners its ellipse misses. Dropping those pairs (a quarter of them on a trained
  // fox scene) changes no pixel, and the forward and backward skip their work.
  std::vector<int64_t> first(C * N + 1, 0);  // Gaussian i's tiles: kept[first[i] .. first[i + 1])
  for (int64_t i = 0; i < C * N; ++i) {
    const int32_t* rc = rect.data() + i * 4;
    first[i + 1] = first[i] + (int64_t)(rc[1] - rc[0]) * (rc[3] - rc[2]);
  }
  std::vector<int32_t> kept(first[C * N]);  // tile index within the camera, or -1
  at::parallel_for(0, C * N, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int32_t* rc = rect.data() + i * 4;
      const double a = cp[i * 3], bb = cp[i * 3 + 1], c = cp[i * 3 + 2], mx = mp[i * 2], my = mp[i * 2 + 1];
      const bool test = a * c - bb * bb > 0;  // a degenerate conic keeps its whole rectangle
      const double s_max = test ? std::log(opp[i] * 255.0) + 1e-3 : 0.0;
      int64_t k = first[i];
      for (int ty = rc[2]; ty < rc[3]; ++ty)
        for (int tx = rc[0]; tx < rc[1]; ++tx) {
          // d = mean - pixel centre over the tile's centres x_org + 0.5 .. x_org + tile - 0.5
          const bool hit = !test || min_sigma_box(a, bb, c, mx - (tx + 1.0) * tile + 0.5, mx - tx * tile - 0.5,
                                                  my - (ty + 1.0) * tile + 0.5, my - ty * tile - 0.5) <= s_max;
          kept[k++] = hit ? (int32_t)(ty * tw + tx) : -1;
        }
    }
  });
  auto offsets = torch::zeros({C * n_tiles + 1}, torch::kInt64);
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < C * N; ++i) {
    const int64_t base = (i / N) * n_tiles + 1;
    for (int64_t k = first[i]; k < first[i + 1]; ++k)
      if (kept[k] >= 0) off[base + kept[k]] += 1;
  }
  for (int64_t t = 0; t < C * n_tiles; ++t) off[t + 1] += off[t];
  auto ids = torch::empty({off[C * n_tiles]}, torch::kInt64);
  int64_t* idp = ids.data_ptr<int64_t>();
  // visit the binned Gaussians of each camera by increasing (depth, index): lists come out sorted
  std::vector<int64_t> cursor(off, off + C * n_tiles);
  std::vector<std::pair<double, int64_t>> order;
  for (int64_t c = 0; c < C; ++c) {
    order.clear();
    for (int64_t g = c * N; g < (c + 1) * N; ++g) {
      const int32_t* rc = rect.data() + g * 4;
      if (rc[1] > rc[0] && rc[3] > rc[2]) order.emplace_back(dp[g], g);
    }
    std::sort(order.begin(), order.end());
    for (const auto& dg : order) {
      const int64_t g = dg.second;
      for (int64_t k = first[g]; k < first[g + 1]; ++k)
        if (kept[k] >= 0) idp[cursor[c * n_tiles + kept[k]]++] = g;
    }
  }
  return {offsets, ids, ext};
}

namespace {

// DC > 0: compile-time channel count; DC == 0: runtime D.
template <typename T, int DC>
void forward_impl(const T* m2, const T* cn, const T* cl, const T* opa, const T* bg, const int64_t* off,
                  const int64_t* ids, const double* ext, int64_t C, int64_t D_rt, int64_t width, int64_t height,
                  int tile, T* out_color,
                  T* out_T, int32_t* out_last) {
  const int64_t D = DC > 0 ? DC : D_rt;
  const int64_t tw = (width + tile - 1) / tile, th = (height + tile - 1) / tile, P = (int64_t)tile * tile;
  const int sw = strip_width(tile);
  at::parallel_for(0, C * th * tw, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<T> Tr(P), acc(D * P), w(P), px(P), py(P);  // px, py: pixel centres
    std::vector<T> act(P);  // 1 = still compositing, 0 = stopped or outside the image
    std::vector<int32_t> last(P);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c = t / (th * tw), ty = (t % (th * tw)) / tw, tx = t % tw;
      const int x_org = (int)(tx * tile), y_org = (int)(ty * tile);
      int64_t n_act = 0;
      for (int64_t p = 0; p < P; ++p) {
        int lx, ly;
        strip_xy(p, tile, sw, lx, ly);
        const bool in = x_org + lx < width && y_org + ly < height;
        px[p] = T(x_org + lx) + T(0.5);
        py[p] = T(y_org + ly) + T(0.5);
        act[p] = in ? T(1) : T(0);
        n_act += in;
        Tr[p] = T(1);
        last[p] = -1;
      }
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t start = off[t], end = off[t + 1];
      for (int64_t k = start; k < end && n_act > 0; ++k) {
        const int64_t g = ids[k];
        const T mx = m2[g * 2], my = m2[g * 2 + 1];
        const T ca = cn[g * 3], cb = cn[g * 3 + 1], cc = cn[g * 3 + 2], op = opa[g];
        int lx0, lx1, ly0, ly1;
        if (!footprint(mx, my, ext + g * 2, x_org, y_org, tile, lx0, lx1, ly0, ly1)) continue;
        const int32_t kl = (int32_t)(k - start);
        // Per strip the box touches, one branch-free pass over its rows ly0..ly1 (pixels there
        // outside the box fail the alpha test): alpha, transmittance, stop test and, for RGB, the
        // colour accumulation. Channels beyond DC alias channel 0 and are never touched.
        T* a0 = acc.data();
        T* a1 = acc.data() + (DC > 1 ? 1 : 0) * P;
        T* a2 = acc.data() + (DC > 2 ? 2 : 0) * P;
        const T c0 = DC == 3 ? cl[g * 3] : T(0), c1 = DC == 3 ? cl[g * 3 + 1] : T(0),
                c2 = DC == 3 ? cl[g * 3 + 2] : T(0);
        int64_t stops = 0;
        for (int st = lx0 / sw; st <= lx1 / sw; ++st) {
          const int64_t p0 = (int64_t)st * sw * tile + (int64_t)ly0 * sw, p1 = p0 + (int64_t)(ly1 - ly0 + 1) * sw;
#pragma omp simd reduction(+ : stops)
          for (int64_t p = p0; p < p1; ++p) {
            const T dx = mx - px[p], dy = my - py[p];
            const T sigma = T(0.5) * (ca * dx * dx + cc * dy * dy) + cb * dx * dy;
            const T alpha = std::min(Consts<T>::a_max, op * std::exp(-sigma));
            const T tr = Tr[p];
            // non-short-circuit boolean algebra and selects: the loop stays branch-free (vectorised)
            const bool valid = (act[p] > T(0)) & (sigma >= T(0)) & (alpha >= Consts<T>::a_min);
            const T nt = tr * (T(1) - alpha);
            const bool stop = valid & (nt <= Consts<T>::t_min);
            const bool use = valid & !stop;
            act[p] = stop ? T(0) : act[p];
            stops += stop ? 1 : 0;
            const T wt = use ? alpha * tr : T(0);
            Tr[p] = use ? nt : tr;
            last[p] = use ? kl : last[p];
            if constexpr (DC == 3) {
              a0[p] += wt * c0;
              a1[p] += wt * c1;
              a2[p] += wt * c2;
            } else {
              w[p] = wt;
            }
          }
          if constexpr (DC != 3) {
            for (int64_t d = 0; d < D; ++d) {
              const T col = cl[g * D + d];
              T* acc_d = acc.data() + d * P;
              for (int64_t p = p0; p < p1; ++p) acc_d[p] += w[p] * col;
            }
          }
        }
        n_act -= stops;
      }
      for (int64_t p = 0; p < P; ++p) {
        int lx, ly;
        strip_xy(p, tile, sw, lx, ly);
        const int64_t x = x_org + lx, y = y_org + ly;
        if (x >= width || y >= height) continue;
        const int64_t pix = (c * height + y) * width + x;
        for (int64_t d = 0; d < D; ++d) out_color[pix * D + d] = acc[d * P + p] + Tr[p] * bg[c * D + d];
        out_T[pix] = Tr[p];
        out_last[pix] = last[p];
      }
    }
  });
}

template <typename T, int DC>
void backward_impl(const T* m2, const T* cn, const T* cl, const T* opa, const T* bg, const int64_t* off,
                   const int64_t* ids, const double* ext, int64_t C, int64_t N, int64_t D_rt, int64_t width,
                   int64_t height, int tile,
                   const T* out_T, const int32_t* out_last, const T* v_color, const T* v_alpha, T* grads,
                   int64_t n_buf) {
  const int64_t D = DC > 0 ? DC : D_rt;
  const int64_t G = 6 + D;
  const int64_t tw = (width + tile - 1) / tile, th = (height + tile - 1) / tile, P = (int64_t)tile * tile;
  const int sw = strip_width(tile);
  at::parallel_for(0, C * th * tw, 1, [&](int64_t t_begin, int64_t t_end) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), n_buf - 1);
    T* gbuf = grads + tid * C * N * G;
    std::vector<T> Tr(P), va(P), vc(D * P), buf(D * P), col(D), s_col(D), px(P), py(P);
    std::vector<int32_t> last(P);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c = t / (th * tw), ty = (t % (th * tw)) / tw, tx = t % tw;
      const int x_org = (int)(tx * tile), y_org = (int)(ty * tile);
      int32_t kmax = -1;
      std::fill(buf.begin(), buf.end(), T(0));
      for (int64_t p = 0; p < P; ++p) {
        int lx, ly;
        strip_xy(p, tile, sw, lx, ly);
        const int64_t x = x_org + lx, y = y_org + ly;
        px[p] = T(x) + T(0.5);
        py[p] = T(y) + T(0.5);
        if (x >= width || y >= height) {
          last[p] = -1;
          Tr[p] = T(1);
          va[p] = T(0);
          for (int64_t d = 0; d < D; ++d) vc[d * P + p] = T(0);
          continue;
        }
        const int64_t pix = (c * height + y) * width + x;
        Tr[p] = out_T[pix];
        last[p] = out_last[pix];
        kmax = std::max(kmax, last[p]);
        T bg_dot = T(0);
        for (int64_t d = 0; d < D; ++d) {
          vc[d * P + p] = v_color[pix * D + d];
          bg_dot += bg[c * D + d] * v_color[pix * D + d];
        }
        va[p] = Tr[p] * (v_alpha[pix] - bg_dot);  // d(alpha output, background) / d alpha_i, per 1 / (1 - alpha_i)
      }
      const int64_t start = off[t];
      for (int32_t kl = kmax; kl >= 0; --kl) {
        const int64_t g = ids[start + kl];
        const T mx = m2[g * 2], my = m2[g * 2 + 1];
        const T ca = cn[g * 3], cb = cn[g * 3 + 1], cc = cn[g * 3 + 2], op = opa[g];
        int lx0, lx1, ly0, ly1;
        if (!footprint(mx, my, ext + g * 2, x_org, y_org, tile, lx0, lx1, ly0, ly1)) continue;
        for (int64_t d = 0; d < D; ++d) {
          col[d] = cl[g * D + d];
          s_col[d] = T(0);
        }
        T s_xx = 0, s_xy = 0, s_yy = 0, s_x = 0, s_y = 0, s_op = 0, sc0 = 0, sc1 = 0, sc2 = 0, sc3 = 0;
        for (int st = lx0 / sw; st <= lx1 / sw; ++st) {  // the strips of the box, as forward
          const int64_t p0 = (int64_t)st * sw * tile + (int64_t)ly0 * sw, p1 = p0 + (int64_t)(ly1 - ly0 + 1) * sw;
          if constexpr (DC > 0) {
            // Channel rows; channels beyond DC alias channel 0 and are never touched (if constexpr).
            T* b0 = buf.data();
            T* b1 = buf.data() + (DC > 1 ? 1 : 0) * P;
            T* b2 = buf.data() + (DC > 2 ? 2 : 0) * P;
            T* b3 = buf.data() + (DC > 3 ? 3 : 0) * P;
            const T* v0 = vc.data();
            const T* v1 = vc.data() + (DC > 1 ? 1 : 0) * P;
            const T* v2 = vc.data() + (DC > 2 ? 2 : 0) * P;
            const T* v3 = vc.data() + (DC > 3 ? 3 : 0) * P;
            const T c0 = col[0], c1 = col[DC > 1 ? 1 : 0], c2 = col[DC > 2 ? 2 : 0], c3 = col[DC > 3 ? 3 : 0];
#pragma omp simd reduction(+ : s_xx, s_xy, s_yy, s_x, s_y, s_op, sc0, sc1, sc2, sc3)
            for (int64_t p = p0; p < p1; ++p) {
              const T dx = mx - px[p], dy = my - py[p];
              const T sigma = T(0.5) * (ca * dx * dx + cc * dy * dy) + cb * dx * dy;
              const T vis = std::exp(-sigma);
              const T alpha = std::min(Consts<T>::a_max, op * vis);
              const bool use = (kl <= last[p]) & (sigma >= T(0)) & (alpha >= Consts<T>::a_min);
              const T ra = T(1) / (T(1) - alpha);
              const T Tp = use ? Tr[p] * ra : Tr[p];
              Tr[p] = Tp;
              const T fac = use ? alpha * Tp : T(0);
              T v_a = va[p] * ra;
              v_a += (c0 * Tp - b0[p] * ra) * v0[p];
              sc0 += fac * v0[p];
              b0[p] += c0 * fac;
              if constexpr (DC > 1) {
                v_a += (c1 * Tp - b1[p] * ra) * v1[p];
                sc1 += fac * v1[p];
                b1[p] += c1 * fac;
              }
              if constexpr (DC > 2) {
                v_a += (c2 * Tp - b2[p] * ra) * v2[p];
                sc2 += fac * v2[p];
                b2[p] += c2 * fac;
              }
              if constexpr (DC > 3) {
                v_a += (c3 * Tp - b3[p] * ra) * v3[p];
                sc3 += fac * v3[p];
                b3[p] += c3 * fac;
              }
              const bool grad_alpha = use & (op * vis <= Consts<T>::a_max);
              const T v_sigma = grad_alpha ? -op * vis * v_a : T(0);
              s_xx += v_sigma * dx * dx;
              s_xy += v_sigma * dx * dy;
              s_yy += v_sigma * dy * dy;
              s_x += v_sigma * dx;
              s_y += v_sigma * dy;
              s_op += grad_alpha ? vis * v_a : T(0);
            }
          } else {
            for (int64_t p = p0; p < p1; ++p) {
              const T dx = mx - px[p], dy = my - py[p];
              const T sigma = T(0.5) * (ca * dx * dx + cc * dy * dy) + cb * dx * dy;
              const T vis = std::exp(-sigma);
              const T alpha = std::min(Consts<T>::a_max, op * vis);
              const bool use = (kl <= last[p]) & (sigma >= T(0)) & (alpha >= Consts<T>::a_min);
              if (!use) continue;
              const T ra = T(1) / (T(1) - alpha);
              const T Tp = Tr[p] * ra;
              Tr[p] = Tp;
              const T fac = alpha * Tp;
              T v_a = va[p] * ra;
              for (int64_t d = 0; d < D; ++d) {
                v_a += (col[d] * Tp - buf[d * P + p] * ra) * vc[d * P + p];
                s_col[d] += fac * vc[d * P + p];
                buf[d * P + p] += col[d] * fac;
              }
              if (op * vis <= Consts<T>::a_max) {
                const T v_sigma = -op * vis * v_a;
                s_xx += v_sigma * dx * dx;
                s_xy += v_sigma * dx * dy;
                s_yy += v_sigma * dy * dy;
                s_x += v_sigma * dx;
                s_y += v_sigma * dy;
                s_op += vis * v_a;
              }
            }
          }
        }
        if constexpr (DC > 0) {
          const T sc[4] = {sc0, sc1, sc2, sc3};
          for (int64_t d = 0; d < D; ++d) s_col[d] = sc[d];
        }
        T* gg = gbuf + g * G;
        gg[0] += ca * s_x + cb * s_y;
        gg[1] += cb * s_x + cc * s_y;
        gg[2] += T(0.5) * s_xx;
        gg[3] += s_xy;
        gg[4] += T(0.5) * s_yy;
        gg[5] += s_op;
        for (int64_t d = 0; d < D; ++d) gg[6 + d] += s_col[d];
      }
    }
  });
}

#define DISPATCH_D(D, FN, ...)          \
  switch (D) {                          \
    case 1: FN<scalar_t, 1>(__VA_ARGS__); break; \
    case 2: FN<scalar_t, 2>(__VA_ARGS__); break; \
    case 3: FN<scalar_t, 3>(__VA_ARGS__); break; \
    case 4: FN<scalar_t, 4>(__VA_ARGS__); break; \
    default: FN<scalar_t, 0>(__VA_ARGS__); break; \
  }

void check_inputs(const torch::Tensor& m2, const torch::Tensor& cn, const torch::Tensor& cl, const torch::Tensor& op,
                  const torch::Tensor& bg, int64_t tile) {
  TORCH_CHECK(m2.dim() == 2 && m2.size(1) == 2 && m2.is_contiguous(), "means2d must be contiguous [CN, 2]");
  TORCH_CHECK(cn.dim() == 2 && cn.size(1) == 3 && cn.is_contiguous(), "conics must be contiguous [CN, 3]");
  TORCH_CHECK(cl.dim() == 2 && cl.size(0) == m2.size(0) && cl.is_contiguous(), "colors must be contiguous [CN, D]");
  TORCH_CHECK(op.dim() == 1 && op.size(0) == m2.size(0) && op.is_contiguous(), "opacities must be contiguous [CN]");
  TORCH_CHECK(bg.dim() == 2 && bg.size(1) == cl.size(1) && bg.is_contiguous(), "backgrounds must be [C, D]");
  TORCH_CHECK(tile > 0 && tile <= kMaxTile, "tile size must be in [1, 32]");
  for (auto* t : {&cn, &cl, &op, &bg}) TORCH_CHECK(t->scalar_type() == m2.scalar_type(), "dtypes must match");
}

}  // namespace

std::vector<torch::Tensor> raster_forward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                          torch::Tensor opacities, torch::Tensor backgrounds, torch::Tensor offsets,
                                          torch::Tensor ids, torch::Tensor ext, int64_t width, int64_t height,
                                          int64_t tile) {
  check_inputs(means2d, conics, colors, opacities, backgrounds, tile);
  TORCH_CHECK(ext.scalar_type() == torch::kFloat64 && ext.numel() == means2d.numel(), "ext must be float64 [CN, 2]");
  const int64_t C = backgrounds.size(0), D = colors.size(1);
  auto out_color = torch::empty({C, height, width, D}, colors.options());
  auto out_T = torch::empty({C, height, width}, colors.options());
  auto out_last = torch::empty({C, height, width}, torch::kInt32);
  AT_DISPATCH_FLOATING_TYPES(colors.scalar_type(), "raster_forward", [&] {
    DISPATCH_D(D, forward_impl, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
               colors.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(), backgrounds.data_ptr<scalar_t>(),
               offsets.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), ext.data_ptr<double>(), C, D, width, height,
               (int)tile,
               out_color.data_ptr<scalar_t>(), out_T.data_ptr<scalar_t>(), out_last.data_ptr<int32_t>());
  });
  return {out_color, out_T, out_last};
}

torch::Tensor raster_backward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                              torch::Tensor opacities, torch::Tensor backgrounds, torch::Tensor offsets,
                              torch::Tensor ids, torch::Tensor ext, int64_t width, int64_t height, int64_t tile,
                              torch::Tensor out_T, torch::Tensor out_last, torch::Tensor v_color,
                              torch::Tensor v_alpha) {
  check_inputs(means2d, conics, colors, opacities, backgrounds, tile);
  TORCH_CHECK(ext.scalar_type() == torch::kFloat64 && ext.numel() == means2d.numel(), "ext must be float64 [CN, 2]");
  const int64_t C = backgrounds.size(0), D = colors.size(1), N = means2d.size(0) / C;
  v_color = v_color.contiguous();
  v_alpha = v_alpha.contiguous();
  const int64_t n_buf = std::max<int64_t>(1, at::get_num_threads());
  auto grads = torch::zeros({n_buf, C * N, 6 + D}, colors.options());
  AT_DISPATCH_FLOATING_TYPES(colors.scalar_type(), "raster_backward", [&] {
    DISPATCH_D(D, backward_impl, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
               colors.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(), backgrounds.data_ptr<scalar_t>(),
               offsets.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), ext.data_ptr<double>(), C, N, D, width, height,
               (int)tile,
               out_T.data_ptr<scalar_t>(), out_last.data_ptr<int32_t>(), v_color.data_ptr<scalar_t>(),
               v_alpha.data_ptr<scalar_t>(), grads.data_ptr<scalar_t>(), n_buf);
  });
  return grads.sum(0);
}

// csrc/compact_cpu.cpp (Compact 3DGS), compiled into the same extension
torch::Tensor hash_encode_forward(torch::Tensor x, torch::Tensor table, torch::Tensor res, torch::Tensor dense);
std::vector<torch::Tensor> hash_encode_backward(torch::Tensor x, torch::Tensor table, torch::Tensor res,
                                                torch::Tensor dense, torch::Tensor grad_out);
torch::Tensor nearest_codeword(torch::Tensor x, torch::Tensor codebook);
// csrc/sh_cpu.cpp
std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                           torch::Tensor viewmats, torch::Tensor Ks, torch::Tensor ids, int64_t width,
                                           int64_t height, double eps2d, double near_plane, double far_plane,
                                           double radius_clip, bool antialiased);
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                            torch::Tensor viewmats, torch::Tensor Ks, torch::Tensor ids, int64_t width,
                                            int64_t height, double eps2d, torch::Tensor v_means2d,
                                            torch::Tensor v_conics, torch::Tensor v_depths, torch::Tensor v_comps);
torch::Tensor sh_forward(torch::Tensor dirs, torch::Tensor coeffs, torch::Tensor ids, int64_t degree);
torch::Tensor sh_backward(torch::Tensor dirs, torch::Tensor coeffs, torch::Tensor ids, int64_t degree,
                          torch::Tensor v_out, torch::Tensor v_coeffs);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hash_encode_forward", &hash_encode_forward, "multi-resolution hash encoding, forward");
  m.def("hash_encode_backward", &hash_encode_backward, "multi-resolution hash encoding, d x and d table");
  m.def("nearest_codeword", &nearest_codeword, "index of the nearest codeword of every row");
  m.def("project_forward", &project_forward, "EWA projection of the candidate Gaussians into every camera");
  m.def("project_backward", &project_backward, "analytic backward of project_forward");
  m.def("sh_forward", &sh_forward, "SH colours of the visible Gaussians (gathered by id)");
  m.def("sh_backward", &sh_backward, "analytic backward of sh_forward");
  m.def("bin_gaussians", &bin_gaussians, "per-tile Gaussian lists sorted by depth, and each Gaussian's alpha box");
  m.def("raster_forward", &raster_forward, "forward alpha compositing");
  m.def("raster_backward", &raster_backward, "analytic backward of raster_forward");
}
